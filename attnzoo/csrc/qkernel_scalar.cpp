// The portable kernels: plain C++ reading the packed layout of qkernel.h (the fallback on CPUs without AVX2,
// and the oracle the SIMD paths are tested against, besides the PyTorch reference).
#include <cmath>

#include "qkernel.h"

namespace attnzoo_q {

static const int kHalf[ROWS] = {0, 0, 1, 1, 0, 0, 1, 1};   // row r: low (0) or high (1) half of its chunk
static const int kQword[ROWS] = {0, 1, 0, 1, 2, 3, 2, 3};  // and its qword there (LO = 0,1,4,5; HI = 2,3,6,7)

float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0 && man == 0) {
    bits = sign;
  } else if (exp == 0) {  // subnormal: shift the mantissa up to its leading one
    uint32_t e = 113;
    while (!(man & 0x400u)) { man <<= 1; --e; }
    bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

void quantize_scalar(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    const float* xb = x + b * BLOCK;
    float amax = 0.0f;
    for (int j = 0; j < BLOCK; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    int sum = 0;
    for (int j = 0; j < BLOCK; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * id));  // half to even, as torch.round
      q[b * BLOCK + j] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = db;
    s[b] = db * static_cast<float>(sum);
  }
}

// code of row r, input e (0..31) of one block's codes
static inline int code(const uint8_t* p, int fmt, int r, int e) {
  const int c = e / 8, j = e % 8, h = kHalf[r], k = kQword[r];
  if (fmt == Q8_0) return static_cast<int8_t>(p[(2 * c + h) * 32 + k * 8 + j]);
  const uint8_t byte = p[c * 32 + k * 8 + j];
  return h ? byte >> 4 : byte & 15;
}

// the block's d and the offset mw of w = q d + mw, per row
static inline void block_scales(const uint16_t* sc, int fmt, float* dw, float* mw) {
  for (int r = 0; r < ROWS; ++r) {
    dw[r] = fp16_to_float(sc[r]);
    mw[r] = fmt == Q4_1 ? fp16_to_float(sc[ROWS + r]) : fmt == Q4_0 ? -8.0f * dw[r] : 0.0f;
  }
}

void gemv_scalar(const Act& a, const Weight& w, int64_t g0, int64_t g1, const float* bias, float* out, int64_t ldo) {
  const int64_t nb = w.K / BLOCK, cb = code_bytes(w.fmt), ns = scale_count(w.fmt) * ROWS;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t m = 0; m < a.M; ++m) {
      float acc[ROWS] = {0}, dw[ROWS], mw[ROWS];
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = w.codes + (g * nb + b) * cb;
        const int8_t* xq = a.q + m * a.K + b * BLOCK;
        block_scales(w.scales + (g * nb + b) * ns, w.fmt, dw, mw);
        const float dx = a.d[m * nb + b], sx = a.s[m * nb + b];
        for (int r = 0; r < ROWS; ++r) {
          int dot = 0;
          for (int e = 0; e < BLOCK; ++e) dot += code(p, w.fmt, r, e) * xq[e];
          acc[r] += dw[r] * dx * static_cast<float>(dot) + mw[r] * sx;
        }
      }
      for (int r = 0; r < ROWS && g * ROWS + r < w.N; ++r)
        out[m * ldo + g * ROWS + r] = acc[r] + (bias ? bias[g * ROWS + r] : 0.0f);
    }
  }
}

void dequant_scalar(const Weight& w, int64_t g0, int64_t g1, float* out) {
  static const int kLo[4] = {0, 1, 4, 5}, kHi[4] = {2, 3, 6, 7};
  const int64_t nb = w.K / BLOCK, cb = code_bytes(w.fmt), ns = scale_count(w.fmt) * ROWS;
  float dw[ROWS], mw[ROWS];
  for (int64_t g = g0; g < g1; ++g) {
    float* o = out + (g - g0) * ROWS * w.K;  // rows past N land in the caller's padding
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = w.codes + (g * nb + b) * cb;
      block_scales(w.scales + (g * nb + b) * ns, w.fmt, dw, mw);
      for (int c = 0; c < 4; ++c) {
        for (int k = 0; k < 4; ++k) {  // one qword of the low half (row kLo[k]) and of the high half (kHi[k])
          const int lo = kLo[k], hi = kHi[k];
          float* olo = o + lo * w.K + b * BLOCK + 8 * c;
          float* ohi = o + hi * w.K + b * BLOCK + 8 * c;
          if (w.fmt == Q8_0) {
            const int8_t* vlo = reinterpret_cast<const int8_t*>(p) + 64 * c + 8 * k;
            for (int j = 0; j < 8; ++j) olo[j] = static_cast<float>(vlo[j]) * dw[lo];
            for (int j = 0; j < 8; ++j) ohi[j] = static_cast<float>(vlo[32 + j]) * dw[hi];
          } else {
            const uint8_t* v = p + 32 * c + 8 * k;
            for (int j = 0; j < 8; ++j) olo[j] = static_cast<float>(v[j] & 15) * dw[lo] + mw[lo];
            for (int j = 0; j < 8; ++j) ohi[j] = static_cast<float>(v[j] >> 4) * dw[hi] + mw[hi];
          }
        }
      }
    }
  }
}

}  // namespace attnzoo_q
