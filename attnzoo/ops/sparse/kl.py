"""KL losses that align an index branch with the main attention (teacher -> student), plain PyTorch.

DSA (DeepSeek-V3.2; docs/mechanisms/sparse.md §8):
    p_t = normalize_L1( sum_h P_h[t, :] )  over the allowed keys (causal; sparse stage: & selected S_t)
    L_I = sum_t KL( p_t || softmax_s(I[t, s]) )   (student softmax over the same allowed keys)
  dense warm-up: selected=None (all causal keys); sparse training: selected = the top-k set.
MSA (MiniMax-M3), per group g of G query heads:
    P_T[g, t] = mean_{h in g} softmax_{M(g,t)}( q_h[t] . k_g[s] * scale )      M = selected blocks & causal
    P_S[g, t] = softmax_{M(g,t)}( q_I[t, g] . k_I[s] * dI**-0.5 )
    L = loss_coeff / (HI * total_q) * sum_{g,t} KL(P_T || P_S)       =>  d logits_S = (P_S - P_T) * that factor

The teacher is always detached here (the main model must not learn from the indexer's loss). Detaching
the indexer's *input* (DSA: the indexer learns only from L_I, the main model only from the LM loss) is
the caller's job: compute q_I / k_I / weights from x.detach(). Rows whose allowed set is empty
contribute 0. Memory is O(Tq * Tk) per head group: a reference-grade loss for training-sized tests,
not a long-context kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.ops.attention.reference import visible
from attnzoo.ops.sparse.reference import selection_mask

_NEG_INF = float("-inf")


def kl_rows(target: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """KL(target || softmax(logits restricted to mask)) per row, summed over the last axis.
    target must be a distribution supported on mask (zero elsewhere); 0 log 0 = 0; empty rows give 0."""
    nonempty = mask.any(-1, keepdim=True)
    z = logits.masked_fill(~mask, _NEG_INF)
    z = torch.where(nonempty, z, torch.zeros_like(z))  # empty row: any finite logits; its target is 0
    logq = torch.log_softmax(z, dim=-1)
    logq = torch.where(mask, logq, torch.zeros_like(logq))  # no 0 * -inf
    return (torch.xlogy(target, target) - target * logq).sum(-1)


def _normalize(p: Tensor) -> Tensor:
    den = p.sum(-1, keepdim=True)
    return p / torch.where(den > 0, den, torch.ones_like(den))


def _allowed(B: int, Tq: int, Tk: int, selected: Tensor | None, causal: bool, device: torch.device) -> Tensor:
    ok = torch.ones(B, Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        ok = ok & visible(Tq, Tk, (-1, 0), device)[None]
    if selected is not None:
        sel = selected if selected.dtype == torch.bool else selection_mask(selected, Tk)
        if sel.shape != (B, Tq, Tk):
            raise ValueError(f"selected must be a bool mask [B, Tq, Tk] or indices [B, Tq, K]; got {tuple(selected.shape)}")
        ok = ok & sel
    return ok


@torch.no_grad()
def attention_probs(q: Tensor, k: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Softmax probabilities of every query head over the allowed keys.
    q [B, Tq, H, d], k [B, Tk, Hkv, d], allowed [B, Tq, Hkv, Tk] (per group) or [B, Tq, Tk] (shared)
    -> [B, Tq, H, Tk] (rows with no allowed key are 0). Computed in float64/float32, never with grad."""
    B, Tq, H, d = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bthd,bshd->bths", q.to(ct), k.to(ct).repeat_interleave(G, dim=2)) * scale
    ok = allowed[:, :, None] if allowed.dim() == 3 else allowed.repeat_interleave(G, dim=2)
    s = s.masked_fill(~ok, _NEG_INF)
    return torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)


def indexer_kl_loss(index_scores: Tensor, *, main_probs: Tensor | None = None, q: Tensor | None = None,
                    k: Tensor | None = None, scale: float | None = None, selected: Tensor | None = None,
                    causal: bool = True) -> Tensor:
    """DSA indexer loss L_I = sum_{b,t} KL(p_t || softmax(I[t, allowed])) (module docstring).

    index_scores [B, Tq, Tk]: the indexer's I (lightning_indexer_scores; -inf entries are fine).
    Teacher, one of:
      main_probs [B, H, Tq, Tk] (summed over heads here) or [B, Tq, Tk] (already summed): the main
        attention's probabilities; restricted to the allowed keys and L1-normalised;
      q [B, Tq, H, d], k [B, Tk, Hkv, d] (MLA: the absorbed MQA form, Hkv = 1): the main attention is
        recomputed over the allowed keys (in the sparse stage that *is* the sparse attention).
    selected: None (dense warm-up: every causal key) or the selected set as bool [B, Tq, Tk] or indices
    [B, Tq, K] (-1 = unused) for the sparse stage. Returns a scalar (sum over batch and queries)."""
    B, Tq, Tk = index_scores.shape
    ok = _allowed(B, Tq, Tk, selected, causal, index_scores.device)
    if main_probs is not None:
        p = main_probs.detach()
        p = p.sum(1) if p.dim() == 4 else p
        if p.shape != (B, Tq, Tk):
            raise ValueError(f"main_probs must be [B, H, Tq, Tk] or [B, Tq, Tk] = [{B}, {Tq}, {Tk}]; got "
                             f"{tuple(main_probs.shape)}")
    elif q is not None and k is not None:
        sc = q.shape[-1] ** -0.5 if scale is None else scale
        p = attention_probs(q, k, ok, sc).sum(2)
    else:
        raise ValueError("indexer_kl_loss: pass main_probs, or q and k of the main attention")
    target = _normalize(p.to(index_scores.dtype).masked_fill(~ok, 0.0))
    return kl_rows(target, index_scores, ok).sum()


def msa_kl_factor(loss_coeff: float, index_heads: int, total_q: int) -> float:
    """The MSA loss normaliser loss_coeff / (HI * total_q)."""
    return loss_coeff / (index_heads * total_q)


def msa_indexer_kl_loss(q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor, block_indices: Tensor, block_size: int,
                        *, scale: float | None = None, index_scale: float | None = None, loss_coeff: float = 1.0,
                        causal: bool = True) -> Tensor:
    """MSA index-branch loss (module docstring). q [B, Tq, H, d], k [B, Tk, Hkv, d] (main attention, the
    teacher, detached), q_idx [B, Tq, Hkv, dI], k_idx [B, Tk, dI] (student), block_indices
    [B, Tq, Hkv, nb] (-1 = unused). scale defaults to d**-0.5, index_scale to dI**-0.5. total_q = B * Tq."""
    B, Tq, H, d = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G, dI = H // Hkv, q_idx.shape[-1]
    nblk = -(-Tk // block_size)
    ok = selection_mask(block_indices, nblk).repeat_interleave(block_size, dim=-1)[..., :Tk]  # [B, Tq, Hkv, Tk]
    if causal:
        ok = ok & visible(Tq, Tk, (-1, 0), q.device)[None, :, None, :]
    p_t = attention_probs(q, k, ok, d ** -0.5 if scale is None else scale)  # [B, Tq, H, Tk]
    p_t = p_t.view(B, Tq, Hkv, G, Tk).mean(3)  # mean over the group's heads
    isc = dI ** -0.5 if index_scale is None else index_scale
    logits = torch.einsum("btgd,bsd->btgs", q_idx, k_idx) * isc
    kl = kl_rows(p_t.to(logits.dtype), logits, ok)
    return msa_kl_factor(loss_coeff, Hkv, B * Tq) * kl.sum()
