"""Select-then-attend, the spec in code: softmax attention restricted to selected keys.

Naive on purpose: the selection becomes a boolean [B, Tq, Hkv, Tk] mask (scatter, so a key named
twice is still one key), AND the causal mask, then one dense masked softmax in float32 (float64 for
float64 inputs). Validation lives here so every form agrees on what is legal.

Conventions (docs/mechanisms/sparse.md §1):
  q [B, Tq, H, dqk], k [B, Tk, Hkv, dqk], v [B, Tk, Hkv, dv]; query head h belongs to group h // G,
  G = H / Hkv, and reads only its group's selection (DSA / MQA: Hkv = 1, one selection for all heads).
  indices [B, Tq, Hkv, K]: key positions, -1 = unused slot. block_indices [B, Tq, Hkv, nb]: blocks
  b = keys [b*bs, (b+1)*bs) anchored at key 0 (the last block may be partial), -1 = unused.
  Causal is bottom-right aligned: query i sees key j <= i + Tk - Tq. A selected future key is masked,
  not an error (selectors may pad with whatever they like past the diagonal).
  Duplicates: a key (or block) named more than once counts once; every form dedupes.
  A row with no valid key outputs 0 and LSE = -inf (flash-attn convention).
  LSE: natural log, [B, H, Tq], float32 (float64 for float64 inputs), as attnzoo.ops.attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnzoo.ops.attention.reference import check_qkv, compute_dtype, visible


def _shapes(**ts: Tensor) -> str:
    return ", ".join(f"{n}={tuple(t.shape)}" for n, t in ts.items())


def check_sparse(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float | None, *,
                 block_size: int | None = None, what: str = "sparse_attention") -> float:
    """Validate shapes, dtypes and index range (ValueError naming the shapes); return the scale.

    block_size=None: indices are token positions in [-1, Tk); else block ids in [-1, ceil(Tk / bs)).
    The range check reads min/max on the host (one sync), cheap next to the attention itself."""
    shapes = _shapes(q=q, k=k, v=v, indices=indices)

    def bad(msg: str) -> ValueError:
        return ValueError(f"{what}: {msg} (got {shapes})")

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise bad("q, k, v must be [batch, seq, heads, dim]")
    check_qkv(q, k, v, bad)
    B, Tq, H, d = q.shape
    Tk, Hkv = k.shape[1:3]
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (B, Tq, Hkv):
        raise bad(f"indices must be [batch, q_seq, kv_heads, K] = [{B}, {Tq}, {Hkv}, K]")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise bad(f"indices must be an integer tensor, got {indices.dtype}")
    if block_size is not None:
        if int(block_size) != block_size or block_size < 1:
            raise bad(f"block_size must be a positive int, got {block_size}")
        n, unit = -(-Tk // int(block_size)), f"blocks (ceil({Tk} / {block_size}))"
    else:
        n, unit = Tk, "keys"
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= n:
            raise bad(f"indices must lie in [-1, {n}) ({n} {unit}); found values in [{lo}, {hi}]")
    return 1 / math.sqrt(d) if scale is None else float(scale)


def selection_mask(indices: Tensor, n: int) -> Tensor:
    """Bool [..., n]: is column j named in indices[..., :]? -1 slots land in a dropped column."""
    safe = torch.where(indices < 0, torch.full_like(indices, n), indices).long()
    m = torch.zeros(*indices.shape[:-1], n + 1, dtype=torch.bool, device=indices.device)
    m.scatter_(-1, safe, True)  # scatter: duplicates collapse, which is the dedupe
    return m[..., :n]


def blocks_to_token_indices(block_indices: Tensor, block_size: int, num_keys: int) -> Tensor:
    """[..., nb] block ids -> [..., nb * bs] token positions (-1 for unused blocks and for the missing
    tail of a partial last block). Order: block by block, keys ascending within a block."""
    tok = block_indices[..., None].long() * block_size + torch.arange(block_size, device=block_indices.device)
    ok = (block_indices[..., None] >= 0) & (tok < num_keys)
    return torch.where(ok, tok, torch.full_like(tok, -1)).flatten(-2)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dense softmax attention where group g of query row t may read key s iff allowed[b, t, g, s].
    -> out [B, Tq, H, dv] in q's dtype, lse [B, H, Tq] in the compute dtype."""
    B, Tq, H, _ = q.shape
    Hkv = k.shape[2]
    ct = compute_dtype(q.dtype)
    G = H // Hkv
    kx = k.to(ct).repeat_interleave(G, dim=2)  # query head h reads KV head h // G
    vx = v.to(ct).repeat_interleave(G, dim=2)
    ok = allowed.repeat_interleave(G, dim=2).permute(0, 2, 1, 3)  # [B, H, Tq, Tk]
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), kx) * scale
    s = s.masked_fill(~ok, float("-inf"))
    # Softmax written out so fully masked rows follow the spec literally (0 output, -inf LSE).
    m = s.amax(-1) if s.shape[-1] > 0 else s.new_full((B, H, Tq), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # shift only; cancels exactly
    e = torch.exp(s - m[..., None])
    den = e.sum(-1)
    live = den > 0
    den_safe = torch.where(live, den, torch.ones_like(den))
    out = torch.einsum("bhqk,bkhd->bqhd", e / den_safe[..., None], vx)
    lse = torch.where(live, torch.log(den_safe) + m, torch.full_like(m, float("-inf")))
    return out.to(q.dtype), lse


def _finish(q: Tensor, k: Tensor, v: Tensor, sel: Tensor, scale: float, causal: bool,
            return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
    Tq, Tk = q.shape[1], k.shape[1]
    if causal:
        sel = sel & visible(Tq, Tk, (-1, 0), q.device)[None, :, None, :]
    out, lse = masked_attention(q, k, v, sel, scale)
    return (out, lse) if return_lse else out


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scale: float | None = None,
                               causal: bool = True, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Token-sparse attention; see attnzoo.ops.sparse.sparse_attention."""
    sc = check_sparse(q, k, v, indices, scale)
    return _finish(q, k, v, selection_mask(indices, k.shape[1]), sc, causal, return_lse)


def block_sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_size: int, *,
                                     scale: float | None = None, causal: bool = True,
                                     return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention; see attnzoo.ops.sparse.block_sparse_attention."""
    sc = check_sparse(q, k, v, block_indices, scale, block_size=block_size, what="block_sparse_attention")
    Tk = k.shape[1]
    nblk = -(-Tk // block_size)
    sel = selection_mask(block_indices, nblk).repeat_interleave(block_size, dim=-1)[..., :Tk]
    return _finish(q, k, v, sel, sc, causal, return_lse)
