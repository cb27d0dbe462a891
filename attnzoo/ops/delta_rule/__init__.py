"""The gated delta rule (Gated DeltaNet, Kimi Delta Attention; shared/mechanisms.md §5-6).

One code path for both gate shapes: g [B, T, Hv] (a scalar decay per head, GDN) or [B, T, Hv, dk] (one per
key channel, KDA). Layout [batch, seq, heads, dim]; varlen via cu_seqlens over one packed row.
  delta_rule_reference        the token-by-token spec (float64 for float64 inputs)
  chunk_delta_rule            chunkwise WY form: prefill and training (differentiable)
  fused_recurrent_delta_rule  token loop vectorised over sequences and heads
  delta_rule_step             one decode token per sequence, state updated in place
"""

from attnzoo.ops.delta_rule.chunk import chunk_delta_rule
from attnzoo.ops.delta_rule.recurrent import delta_rule_step, fused_recurrent_delta_rule
from attnzoo.ops.delta_rule.reference import delta_rule_reference, l2norm

__all__ = ["chunk_delta_rule", "delta_rule_reference", "delta_rule_step", "fused_recurrent_delta_rule", "l2norm"]
