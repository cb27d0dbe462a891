"""Triton kernels for softmax attention (CUDA; CPU tensors under TRITON_INTERPRET=1 for tests).

Importing this package imports triton; attnzoo.ops.attention imports it lazily so the CPU install
never needs triton.
"""

from attnzoo.ops.attention.triton.op import attention_triton, flash_attn_op
from attnzoo.ops.attention.triton.paged_decode import paged_decode_triton

__all__ = ["attention_triton", "flash_attn_op", "paged_decode_triton"]
