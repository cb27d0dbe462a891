// attnzoo::q_linear: y = x @ w.T (+ bias) with w in GGUF blocks (Q4_0, Q4_1, Q8_0) packed by
// attnzoo/ops/quant_kernels.py (layout: qkernel.h), registered with torch.library so eager code,
// torch.compile (the fake impl is in quant_kernels.py) and Inductor's cpp_wrapper can call it.
//
// Small M (decode): the activations are quantised to Q8 per 32-block once per call, then integer dot products
// on the packed codes, threaded over row groups with at::parallel_for (torch's pool and thread count). The ISA
// is picked at run time from cpuid: AVX-512 VNNI, AVX-512, AVX2, else the portable loops. Large M (prefill):
// panels of the weight are dequantised to fp32 and multiplied with at::mm, which catches up once the GEMM's
// efficiency outweighs the dequantisation (the crossover is measured: kPanelM below).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "qkernel.h"

namespace attnzoo_q {
namespace {

// Rows of x from which the dequantised-panel GEMM runs instead of the integer kernel. Measured on a 2-core AVX2
// EPYC (bench/quant_cpu.py --crossover, 2 threads, SmolLM2's shapes in Q4_1 and Q8_0): the integer path took
// 0.02-0.08x of the panel path's time at M = 1, 0.2-0.5x at M = 64, 0.6-0.9x at M = 1024 and 0.6-1.0x at
// M = 4096. So the panel path is for batches past the engine's default prefill chunk (2048 tokens).
constexpr int64_t kPanelM = 4096;
constexpr int64_t kPanelRows = 512;   // weight rows dequantised at a time (1.2 MB of fp32 at K = 576)
constexpr int64_t kGroupWork = 256;   // (row group x block x activation row) steps per thread task, at least

int detect_isa() {
#if defined(ATTNZOO_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return SCALAR;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
    return AVX2;
  return __builtin_cpu_supports("avx512vnni") ? AVX512_VNNI : AVX512;
#else
  return SCALAR;
#endif
}

#ifdef _OPENMP  // at::parallel_for is inline OpenMP in torch's headers: without -fopenmp it runs serially
constexpr int64_t kParallel = 1;
#else
constexpr int64_t kParallel = 0;
#endif

const int kBestIsa = detect_isa();
std::atomic<int> g_isa{kBestIsa};
std::atomic<int64_t> g_panel_m{kPanelM};

struct Kernels {
  QuantizeFn quantize;
  GemvFn gemv;
};

Kernels kernels(int isa) {
  switch (isa) {
#if defined(ATTNZOO_X86)
    case AVX512_VNNI: return {quantize_avx2, gemv_avx512_vnni};
    case AVX512: return {quantize_avx2, gemv_avx512};
    case AVX2: return {quantize_avx2, gemv_avx2};
#endif
    default: return {quantize_scalar, gemv_scalar};
  }
}

void gemv(const at::Tensor& x, const Weight& w, const float* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = w.K, nb = K / BLOCK, G = (w.N + ROWS - 1) / ROWS;
  const Kernels k = kernels(g_isa.load());
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, nb}, x.options()), s = at::empty({M, nb}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float *dp = d.data_ptr<float>(), *sp = s.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) k.quantize(xp + m * K, K, qp + m * K, dp + m * nb, sp + m * nb);
  });
  const Act a{qp, dp, sp, M, K};
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, G, std::max<int64_t>(1, kGroupWork / (nb * M)), [&](int64_t g0, int64_t g1) {
    k.gemv(a, w, g0, g1, bias, yp, w.N);
  });
}

void panel_mm(const at::Tensor& x, const Weight& w, const float* bias, at::Tensor& y) {
  for (int64_t n0 = 0; n0 < w.N; n0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, w.N - n0), gs = n0 / ROWS, ge = (n0 + rows + ROWS - 1) / ROWS;
    at::Tensor panel = at::empty({(ge - gs) * ROWS, w.K}, x.options());  // whole groups, padding included
    float* pp = panel.data_ptr<float>();
    at::parallel_for(gs, ge, 1, [&](int64_t g0, int64_t g1) {
      dequant_scalar(w, g0, g1, pp + (g0 - gs) * ROWS * w.K);
    });
    y.narrow(1, n0, rows).copy_(at::mm(x, panel.narrow(0, 0, rows).t()));
  }
  if (bias) y.add_(at::from_blob(const_cast<float*>(bias), {w.N}, x.options()));
}

at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t fmt, int64_t N,
                    int64_t K, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(fmt == Q4_0 || fmt == Q4_1 || fmt == Q8_0, "q_linear: fmt must be 0 (Q4_0), 1 (Q4_1) or 2 (Q8_0), got ",
              fmt);
  TORCH_CHECK(N > 0 && K > 0 && K % BLOCK == 0, "q_linear: need N > 0 and K a positive multiple of 32, got N = ", N,
              ", K = ", K);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "q_linear: x has ", x.size(-1), " features, the weight expects ", K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "q_linear: x must be float32 or "
              "bfloat16, got ", x.scalar_type());
  const int64_t G = (N + ROWS - 1) / ROWS, nb = K / BLOCK;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == G * nb * code_bytes(fmt),
              "q_linear: codes must be contiguous uint8 with ", G * nb * code_bytes(fmt), " bytes");
  TORCH_CHECK(scales.scalar_type() == at::kShort && scales.is_contiguous() &&
              scales.numel() == G * nb * scale_count(fmt) * ROWS,
              "q_linear: scales must be contiguous int16 (fp16 bits) with ", G * nb * scale_count(fmt) * ROWS,
              " values");
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "q_linear: bias has ", bias->numel(), " values, expected ", N);
    b = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());
  const Weight w{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<int16_t>()),
                 static_cast<int>(fmt), N, K};
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (M >= g_panel_m.load()) panel_mm(x2, w, bp, y);
  else if (M > 0) gemv(x2, w, bp, y);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return y.to(x.scalar_type()).view(shape);
}

// isa < 0 / panel_m < 0 leave the setting. Returns [isa in use, best isa this CPU runs, panel_m, built with
// OpenMP] (isa: 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 VNNI; a request above what the CPU has is capped).
std::vector<int64_t> q_linear_config(int64_t isa, int64_t panel_m) {
  if (isa >= 0) g_isa.store(static_cast<int>(std::min<int64_t>(isa, kBestIsa)));
  if (panel_m >= 0) g_panel_m.store(panel_m);
  return {g_isa.load(), kBestIsa, g_panel_m.load(), kParallel};
}

}  // namespace
}  // namespace attnzoo_q

TORCH_LIBRARY(attnzoo, m) {
  m.set_python_module("attnzoo.ops.quant_kernels");
  m.def("q_linear(Tensor x, Tensor codes, Tensor scales, int fmt, int N, int K, Tensor? bias=None) -> Tensor");
  m.def("q_linear_config(int isa=-1, int panel_m=-1) -> int[]", &attnzoo_q::q_linear_config);
}

TORCH_LIBRARY_IMPL(attnzoo, CPU, m) { m.impl("q_linear", &attnzoo_q::q_linear); }

// `import attnzoo._C` loads the library (the registrations above run as it loads); it has no Python API.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "attnzoo's C++ ops, registered with torch.library", -1,
                            nullptr};
  return PyModule_Create(&def);
}
