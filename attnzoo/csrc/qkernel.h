// Quantised linears on GGUF blocks (Q4_0, Q4_1, Q8_0): the interface between the op (qlinear.cpp, which
// includes torch) and the per-ISA kernels (qkernel_*.cpp, which include nothing from torch or the C++
// library, so that no inline function compiled with -mavx512f can be merged into code that runs anywhere).
//
// Packed weight layout (attnzoo/ops/quant_kernels.py packs it; docs/quantization.md draws it). Rows go in
// groups of 8 (N padded with zero rows); per group g and 32-input block b, in this order over (g, b):
//   codes: Q4: 128 bytes = 4 chunks of 32 bytes; chunk c holds inputs 8c..8c+7 of the block, its qword k
//          (k = 0..3) holds the low nibbles of row LO[k] and the high nibbles of row HI[k], byte j of the
//          qword input 8c + j (LO = 0,1,4,5; HI = 2,3,6,7).
//          Q8: 256 bytes = 8 vectors of 32 int8; vector 2c + h holds inputs 8c..8c+7, qword k of row
//          (h ? HI : LO)[k].
//   scales: fp16 bits, [G, nb, S, 8] with S = 2 for Q4_1 (d then m), else 1 (d), rows in natural order.
// The row order LO/HI is what one AVX2 horizontal add of the two halves' partial sums leaves in row order.
//
// Activations are quantised per row and 32-block: d = amax / 127, q = round_half_even(x / d as x * (1 / d)),
// s = d * sum(q). A weight block contributes (dw * dx) * dot(qw, qx) + mw * s, with mw = m (Q4_1), -8 dw
// (Q4_0, whose codes are stored unsigned 0..15 like Q4_1's) or nothing (Q8_0).
// Helpers here are static (internal linkage): an ISA TU's copy never replaces another TU's.
#pragma once
#include <cstdint>

namespace attnzoo_q {

enum Fmt : int { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_VNNI = 3 };

constexpr int ROWS = 8;      // rows per group
constexpr int BLOCK = 32;    // inputs per block

static inline int code_bytes(int fmt) { return fmt == Q8_0 ? 256 : 128; }
static inline int scale_count(int fmt) { return fmt == Q4_1 ? 2 : 1; }

struct Act {                 // activations quantised to Q8 per block
  const int8_t* q;           // [M, K]
  const float* d;            // [M, nb]
  const float* s;            // [M, nb] d * sum(q)
  int64_t M, K;
};

struct Weight {
  const uint8_t* codes;      // [G, nb, code_bytes]
  const uint16_t* scales;    // [G, nb, S, 8] fp16 bits
  int fmt;
  int64_t N, K;
};

// quantise one row of K (a multiple of 32) floats
using QuantizeFn = void (*)(const float* x, int64_t K, int8_t* q, float* d, float* s);
// out[m, n] (row stride ldo) = sum over blocks (+ bias[n] if bias) for the row groups [g0, g1), every m
using GemvFn = void (*)(const Act& a, const Weight& w, int64_t g0, int64_t g1, const float* bias, float* out,
                        int64_t ldo);

void quantize_scalar(const float* x, int64_t K, int8_t* q, float* d, float* s);
void gemv_scalar(const Act& a, const Weight& w, int64_t g0, int64_t g1, const float* bias, float* out, int64_t ldo);
// fp32 rows [8 g0, 8 g1) of the weight, row stride K, into out with room for all 8 (g1 - g0) rows (the padding
// rows of the last group come out as 0 * d + m); the large-M path multiplies them with a BLAS GEMM
void dequant_scalar(const Weight& w, int64_t g0, int64_t g1, float* out);
float fp16_to_float(uint16_t h);

#if defined(ATTNZOO_X86)  // the AVX-512 paths quantise activations with quantize_avx2
void quantize_avx2(const float* x, int64_t K, int8_t* q, float* d, float* s);
void gemv_avx2(const Act& a, const Weight& w, int64_t g0, int64_t g1, const float* bias, float* out, int64_t ldo);
void gemv_avx512(const Act& a, const Weight& w, int64_t g0, int64_t g1, const float* bias, float* out, int64_t ldo);
void gemv_avx512_vnni(const Act& a, const Weight& w, int64_t g0, int64_t g1, const float* bias, float* out,
                      int64_t ldo);
#endif

}  // namespace attnzoo_q
