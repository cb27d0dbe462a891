"""NSA oracles: `nsa_reference`, an independent float64 token-by-token loop written from the paper's equations
(the oracle of the paper mode; fla's `naive_nsa` is the oracle of the fla mode, in the tests), and
`selection_weights`, the paper's eq. 9 as a matrix (the oracle of ops.sparse.select.nsa_block_scores)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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
