"""Multi-head Latent Attention (DeepSeek-V2/V3; docs/mechanisms/latent.md) over a cached latent.

Inputs, packed [N, ...] with cu_seqlens or batched [B, T, ...]:
  q_nope [.., H, dn], q_pe [.., H, dr] (roped), c_kv [.., dc] (normalised latent), k_pe [.., dr] (roped,
  shared by all heads), w_uk [H, dn, dc], w_uv [H, dv, dc] (kv_b_proj split per head).
Output [.., H, dv]. `mla_expanded` rebuilds per-head K/V (prefill); `mla_absorbed` folds w_uk into the
query and w_uv into the output and attends MQA-style over [c_kv | k_pe] (decode). Same math, same scale.
`mla_paged_decode` (paged.py) is the absorbed decode over latent rows read in place through a block table.
"""

from attnzoo.ops.latent.paged import mla_paged_decode
from attnzoo.ops.latent.reference import mla_reference
from attnzoo.ops.latent.torch_impl import mla_absorbed, mla_expanded

__all__ = ["mla_absorbed", "mla_expanded", "mla_paged_decode", "mla_reference"]
