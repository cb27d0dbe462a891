"""NSA's attention branches in PyTorch: the compression branch (dense scores over the compressed blocks, with
the probabilities the selection reads) and the selection branch (gathered keys, or dense scores with a block
mask). The window branch is plain windowed attention (attnzoo.ops.attention)."""

from __future__ import annotations

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def _ct(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float32 for half inputs, else the input's (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _positions(t: Tensor | None, T: int, device: torch.device) -> Tensor:
    return torch.arange(T, device=device) if t is None else t.to(device=device, dtype=torch.long)


def nsa_compressed_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, *, l: int, d: int,
                             scale: float | None = None, t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of every query over the compressed blocks complete in its past.

    q [B, T, H, dk], k_cmp [B, Nc, Hkv, dk], v_cmp [B, Nc, Hkv, dv] (block i = tokens [i*d, i*d + l)).
    Query t (positions `t` [T], default 0..T-1) sees block i iff i*d + l <= t + 1. Rows that see no block
    output 0 (and their probabilities are all 0). Returns (o [B, T, H, dv] in q's dtype,
    p_cmp [B, T, H, Nc] the softmax probabilities in the compute dtype: float32, float64 for float64).
    """
    B, T, H, dk = q.shape
    Nc, Hkv, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    if H % Hkv:
        raise ValueError(f"nsa_compressed_attention: {H} query heads not a multiple of {Hkv} KV heads")
    G = H // Hkv
    scale = dk ** -0.5 if scale is None else scale
    ct = _ct(q.dtype)
    pos = _positions(t, T, q.device)
    vis = (torch.arange(Nc, device=q.device) * d + l)[None, :] <= pos[:, None] + 1  # [T, Nc]
    dead = ~vis.any(-1, keepdim=True)  # [T, 1]
    qg = q.to(ct).reshape(B, T, Hkv, G, dk).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, dk)
    s = (qg @ k_cmp.to(ct).permute(0, 2, 3, 1)).view(B, Hkv, G, T, Nc) * scale
    # dead rows see everything (finite softmax, no NaN in backward) and are then zeroed
    s = s.masked_fill(~(vis | dead), _NEG_INF)
    p = torch.softmax(s, -1).masked_fill(~vis, 0.0)
    o = p.view(B, Hkv, G * T, Nc) @ v_cmp.to(ct).transpose(1, 2)  # [B, Hkv, G*T, dv]
    o = o.view(B, Hkv, G, T, dv).permute(0, 3, 1, 2, 4).reshape(B, T, H, dv)
    return o.to(q.dtype), p.permute(0, 3, 1, 2, 4).reshape(B, T, H, Nc)


def _selected_gather(qg: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, l_sel: int, scale: float,
                     pos: Tensor) -> Tensor:
    """qg [B, Hkv, T, G, dk] against the n*l_sel gathered keys of each query. -> [B, Hkv, T, G, dv]."""
    B, Hkv, T, G, dk = qg.shape
    Tk, dv = k.shape[1], v.shape[-1]
    n = block_indices.shape[-1]
    tok = (block_indices.unsqueeze(-1) * l_sel + torch.arange(l_sel, device=k.device)).flatten(-2)  # [B,T,Hkv,nl]
    valid = (block_indices >= 0).repeat_interleave(l_sel, -1) & (tok <= pos[None, :, None, None]) & (tok < Tk)
    tok = tok.clamp(0, Tk - 1).permute(0, 2, 1, 3)  # [B, Hkv, T, nl]
    valid = valid.permute(0, 2, 1, 3).unsqueeze(3)  # [B, Hkv, T, 1, nl]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, Tk, d]
    nl = n * l_sel
    # chunk the queries so one gathered K/V chunk stays around 2^24 elements (forward memory)
    step = max(1, (1 << 24) // max(1, B * Hkv * nl * max(dk, dv)))
    outs = []
    for a in range(0, T, step):
        b = min(T, a + step)
        ix = tok[:, :, a:b].reshape(B, Hkv, -1, 1)
        kg = kt.gather(2, ix.expand(-1, -1, -1, dk)).view(B, Hkv, b - a, nl, dk)
        vg = vt.gather(2, ix.expand(-1, -1, -1, dv)).view(B, Hkv, b - a, nl, dv)
        s = (qg[:, :, a:b] @ kg.transpose(-1, -2)) * scale  # [B, Hkv, c, G, nl]
        ok = valid[:, :, a:b]
        dead = ~ok.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~(ok | dead), _NEG_INF), -1).masked_fill(~ok, 0.0)
        outs.append(p @ vg)
    return torch.cat(outs, 2)


def _selected_mask(qg: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, l_sel: int, scale: float,
                   pos: Tensor) -> Tensor:
    """Same as _selected_gather, as dense attention over all Tk keys with a block mask (cheaper when
    Tk <= n * l_sel: no copies, Tk instead of n*l_sel scores per query)."""
    B, Hkv, T, G, dk = qg.shape
    Tk = k.shape[1]
    ns = -(-Tk // l_sel)
    bi = block_indices.masked_fill((block_indices < 0) | (block_indices >= ns), ns)
    sel = torch.zeros(*bi.shape[:-1], ns + 1, dtype=torch.bool, device=k.device).scatter_(-1, bi, True)[..., :ns]
    ok = sel.repeat_interleave(l_sel, -1)[..., :Tk] & (torch.arange(Tk, device=k.device) <= pos[:, None])[None, :, None]
    ok = ok.permute(0, 2, 1, 3).unsqueeze(3)  # [B, Hkv, T, 1, Tk]
    dead = ~ok.any(-1, keepdim=True)
    s = (qg.reshape(B, Hkv, T * G, dk) @ k.permute(0, 2, 3, 1)).view(B, Hkv, T, G, Tk) * scale
    p = torch.softmax(s.masked_fill(~(ok | dead), _NEG_INF), -1).masked_fill(~ok, 0.0)
    return (p.view(B, Hkv, T * G, Tk) @ v.transpose(1, 2)).view(B, Hkv, T, G, -1)


def nsa_selected_attention(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, l_sel: int,
                           scale: float | None = None, *, t: Tensor | None = None, impl: str = "auto") -> Tensor:
    """Attention of each query over the tokens of its selected blocks, causal (s <= t).

    q [B, T, H, dk], k [B, Tk, Hkv, dk], v [B, Tk, Hkv, dv], block_indices [B, T, Hkv, n] (-1 = empty;
    distinct per row: a repeated block would count twice in "gather"); the G query heads of a group share
    their KV head's blocks. Query positions `t` default to the last T of the Tk keys (bottom-right).
    A row with no visible token outputs 0. impl: "gather" (n*l_sel gathered keys per query, chunked over
    queries), "mask" (dense scores with a block mask) or "auto" ("mask" when Tk <= n*l_sel).
    Returns [B, T, H, dv] in q's dtype.
    """
    B, T, H, dk = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"nsa_selected_attention: {H} query heads not a multiple of {Hkv} KV heads")
    if block_indices.shape[:3] != (B, T, Hkv):
        raise ValueError(f"nsa_selected_attention: block_indices {tuple(block_indices.shape)} must be "
                         f"[B, T, Hkv, n] = [{B}, {T}, {Hkv}, n]")
    G = H // Hkv
    scale = dk ** -0.5 if scale is None else scale
    pos = torch.arange(Tk - T, Tk, device=q.device) if t is None else t.to(q.device, torch.long)
    n = block_indices.shape[-1]
    if impl == "auto":
        impl = "mask" if Tk <= n * l_sel else "gather"
    if impl not in ("gather", "mask"):
        raise ValueError(f"nsa_selected_attention: impl must be 'auto', 'gather' or 'mask', got {impl!r}")
    ct = _ct(q.dtype)
    qg = q.to(ct).view(B, T, Hkv, G, dk).transpose(1, 2)  # [B, Hkv, T, G, dk]
    fn = _selected_mask if impl == "mask" else _selected_gather
    o = fn(qg, k.to(ct), v.to(ct), block_indices.long(), l_sel, scale, pos)  # [B, Hkv, T, G, dv]
    return o.transpose(1, 2).reshape(B, T, H, -1).to(q.dtype)
