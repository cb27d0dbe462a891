"""The gated delta rule (Gated DeltaNet, Kimi Delta Attention; shared/mechanisms.md §5-6).

One code path for both gate shapes: g [B, T, Hv] (a scalar decay per head, GDN) or [B, T, Hv, dk] (one per
key channel, KDA). Layout [batch, seq, heads, dim]; varlen via cu_seqlens over one packed row.
"""

from attnzoo.ops.delta_rule.reference import delta_rule_reference, l2norm

__all__ = ["delta_rule_reference", "l2norm"]
