"""Selectors: turn index-branch scores into the indices the select-then-attend ops consume.

All causal with bottom-right alignment (query i of Tq sits at key position a_i = i + Tk - Tq), all
vectorised torch, chunked over queries where a [Tq, Tk]-sized intermediate would otherwise be
multiplied by a head count. Selections are sets: slot order carries no meaning, -1 pads.
Sections: docs/mechanisms/sparse.md.

  DSA (DeepSeek-V3.2 / GLM-5, §3):  lightning_indexer_scores -> topk_indices
  MSA (MiniMax-M3, §5):             msa_block_scores -> msa_select_blocks
  NSA (§2):  nsa_compression_probs -> nsa_block_scores (paper) / nsa_block_scores_fla -> nsa_select_blocks
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_NEG_INF = float("-inf")
_POS_INF = float("inf")
_CHUNK_ELEMS = 1 << 24  # per-chunk [C, heads, Tk] intermediate, ~64 MB in fp32


def _step(per_query: int) -> int:
    """Queries per chunk so that a [C, per_query] intermediate stays near _CHUNK_ELEMS."""
    return max(1, _CHUNK_ELEMS // max(per_query, 1))


def _future(Tq: int, Tk: int, q0: int, q1: int, device: torch.device) -> Tensor:
    """Bool [q1 - q0, Tk]: key j is in the future of query i (j > i + Tk - Tq)."""
    a = torch.arange(q0, q1, device=device)[:, None] + (Tk - Tq)
    return torch.arange(Tk, device=device)[None, :] > a


# --------------------------------------------------------------------------------------------- DSA

def lightning_indexer_scores(q_idx: Tensor, k_idx: Tensor, weights: Tensor, *, scale: float,
                             causal: bool = True) -> Tensor:
    """DSA lightning indexer: I[b, t, s] = sum_h w[b, t, h] * ReLU(scale * q_idx[b, t, h] . k_idx[b, s]),
    and -inf for future keys s > t + Tk - Tq.

    q_idx [B, Tq, HI, dI], k_idx [B, Tk, dI] (one key shared by all indexer heads), weights [B, Tq, HI]
    used as given: transformers (and DeepSeek's reference) fold the HI**-0.5 factor into the weights in
    the caller (`weights_proj(x) * HI**-0.5`), and scale is dI**-0.5 there. Weights may be negative.
    Returns float32 [B, Tq, Tk] (float64 for float64 inputs). Chunked over queries: the per-head
    ReLU scores are [C, HI, Tk], never [Tq, HI, Tk]."""
    B, Tq, HI, dI = q_idx.shape
    Tk = k_idx.shape[1]
    if k_idx.shape != (B, Tk, dI) or weights.shape != (B, Tq, HI):
        raise ValueError(f"lightning_indexer_scores: want q_idx [B, Tq, HI, dI], k_idx [B, Tk, dI], weights "
                         f"[B, Tq, HI]; got {tuple(q_idx.shape)}, {tuple(k_idx.shape)}, {tuple(weights.shape)}")
    ct = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
    kt = k_idx.to(ct).transpose(1, 2)  # [B, dI, Tk]
    out = torch.empty(B, Tq, Tk, dtype=ct, device=q_idx.device)
    step = _step(B * HI * Tk)
    for q0 in range(0, Tq, step):
        q1 = min(Tq, q0 + step)
        qc = q_idx[:, q0:q1].to(ct).reshape(B, (q1 - q0) * HI, dI)
        s = torch.relu((qc @ kt) * scale).view(B, q1 - q0, HI, Tk)  # [B, C, HI, Tk]
        i = (weights[:, q0:q1].to(ct).unsqueeze(-2) @ s).squeeze(-2)  # sum_h w_h * s_h
        if causal:
            i = i.masked_fill(_future(Tq, Tk, q0, q1, q_idx.device), _NEG_INF)
        out[:, q0:q1] = i
    return out


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Top-k keys per row: [..., Tk] scores -> [..., k] int64, -1 where a row has fewer than k keys with a
    finite (or +inf) score, i.e. k_row = min(k, #valid). Ties between equal scores go to the lower key
    index (a stable sort): ReLU scoring makes exact ties common, and torch.topk breaks them differently
    for rows of different lengths, so the paged engine (rows padded to whole pages) would pick other keys
    than a contiguous pass."""
    if k < 0:
        raise ValueError(f"topk_indices: k must be >= 0, got {k}")
    kk = min(k, scores.shape[-1])
    vals, idx = scores.sort(dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :kk], idx[..., :kk]
    idx = idx.masked_fill(vals == _NEG_INF, -1)
    if kk < k:
        idx = F.pad(idx, (0, k - kk), value=-1)
    return idx


# --------------------------------------------------------------------------------------------- MSA

def msa_block_scores(q_idx: Tensor, k_idx: Tensor, block_size: int, *, local_blocks: int = 1) -> Tensor:
    """MiniMax-M3 index branch, one index head per GQA group:
        u[b, g, t, s] = q_idx[b, t, g] . k_idx[b, s]        (no scale, no ReLU), -inf for s > a_t
        U[b, g, t, n] = max_{s in block n} u[b, g, t, s]     blocks [n*bs, (n+1)*bs) from key 0, last partial
        U[b, g, t, n] = +inf for the local_blocks blocks ending at the query's own block a_t // bs
    q_idx [B, Tq, G, dI], k_idx [B, Tk, dI] -> U [B, G, Tq, ceil(Tk / bs)] float32 (float64 in)."""
    B, Tq, G, dI = q_idx.shape
    Tk = k_idx.shape[1]
    if k_idx.shape != (B, Tk, dI):
        raise ValueError(f"msa_block_scores: want q_idx [B, Tq, G, dI], k_idx [B, Tk, dI]; "
                         f"got {tuple(q_idx.shape)}, {tuple(k_idx.shape)}")
    nb = -(-Tk // block_size)
    ct = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
    kt = k_idx.to(ct).transpose(1, 2)
    out = torch.empty(B, G, Tq, nb, dtype=ct, device=q_idx.device)
    step = _step(B * G * Tk)
    for q0 in range(0, Tq, step):
        q1 = min(Tq, q0 + step)
        # one [G*C, dI] @ [dI, Tk] matmul per batch row (broadcasting kt over G would copy it G times)
        qc = q_idx[:, q0:q1].to(ct).transpose(1, 2).reshape(B, G * (q1 - q0), dI)
        u = (qc @ kt).view(B, G, q1 - q0, Tk)
        u = u.masked_fill(_future(Tq, Tk, q0, q1, q_idx.device), _NEG_INF)
        u = F.pad(u, (0, nb * block_size - Tk), value=_NEG_INF)
        out[:, :, q0:q1] = u.view(B, G, q1 - q0, nb, block_size).amax(-1)
    if local_blocks > 0:
        own = (torch.arange(Tq, device=q_idx.device) + Tk - Tq) // block_size  # [Tq]
        n = torch.arange(nb, device=q_idx.device)
        local = (n[None, :] <= own[:, None]) & (n[None, :] > own[:, None] - local_blocks)
        out = out.masked_fill(local, _POS_INF)
    return out


def msa_select_blocks(U: Tensor, topk_blocks: int) -> Tensor:
    """Top-k blocks per (query, group): U [B, G, Tq, nb] -> [B, Tq, G, topk_blocks] int64, -1 for slots
    whose block scored -inf (future or empty) and past the block count. Layout matches
    block_sparse_attention's block_indices (transformers returns [B, G, Tq, k])."""
    return topk_indices(U, topk_blocks).transpose(1, 2)


# --------------------------------------------------------------------------------------------- NSA

def nsa_compression_probs(q: Tensor, k_cmp: Tensor, *, l: int, d: int, scale: float | None = None,
                          kv_len: int | None = None) -> Tensor:
    """Compressed-attention probabilities p_cmp: softmax over the compressed keys a query may see.
    Compressed key i summarises raw keys [i*d, i*d + l); query at key position a sees it once the block is
    fully in the past, i*d + l - 1 <= a (fla's `(c+1)*bs - 1 <= t` when l = d). q [B, Tq, H, dk],
    k_cmp [B, Nc, Hkv, dk] -> [B, Tq, H, Nc]; a query that sees no block gets all zeros.
    kv_len: raw key count the queries are aligned to (bottom-right), default Tq."""
    B, Tq, H, dk = q.shape
    Nc, Hkv = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    sc = dk ** -0.5 if scale is None else scale
    # grouped einsum: each compressed key is read once for its G heads, never repeated G times
    s = torch.einsum("btgjd,bcgd->btgjc", q.to(ct).view(B, Tq, Hkv, G, dk), k_cmp.to(ct)).reshape(B, Tq, H, Nc) * sc
    a = torch.arange(Tq, device=q.device) + ((Tq if kv_len is None else kv_len) - Tq)
    ok = torch.arange(Nc, device=q.device)[None, :] * d + l - 1 <= a[:, None]  # [Tq, Nc]
    s = s.masked_fill(~ok[None, :, None, :], _NEG_INF)
    return torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # rows with no visible block -> 0


def nsa_block_scores(p_cmp: Tensor, *, G: int, l: int, d: int, l_sel: int, num_blocks: int | None = None,
                     reduce: str = "sum") -> Tensor:
    """NSA selection-block importance from compression probabilities (paper eq. 9, docs/mechanisms/sparse.md §2):
        p_slc[j] = sum_{m=0}^{l_sel/d - 1} sum_{n=0}^{l/d - 1} p_cmp[(l_sel/d) * j - m - n]   (out of range: 0)
    then GQA-consistent: summed (reduce="sum", paper) or averaged ("mean", fla) over each group's G heads.
    Needs l % d == 0 and l_sel % d == 0; l = l_sel = d gives p_slc = p_cmp. Note the paper's minus signs:
    with l=32, d=16, l_sel=64 block j pools compression blocks 4j-4 .. 4j, i.e. raw keys [64j - 64, 64j + 32),
    which reach back into block j-1; we implement the formula as published.
    p_cmp [B, Tq, H, Nc] -> [B, Tq, H / G, num_blocks]; num_blocks defaults to the selection blocks the
    compressed keys cover, ceil(((Nc - 1) * d + l) / l_sel); pass ceil(Tk / l_sel) to cover every key."""
    if l % d or l_sel % d:
        raise ValueError(f"nsa_block_scores: l ({l}) and l_sel ({l_sel}) must be multiples of d ({d})")
    B, Tq, H, Nc = p_cmp.shape
    if H % G:
        raise ValueError(f"nsa_block_scores: heads ({H}) must be a multiple of G ({G})")
    r, c = l_sel // d, l // d
    nsel = -(-((Nc - 1) * d + l) // l_sel) if num_blocks is None else num_blocks
    # p_slc[j] = sum_o mult(o) * p_cmp[r*j - o], o = m + n in [0, r + c - 2], mult(o) = #{(m, n): m + n = o}:
    # r + c - 1 strided slices of a zero-padded p_cmp (a banded sum, never an [nsel, Nc] matrix).
    lo = r + c - 2
    hi = max(0, r * (nsel - 1) + 1 - Nc)
    pp = F.pad(p_cmp, (lo, hi))
    p_slc = p_cmp.new_zeros(B, Tq, H, nsel)
    for o in range(r + c - 1):
        mult = sum(1 for m in range(r) if 0 <= o - m < c)
        p_slc = p_slc + mult * pp[..., lo - o: lo - o + r * (nsel - 1) + 1: r]
    p_slc = p_slc.view(B, Tq, H // G, G, nsel)
    if reduce == "sum":
        return p_slc.sum(3)
    if reduce == "mean":
        return p_slc.mean(3)
    raise ValueError(f"nsa_block_scores: reduce must be 'sum' or 'mean', got {reduce!r}")


def nsa_block_scores_fla(p_cmp: Tensor, *, G: int) -> Tensor:
    """fla's simplified NSA (docs/mechanisms/sparse.md §2): l = d = l_sel (mean-pooled non-overlapping
    blocks), so the selection score of block j is p_cmp[j], averaged over the group's heads.
    [B, Tq, H, Nc] -> [B, Tq, H / G, Nc]."""
    return nsa_block_scores(p_cmp, G=G, l=1, d=1, l_sel=1, num_blocks=p_cmp.shape[-1], reduce="mean")


def nsa_select_blocks(scores: Tensor, n: int, *, block_size: int, kv_len: int | None = None,
                      initial_blocks: int = 1, local_blocks: int = 2) -> Tensor:
    """Top-n selection blocks per (query, group) with the forced ones counted in n:
    blocks 0 .. initial_blocks-1 and the local_blocks blocks ending at the query's own block a // bs
    (own + previous for the paper's 2) score +inf; blocks after the own block are causally empty (-inf).
    scores [B, Tq, Hkv, nsel] -> [B, Tq, Hkv, n] int64, -1 for unused slots. Blocks with score 0 that are
    not in the future are still eligible (fla does the same). kv_len as in nsa_compression_probs."""
    B, Tq, Hkv, nsel = scores.shape
    a = torch.arange(Tq, device=scores.device) + ((Tq if kv_len is None else kv_len) - Tq)
    own = (a // block_size)[:, None]  # [Tq, 1]
    j = torch.arange(nsel, device=scores.device)[None, :]
    forced = (j < initial_blocks) | ((j <= own) & (j > own - local_blocks))
    s = scores.masked_fill(forced[None, :, None, :], _POS_INF)
    s = s.masked_fill((j > own)[None, :, None, :], _NEG_INF)
    return topk_indices(s, n)
