// AVX2 kernels (built with -mavx2 -mfma -mf16c; called only where cpuid reports all three). Per row group
// and block: unpack the 8 rows' codes once, then for each activation row 8 unsigned x signed byte products
// (_mm256_maddubs_epi16; Q8_0 weights through the sign trick: |w| times x with w's sign), pair sums to
// int32 (_mm256_madd_epi16), one horizontal add that leaves the 8 rows' dots in row order (the layout's
// LO/HI split), and one FMA with the 8 rows' scales.
#include <immintrin.h>

#include "qkernel.h"

namespace attnzoo_q {
namespace {

constexpr int MT = 4;  // activation rows per pass over a group's weights (they stay in registers / L1)

inline __m256i bcast8(const int8_t* p) {  // 8 activation codes into every qword
  return _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline void store_rows(__m256 acc, const Weight& w, int64_t g, const float* bias, float* out) {
  const int64_t n0 = g * ROWS;
  if (n0 + ROWS <= w.N) {
    if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias + n0));
    _mm256_storeu_ps(out + n0, acc);
    return;
  }
  alignas(32) float tmp[ROWS];
  _mm256_store_ps(tmp, acc);
  for (int r = 0; n0 + r < w.N; ++r) out[n0 + r] = tmp[r] + (bias ? bias[n0 + r] : 0.0f);
}

// rows [m0, m0 + T) of the activations against row group g
template <int FMT, int T>
inline void group_rows(const Act& a, const Weight& w, int64_t g, int64_t m0, const float* bias, float* out,
                       int64_t ldo) {
  constexpr int CB = FMT == Q8_0 ? 256 : 128, NS = (FMT == Q4_1 ? 2 : 1) * ROWS;
  const int64_t nb = w.K / BLOCK;
  const uint8_t* codes = w.codes + g * nb * CB;
  const uint16_t* sc = w.scales + g * nb * NS;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f);
  __m256 acc[T];
  for (int i = 0; i < T; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + b * NS)));
    __m256 mw = _mm256_setzero_ps();
    if (FMT == Q4_1) mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + b * NS + ROWS)));
    if (FMT == Q4_0) mw = _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
    const uint8_t* p = codes + b * CB;
    __m256i v[8];  // Q4: lo/hi nibbles of chunk c at 2c / 2c + 1; Q8: vector 2c + h as stored
    for (int c = 0; c < 8; ++c) {
      if (FMT == Q8_0) {
        v[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));
      } else if (c % 2 == 0) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * c));
        v[c] = _mm256_and_si256(raw, low4);
        v[c + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      }
    }
    for (int i = 0; i < T; ++i) {
      const int8_t* xq = a.q + (m0 + i) * a.K + b * BLOCK;
      __m256i lo, hi;
      if (FMT == Q8_0) {  // pair sums reach 2 * 128 * 127: widen each chunk to int32 before adding
        lo = hi = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          const __m256i x = bcast8(xq + 8 * c);
          lo = _mm256_add_epi32(lo, _mm256_madd_epi16(
              _mm256_maddubs_epi16(_mm256_abs_epi8(v[2 * c]), _mm256_sign_epi8(x, v[2 * c])), ones));
          hi = _mm256_add_epi32(hi, _mm256_madd_epi16(
              _mm256_maddubs_epi16(_mm256_abs_epi8(v[2 * c + 1]), _mm256_sign_epi8(x, v[2 * c + 1])), ones));
        }
      } else {  // 4 chunks of pair sums <= 2 * 15 * 127 stay within int16
        __m256i slo = _mm256_setzero_si256(), shi = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          const __m256i x = bcast8(xq + 8 * c);
          slo = _mm256_add_epi16(slo, _mm256_maddubs_epi16(v[2 * c], x));
          shi = _mm256_add_epi16(shi, _mm256_maddubs_epi16(v[2 * c + 1], x));
        }
        lo = _mm256_madd_epi16(slo, ones);
        hi = _mm256_madd_epi16(shi, ones);
      }
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_hadd_epi32(lo, hi));  // rows 0..7 in order
      const int64_t j = (m0 + i) * nb + b;
      acc[i] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_set1_ps(a.d[j])), acc[i]);
      if (FMT != Q8_0) acc[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[j]), acc[i]);
    }
  }
  for (int i = 0; i < T; ++i) store_rows(acc[i], w, g, bias, out + (m0 + i) * ldo);
}

template <int FMT>
void gemv_fmt(const Act& a, const Weight& w, int64_t g0, int64_t g1, const float* bias, float* out, int64_t ldo) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = 0;
    for (; m + MT <= a.M; m += MT) group_rows<FMT, MT>(a, w, g, m, bias, out, ldo);
    switch (a.M - m) {
      case 3: group_rows<FMT, 3>(a, w, g, m, bias, out, ldo); break;
      case 2: group_rows<FMT, 2>(a, w, g, m, bias, out, ldo); break;
      case 1: group_rows<FMT, 1>(a, w, g, m, bias, out, ldo); break;
      default: break;
    }
  }
}

}  // namespace

void quantize_avx2(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      v[c] = _mm256_loadu_ps(x + b * BLOCK + 8 * c);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[c]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float db = _mm_cvtss_f32(m4) / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    __m256i i[4];
    for (int c = 0; c < 4; ++c)  // the default MXCSR mode rounds half to even, as torch.round
      i[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], _mm256_set1_ps(id)));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * BLOCK), _mm256_permutevar8x32_epi32(packed, order));
    d[b] = db;
    s[b] = db * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

void gemv_avx2(const Act& a, const Weight& w, int64_t g0, int64_t g1, const float* bias, float* out, int64_t ldo) {
  if (w.fmt == Q4_0) gemv_fmt<Q4_0>(a, w, g0, g1, bias, out, ldo);
  else if (w.fmt == Q4_1) gemv_fmt<Q4_1>(a, w, g0, g1, bias, out, ldo);
  else gemv_fmt<Q8_0>(a, w, g0, g1, bias, out, ldo);
}

}  // namespace attnzoo_q
