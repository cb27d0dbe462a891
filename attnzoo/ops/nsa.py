"""Native Sparse Attention (DeepSeek, arXiv 2502.11089; docs/mechanisms/sparse.md §2): pure tensor functions.

Three branches per query t and head h, each a softmax attention over its own keys/values, mixed by gates
in (0, 1) (one per branch and head, not normalised):

    o[t,h] = g_cmp * Attn(q, K~cmp, V~cmp) + g_slc * Attn(q, K_slc[selected blocks]) + g_win * Attn(q, K_win[t-w+1..t])

* compression: blocks of `l` tokens with stride `d` (overlapping when d < l), each reduced to one key/value
  by a compressor (an MLP with intra-block position embeddings in the paper: it has parameters, so it
  lives in the layer; mean pooling in fla's simplified variant). Block i is visible to query t iff it lies
  wholly in the past, `i*d + l <= t + 1` (fla with l = d: `(c+1)*bs - 1 <= t`, the same rule).
* selection: the sequence is cut into blocks of `l_sel` tokens; block importance is read off the
  compression probabilities (paper eq. 9), summed (paper) or averaged (fla) over the GQA group, so all
  heads of a group read the same `n` blocks; block 0 and the two local blocks (the query's own and the
  previous one) are always kept and count toward n. Inside the blocks attention is causal.
* sliding window: the last `window` keys including the query (flash-attn window (window-1, 0)).

Layout [B, T, H, d] (flash-attn / fla); GQA: query head h reads KV head h // G. Sequence-relative
positions: block boundaries are counted from each sequence's first token. `nsa` also takes packed
sequences (`cu_seqlens`); the compressed keys are then packed per sequence, see `compressed_cu_seqlens`.

`nsa_reference` is an independent float64 token-by-token loop written from the paper's equations (the
oracle of the paper mode; fla's `naive_nsa` is the oracle of the fla mode, in the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnzoo.ops import backend as _backend
from attnzoo.ops.attention import attention
from attnzoo.ops.sparse import TRITON as _SPARSE_TRITON
from attnzoo.ops.sparse.select import nsa_block_scores, nsa_compression_probs, nsa_select_blocks

_NEG_INF = float("-inf")


def _ct(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float32 for half inputs, else the input's (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _positions(t: Tensor | None, T: int, device: torch.device) -> Tensor:
    return torch.arange(T, device=device) if t is None else t.to(device=device, dtype=torch.long)


def num_compressed_blocks(T: int, l: int, d: int) -> int:
    """Complete compression blocks in a sequence of T tokens: i with i*d + l <= T."""
    return 0 if T < l else (T - l) // d + 1


def compressed_cu_seqlens(cu_seqlens: Tensor, l: int, d: int) -> Tensor:
    """Offsets of each sequence's compressed tokens when they are packed like the raw tokens (int32)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [num_compressed_blocks(int(n), l, d) for n in lens]
    out = torch.zeros(len(counts) + 1, dtype=torch.int32, device=cu_seqlens.device)
    out[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
    return out


def nsa_compress_keys(k: Tensor, l: int, d: int, mode: str = "mean", cu_seqlens: Tensor | None = None) -> Tensor:
    """Cut keys (or values) into the complete compression blocks `[i*d, i*d + l)` (stride d, length l).

    k [B, T, H, dk] -> mode "mean": [B, Nc, H, dk], the mean of each block (fla's mean pooling when
    l == d; fla also emits a trailing partial block, which no query can see, so it is dropped here);
    mode "blocks": [B, Nc, H, l, dk], the raw blocks, the input of a learned compressor.
    Nc = num_compressed_blocks(T, l, d). Packed input [total, H, dk] (or [1, total, H, dk]) with
    cu_seqlens: blocks never cross sequences; the output is packed by `compressed_cu_seqlens`.
    """
    if mode not in ("mean", "blocks"):
        raise ValueError(f"nsa_compress_keys: mode must be 'mean' or 'blocks', got {mode!r}")
    if d < 1 or l < 1:
        raise ValueError(f"nsa_compress_keys: need l >= 1 and d >= 1, got l={l}, d={d}")
    if cu_seqlens is not None:
        squeeze = k.dim() == 3
        kk = k if squeeze else k[0]
        cu = cu_seqlens.tolist()
        parts = [nsa_compress_keys(kk[a:b].unsqueeze(0), l, d, mode)[0] for a, b in zip(cu, cu[1:])]
        out = torch.cat(parts, 0) if parts else kk.new_zeros(0, *kk.shape[1:])
        return out if squeeze else out.unsqueeze(0)
    B, T, H, dk = k.shape
    nc = num_compressed_blocks(T, l, d)
    if nc == 0:
        blocks = k.new_zeros(B, 0, H, l, dk)
    else:
        # unfold: [B, Nc, H, dk, l] (a strided view), slot j of block i is token i*d + j
        blocks = k.unfold(1, l, d).transpose(-1, -2)
    if mode == "blocks":
        return blocks
    return blocks.mean(3)


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


def selection_weights(num_cmp: int, num_sel: int, l: int, d: int, l_sel: int,
                      device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [Nc, NS] with p_slc = p_cmp @ W, the paper's eq. 9:
    p_slc[j] = sum_{m < l_sel/d} sum_{n < l/d} p_cmp[(l_sel/d) * j - m - n] (out-of-range indices ignored).
    With l == d == l_sel this is the identity (fla)."""
    if l % d or l_sel % d:
        raise ValueError(f"NSA selection scores need l % d == 0 and l_sel % d == 0 (got l={l}, d={d}, l_sel={l_sel})")
    r, c = l_sel // d, l // d
    w = torch.zeros(num_cmp, num_sel, dtype=dtype, device=device)
    j = torch.arange(num_sel, device=device)
    for m in range(r):
        for n in range(c):
            i = r * j - m - n
            ok = (i >= 0) & (i < num_cmp)
            w[i[ok], j[ok]] += 1
    return w


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


def _compressed_triton(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, *, l: int, d: int, scale: float,
                       t: Tensor) -> Tensor:
    """The compression branch on the token-sparse Triton kernel (forward and backward): each query's index
    row names the compressed blocks complete in its past (-1 elsewhere), so no mask and no Python loop;
    a query that sees no block outputs 0, as in `nsa_compressed_attention`."""
    from attnzoo.ops.sparse.triton_kernels import sparse_attention_triton
    B, T, Hkv, Nc = q.shape[0], q.shape[1], k_cmp.shape[2], k_cmp.shape[1]
    if Nc == 0:
        return q.new_zeros(*q.shape[:3], v_cmp.shape[-1])
    i = torch.arange(Nc, device=q.device)
    rows = torch.where(i[None, :] * d + l - 1 <= t[:, None], i, -1).to(torch.int32)  # [T, Nc]
    return sparse_attention_triton(q, k_cmp, v_cmp, rows[None, :, None].expand(B, T, Hkv, Nc), scale=scale,
                                   causal=False)


def _nsa_dense(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, l, d, l_sel, n, window,
               scale, reduce, impl, form):
    Hkv, T, Tk = k_slc.shape[2], q.shape[1], k_slc.shape[1]
    G = q.shape[2] // Hkv
    # queries are the last T of the Tk positions (T == Tk in one pass; a cache's new tokens otherwise)
    t = torch.arange(Tk - T, Tk, device=q.device)
    if form == "triton":
        o_cmp = _compressed_triton(q, k_cmp, v_cmp, l=l, d=d, scale=scale, t=t)
        with torch.no_grad():  # the scores read the probabilities again: [B, T, H, Nc], one matmul
            p_cmp = nsa_compression_probs(q.detach(), k_cmp.detach(), l=l, d=d, scale=scale, kv_len=Tk)
    else:
        o_cmp, p_cmp = nsa_compressed_attention(q, k_cmp, v_cmp, l=l, d=d, scale=scale, t=t)
    with torch.no_grad():  # the selection is discrete: no gradient through the scores (as in the paper)
        scores = nsa_block_scores(p_cmp.detach(), G=G, l=l, d=d, l_sel=l_sel, reduce=reduce,
                                  num_blocks=-(-k_slc.shape[1] // l_sel))
        # block 0, the own block and the previous one are forced (they count toward n)
        idx = nsa_select_blocks(scores, n, block_size=l_sel, kv_len=Tk, initial_blocks=1, local_blocks=2)
    if form == "triton":
        from attnzoo.ops.sparse.triton_kernels import block_sparse_attention_triton
        o_slc = block_sparse_attention_triton(q, k_slc, v_slc, idx, l_sel, scale=scale, causal=True)
    else:
        o_slc = nsa_selected_attention(q, k_slc, v_slc, idx, l_sel, scale, impl=impl)
    o = g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc
    if window:
        # the attention family resolves its own backend: the flash Triton kernel on CUDA
        o_win = attention(q, k_win, v_win, causal=True, window_size=(window - 1, 0), scale=scale,
                          backend="triton" if form == "triton" else None)
        o = o + g_win.unsqueeze(-1) * o_win
    return o.to(q.dtype), idx


def nsa(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor | None,
        v_win: Tensor | None, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor | None, *, l: int, d: int, l_sel: int,
        n: int, window: int | None, scale: float | None = None, reduce: str = "sum",
        cu_seqlens: Tensor | None = None, return_block_indices: bool = False, impl: str = "auto",
        backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The three NSA branches mixed by their gates.

    q [B, T, H, dk]; k_cmp/v_cmp [B, Nc, Hkv, dk/dv] the compressed keys/values (block i = tokens
    [i*d, i*d + l), e.g. from `nsa_compress_keys` or a learned compressor); k_slc/v_slc and k_win/v_win
    [B, Tk, Hkv, dk/dv] the raw keys/values of the selection and window branches (pass the same tensors
    for fla's shared-K/V form), Tk >= T: the queries are the last T positions (bottom-right, as a cache's
    new tokens); gates [B, T, H]. window: keys per query including itself; None or 0 drops
    the window branch (fla's window_size=0). reduce: "sum" (paper) or "mean" (fla) over the group.
    Packed sequences: q, k_slc, ... [total, ...] (or [1, total, ...]) with cu_seqlens [N+1], and
    k_cmp/v_cmp packed by `compressed_cu_seqlens(cu_seqlens, l, d)`.
    Returns o [B, T, H, dv] in q's dtype, and with return_block_indices the selection [B, T, Hkv, n].
    backend (the sparse family's, attnzoo.ops.backend; env ATTNZOO_SPARSE_BACKEND): "torch" (dense masks or
    gathers, `impl`) or "triton": the compression branch on the token-sparse kernel, the selection branch
    on the block-sparse kernel and the window on the flash kernel, forward and backward (the default for
    CUDA tensors). float64 always runs "torch" (an oracle dtype).
    """
    form = _backend.resolve("sparse", backend, q, ("torch",), _SPARSE_TRITON)
    if q.dtype == torch.float64:
        form = "torch"
    kw = dict(l=l, d=d, l_sel=l_sel, n=n, window=window, scale=q.shape[-1] ** -0.5 if scale is None else scale,
              reduce=reduce, impl=impl, form=form)
    if window and (k_win is None or v_win is None or g_win is None):
        raise ValueError("nsa: the window branch needs k_win, v_win and g_win (or window=None)")
    if cu_seqlens is None:
        o, idx = _nsa_dense(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, **kw)
        return (o, idx) if return_block_indices else o
    squeeze = q.dim() == 3
    if not squeeze:  # [1, total, ...] -> [total, ...]
        if q.shape[0] != 1:
            raise ValueError(f"nsa: packed inputs must be [total, H, d] or [1, total, H, d], got {tuple(q.shape)}")
        q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win = (
            None if x is None else x[0] for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win))
    cu = cu_seqlens.tolist()
    ccu = compressed_cu_seqlens(cu_seqlens, l, d).tolist()
    if k_cmp.shape[0] != ccu[-1]:
        raise ValueError(f"nsa: {k_cmp.shape[0]} packed compressed keys, expected {ccu[-1]} "
                         f"(compressed_cu_seqlens(cu_seqlens, l={l}, d={d}))")
    xs = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win)
    # sequences of equal length run as one batch (a training step packs a few lengths, not one per sequence)
    groups: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        if b > a:
            groups.setdefault(b - a, []).append(i)
    outs, idxs, perm = [], [], []
    for L, seqs in groups.items():
        nc = ccu[seqs[0] + 1] - ccu[seqs[0]]
        if len(groups) == 1 and len(seqs) == len(cu) - 1:  # one length: the packed stream is a batch
            args = [None if x is None else x.reshape(len(seqs), (nc if j in (1, 2) else L), *x.shape[1:])
                    for j, x in enumerate(xs)]
        else:
            rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in seqs]).to(q.device)
            crow = torch.cat([torch.arange(ccu[i], ccu[i + 1]) for i in seqs]).to(q.device)
            perm.append(rows)
            args = [None if x is None else x[crow if j in (1, 2) else rows].view(len(seqs), -1, *x.shape[1:])
                    for j, x in enumerate(xs)]
        o_g, idx_g = _nsa_dense(*args, **kw)
        outs.append(o_g.flatten(0, 1))
        idxs.append(idx_g.flatten(0, 1))
    if not outs:
        o, idx = q.new_zeros(0, q.shape[1], v_slc.shape[-1]), torch.zeros(0, k_slc.shape[1], n, dtype=torch.long)
    elif not perm:
        o, idx = outs[0], idxs[0]
    else:  # back to the packed order (index_copy is differentiable)
        order = torch.cat(perm)
        o = torch.cat(outs).new_empty(q.shape[0], *outs[0].shape[1:]).index_copy(0, order, torch.cat(outs))
        idx = torch.cat(idxs).new_empty(q.shape[0], *idxs[0].shape[1:]).index_copy(0, order, torch.cat(idxs))
    if not squeeze:
        o, idx = o.unsqueeze(0), idx.unsqueeze(0)
    return (o, idx) if return_block_indices else o


def nsa_reference(q: Tensor, k_cmp_raw: Tensor, v_cmp_raw: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor,
                  v_win: Tensor, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor, *,
                  compress_k: Callable[[Tensor], Tensor], compress_v: Callable[[Tensor], Tensor],
                  l: int, d: int, l_sel: int, n: int, window: int, scale: float | None = None,
                  return_block_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """NSA token by token in float64, straight from the paper's equations (§3.3, eqs. 5-11); the oracle
    of the paper mode. Shares no code with the functions above.

    q [B, T, H, dk]; k_cmp_raw/v_cmp_raw [B, T, Hkv, dk/dv]: the compression branch's *raw* per-token
    keys/values; compress_k / compress_v map one block [l, Hkv, dk] (tokens i*d .. i*d+l-1) to one
    compressed key [Hkv, dk] (phi, intra-block position embedding included); k_slc/v_slc, k_win/v_win the
    other branches' raw keys/values; gates [B, T, H]. Differentiable (plain autograd through the loop).
    Selection per (t, group): eq. 9 scores, summed over the group's heads (eq. 10), block 0 + the own and
    previous blocks forced, the rest by decreasing score; with return_block_indices also the selected
    blocks [B, T, Hkv, n], each row sorted ascending, -1 padded.
    """
    f64 = torch.float64
    q, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win = (
        x.to(f64) for x in (q, k_cmp_raw, v_cmp_raw, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win))
    B, T, H, dk = q.shape
    Hkv = k_slc.shape[2]
    G = H // Hkv
    scale = dk ** -0.5 if scale is None else scale

    def attend(qv: Tensor, keys: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
        """softmax(scale * keys @ q) @ vals for one query vector; (output, probabilities)."""
        if keys.shape[0] == 0:
            return vals.new_zeros(vals.shape[-1]), vals.new_zeros(0)
        p = torch.softmax(keys @ qv * scale, 0)
        return p @ vals, p

    rows, sel_rows = [], []
    for b in range(B):
        # compressed tokens (eq. 7): block i covers tokens i*d + 1 .. i*d + l (1-based), i = 0 .. floor((T-l)/d)
        kc, vc = [], []
        i = 0
        while i * d + l <= T:
            kc.append(compress_k(k_cmp_raw[b, i * d:i * d + l]).to(f64))
            vc.append(compress_v(v_cmp_raw[b, i * d:i * d + l]).to(f64))
            i += 1
        for t in range(T):
            nv = 0 if t + 1 < l else (t + 1 - l) // d + 1  # compressed tokens complete at t
            out_t = []
            for hk in range(Hkv):
                kcs = torch.stack([kc[i][hk] for i in range(nv)]) if nv else q.new_zeros(0, dk)
                vcs = torch.stack([vc[i][hk] for i in range(nv)]) if nv else q.new_zeros(0, v_cmp_raw.shape[-1])
                o_c, p_c = [], []
                for h in range(hk * G, (hk + 1) * G):
                    o, p = attend(q[b, t, h], kcs, vcs)
                    o_c.append(o)
                    p_c.append(p.detach())
                # eqs. 9-10: p_slc'[j] = sum_h sum_m sum_n p_cmp^h[(l'/d) j - m - n]
                own = t // l_sel
                score = {}
                for j in range(own + 1):
                    tot = 0.0
                    for p in p_c:
                        for m in range(l_sel // d):
                            for nn_ in range(l // d):
                                ix = (l_sel // d) * j - m - nn_
                                if 0 <= ix < nv:
                                    tot += float(p[ix])
                    score[j] = tot
                forced = sorted({0, own, max(own - 1, 0)})
                rest = sorted((j for j in score if j not in forced), key=lambda j: -score[j])
                chosen = sorted((forced + rest)[:n])
                sel_rows.append(chosen + [-1] * (n - len(chosen)))
                toks = [s for j in chosen for s in range(j * l_sel, (j + 1) * l_sel) if s <= t]
                toks_t = torch.tensor(toks, dtype=torch.long)
                win = torch.arange(max(0, t - window + 1), t + 1)
                for gi, h in enumerate(range(hk * G, (hk + 1) * G)):
                    o_s, _ = attend(q[b, t, h], k_slc[b, toks_t, hk], v_slc[b, toks_t, hk])
                    o_w, _ = attend(q[b, t, h], k_win[b, win, hk], v_win[b, win, hk])
                    out_t.append(g_cmp[b, t, h] * o_c[gi] + g_slc[b, t, h] * o_s + g_win[b, t, h] * o_w)
            rows.append(torch.stack(out_t))
    o = torch.stack(rows).view(B, T, H, -1)
    if return_block_indices:
        return o, torch.tensor(sel_rows, dtype=torch.long).view(B, T, Hkv, n)
    return o
