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

Modules: compress.py (the compression blocks), torch_impl.py (the compression and selection branches in
PyTorch), reference.py (`nsa_reference`, an independent float64 token loop from the paper's equations, the
oracle of the paper mode; fla's `naive_nsa` is the oracle of the fla mode, in the tests). Here: `nsa`, the
three branches mixed, in the form the sparse family's backend picks: "torch", or "triton" (the token- and
block-sparse kernels of attnzoo.ops.sparse.triton_kernels and the flash kernel; NSA has no kernels of its own).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.ops import backend as _backend
from attnzoo.ops.attention import attention
from attnzoo.ops.nsa.compress import compressed_cu_seqlens, nsa_compress_keys, num_compressed_blocks
from attnzoo.ops.nsa.reference import nsa_reference, selection_weights
from attnzoo.ops.nsa.torch_impl import nsa_compressed_attention, nsa_selected_attention
from attnzoo.ops.sparse import TRITON as _SPARSE_TRITON
from attnzoo.ops.sparse.select import nsa_block_scores, nsa_compression_probs, nsa_select_blocks

__all__ = ["compressed_cu_seqlens", "nsa", "nsa_compress_keys", "nsa_compressed_attention", "nsa_reference",
           "nsa_selected_attention", "num_compressed_blocks", "selection_weights"]


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
