// attnzoo::paged_decode: one decode step of paged softmax attention for a whole batch, one call per layer.
// It writes the step's new K/V rows into their slots, then each sequence's single query attends over its
// first seq_lens[b] keys, read in place through its block table (no gather copies). The reference it is
// tested against is attnzoo/ops/attention/paged_decode.py (`paged_decode_reference`).
//
// Work is split over (sequence, KV head, key chunk): the query heads of one KV head (GQA) share every key and
// value row they read, and a long context is cut into chunks of CHUNK keys that run on different threads,
// each keeping its own running max / sum / output, merged at the end by log-sum-exp. A row with seq_lens 0
// (a padded row of a bucketed batch) gets zeros; a slot < 0 is not written.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace attnzoo_paged {
namespace {

constexpr int64_t CHUNK = 256;   // keys per work item: splits a long context over threads

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

template <typename T>
void write_rows(at::Tensor& cache, const at::Tensor& rows, const int64_t* slots, int64_t n) {
  // cache [Hkv, pages * page_size, D] viewed flat; rows [n, Hkv, D]
  const int64_t Hkv = cache.size(0), D = cache.size(-1), S = cache.numel() / (Hkv * D);
  T* c = cache.data_ptr<T>();
  const at::Tensor r = rows.to(cache.scalar_type()).contiguous();
  const T* src = r.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    if (slots[i] < 0) continue;
    TORCH_CHECK(slots[i] < S, "paged_decode: slot ", slots[i], " is outside the cache's ", S, " slots");
    for (int64_t h = 0; h < Hkv; ++h) std::copy_n(src + (i * Hkv + h) * D, D, c + (h * S + slots[i]) * D);
  }
}

template <typename T>
at::Tensor run(const at::Tensor& q, at::Tensor& kc, at::Tensor& vc, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots, const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
               int64_t window_left, const std::optional<at::Tensor>& sinks) {
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), Hkv = kc.size(0), P = kc.size(1), ps = kc.size(2);
  const int64_t dv = vc.size(-1), G = H / Hkv, W = block_table.size(1);
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  write_rows<T>(kc, k, sl.data_ptr<int64_t>(), B);
  write_rows<T>(vc, v, sl.data_ptr<int64_t>(), B);

  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor bt = block_table.to(at::kInt).contiguous(), lens = seq_lens.to(at::kInt).contiguous();
  const int32_t* btp = bt.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  std::vector<int64_t> first(B), nsplit(B), base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lp[b];
    TORCH_CHECK(L >= 0 && L <= W * ps, "paged_decode: seq_lens[", b, "] = ", L, " does not fit its block table of ",
                W, " pages of ", ps);
    first[b] = window_left >= 0 ? std::max<int64_t>(0, L - 1 - window_left) : 0;
    nsplit[b] = (L - first[b] + CHUNK - 1) / CHUNK;
    base[b + 1] = base[b] + nsplit[b];
  }
  const int64_t items = base[B];   // (sequence, chunk) pairs; each runs every KV head
  // partial results per (item, query head): output [dv], running max, running sum
  std::vector<float> po(items * H * dv), pm(items * H), pl(items * H);
  const float* qp = qf.data_ptr<float>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, items * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(G * CHUNK);
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t item = w / Hkv, hk = w % Hkv;
      const int64_t b = std::upper_bound(base.begin(), base.end(), item) - base.begin() - 1;
      const int64_t t0 = first[b] + (item - base[b]) * CHUNK, t1 = std::min<int64_t>(t0 + CHUNK, lp[b]);
      const float* qh = qp + (b * H + hk * G) * d;
      for (int64_t t = t0; t < t1; ++t) {   // one key row, every query head of the group
        const int64_t page = btp[b * W + t / ps];
        const T* kr = kp + ((hk * P + page) * ps + t % ps) * d;
        for (int64_t g = 0; g < G; ++g) s[g * CHUNK + t - t0] = dot(qh + g * d, kr, d) * sc;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * CHUNK;
        float m = -std::numeric_limits<float>::infinity(), l = 0.f;
        for (int64_t t = 0; t < t1 - t0; ++t) m = std::max(m, sg[t]);
        for (int64_t t = 0; t < t1 - t0; ++t) l += (sg[t] = std::exp(sg[t] - m));
        const int64_t at = item * H + hk * G + g;
        pm[at] = m;
        pl[at] = l;
        std::fill_n(po.data() + at * dv, dv, 0.f);
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t page = btp[b * W + t / ps];
        const T* vr = vp + ((hk * P + page) * ps + t % ps) * dv;
        for (int64_t g = 0; g < G; ++g) {
          float* o = po.data() + (item * H + hk * G + g) * dv;
          const float p = s[g * CHUNK + t - t0];
#pragma omp simd
          for (int64_t i = 0; i < dv; ++i) o[i] += p * static_cast<float>(vr[i]);
        }
      }
    }
  });

  at::Tensor out = at::zeros({B, H, dv}, qf.options());
  float* op = out.data_ptr<float>();
  const at::Tensor sk = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  const float* skp = sk.defined() ? sk.data_ptr<float>() : nullptr;
  at::parallel_for(0, B * H, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {   // merge the chunks of (sequence, head) by log-sum-exp
      const int64_t b = w / H, h = w % H;
      if (nsplit[b] == 0) continue;
      float m = skp ? skp[h] : -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < nsplit[b]; ++c) m = std::max(m, pm[(base[b] + c) * H + h]);
      float l = skp ? std::exp(skp[h] - m) : 0.f;
      float* o = op + w * dv;
      for (int64_t c = 0; c < nsplit[b]; ++c) {
        const int64_t at = (base[b] + c) * H + h;
        const float f = std::exp(pm[at] - m);
        l += pl[at] * f;
        for (int64_t i = 0; i < dv; ++i) o[i] += po[at * dv + i] * f;
      }
      for (int64_t i = 0; i < dv; ++i) o[i] /= l;
    }
  });
  return out.to(q.scalar_type());
}

at::Tensor paged_decode(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& slots, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, double scale, int64_t window_left,
                        const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "paged_decode: q [B, H, d], caches "
              "[Hkv, pages, page_size, d] expected, got q ", q.sizes(), ", k_cache ", k_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), Hkv = k_cache.size(0);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "paged_decode: ", H, " query heads are not a multiple of ", Hkv, " KV heads");
  TORCH_CHECK(k_cache.size(3) == d && v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3),
              "paged_decode: caches ", k_cache.sizes(), " and ", v_cache.sizes(), " do not match q's head size ", d);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode: the caches must be contiguous and of one dtype");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && slots.numel() == B && block_table.size(0) == B &&
              seq_lens.numel() == B, "paged_decode: k, v, slots, block_table and seq_lens need one row per query");
  TORCH_CHECK(!sinks.has_value() || sinks->numel() == H, "paged_decode: sinks need one value per query head");
  switch (k_cache.scalar_type()) {
    case at::kFloat: return run<float>(q, k_cache, v_cache, k, v, slots, block_table, seq_lens, scale, window_left,
                                       sinks);
    case at::kBFloat16: return run<c10::BFloat16>(q, k_cache, v_cache, k, v, slots, block_table, seq_lens, scale,
                                                  window_left, sinks);
    case at::kHalf: return run<c10::Half>(q, k_cache, v_cache, k, v, slots, block_table, seq_lens, scale,
                                          window_left, sinks);
    default: TORCH_CHECK(false, "paged_decode: cache dtype ", k_cache.scalar_type(), " is not float32, bfloat16 or "
                         "float16");
  }
}

}  // namespace
}  // namespace attnzoo_paged

TORCH_LIBRARY_FRAGMENT(attnzoo, m) {
  m.def("paged_decode(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots, "
        "Tensor block_table, Tensor seq_lens, float scale, int window_left=-1, Tensor? sinks=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnzoo, CPU, m) { m.impl("paged_decode", &attnzoo_paged::paged_decode); }
