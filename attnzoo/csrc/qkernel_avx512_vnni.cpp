// AVX-512 kernels with VNNI (_mm512_dpbusd_epi32): the body is qkernel_avx512.inc.
#define ATTNZOO_VNNI 1
#define ATTNZOO_GEMV_NAME gemv_avx512_vnni
#include "qkernel_avx512.inc"
