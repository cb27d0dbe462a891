"""The gated delta rule (Gated DeltaNet, Kimi Delta Attention; docs/mechanisms/delta_rule.md).

One code path for both gate shapes: g [B, T, Hv] (a scalar decay per head, GDN) or [B, T, Hv, dk] (one per
key channel, KDA). Layout [batch, seq, heads, dim]; varlen via cu_seqlens over one packed row.
  delta_rule_reference        the token-by-token spec (float64 for float64 inputs)
  chunk_delta_rule            chunkwise WY form: prefill and training (differentiable)
  fused_recurrent_delta_rule  token loop vectorised over sequences and heads
  delta_rule_step             one decode token per sequence, state updated in place
Triton (CUDA; CPU tensors under TRITON_INTERPRET=1): chunk_delta_rule_triton,
fused_recurrent_delta_rule_triton, delta_rule_step_triton (with state_indices into a state pool), in
attnzoo.ops.delta_rule.triton_kernels, imported on first use so a CPU install needs no triton.
"""

from attnzoo.ops.delta_rule.chunk import chunk_delta_rule
from attnzoo.ops.delta_rule.recurrent import delta_rule_step, fused_recurrent_delta_rule
from attnzoo.ops.delta_rule.reference import delta_rule_reference, l2norm

_TRITON = ("chunk_delta_rule_triton", "fused_recurrent_delta_rule_triton", "delta_rule_step_triton")


def __getattr__(name: str):
    if name in _TRITON:
        from attnzoo.ops.delta_rule import triton_kernels
        return getattr(triton_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_TRITON, "chunk_delta_rule", "delta_rule_reference", "delta_rule_step", "fused_recurrent_delta_rule", "l2norm"]
