// AVX-512 (F/BW/VL/DQ) kernels without VNNI: the body is qkernel_avx512.inc.
#define ATTNZOO_GEMV_NAME gemv_avx512
#include "qkernel_avx512.inc"
