"""The gated delta rule, token by token: the spec every fast form is tested against (docs/mechanisms/delta_rule.md §1).

Per value head h (key/query head h // (Hv / Hk)), with a state S in R^{dk x dv}:
    S_t = Diag(exp(g_t)) S_{t-1}                 g_t: scalar per head (GDN) or per key channel (KDA)
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T   the delta rule on the decayed state
    o_t = S_t^T (scale * q_t)
"""

from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps): eps inside the sqrt, as fla and transformers (not F.normalize)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
                 initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> int:
    """Validate shapes; return the number of sequences."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [batch, seq, key_heads, dk] and equal; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, T, Hk, dk = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[2] % Hk:
        raise ValueError(f"v must be [batch, seq, value_heads, dv] with value_heads a multiple of {Hk}; "
                         f"got {tuple(v.shape)}")
    Hv = v.shape[2]
    if beta.shape != (B, T, Hv):
        raise ValueError(f"beta must be [{B}, {T}, {Hv}], got {tuple(beta.shape)}")
    if g is not None and g.shape not in ((B, T, Hv), (B, T, Hv, dk)):
        raise ValueError(f"g must be [{B}, {T}, {Hv}] (per head) or [{B}, {T}, {Hv}, {dk}] (per key channel), "
                         f"got {tuple(g.shape)}")
    n = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be one packed row, got batch {B}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at {T}")
        n = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n, Hv, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [{n}, {Hv}, {dk}, {v.shape[-1]}], got {tuple(initial_state.shape)}")
    return n


def setup_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
                 initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, scale: float | None
                 ) -> tuple[int, torch.dtype, float]:
    """What every whole-sequence form starts with: `check_inputs`, then (the number of sequences, the compute
    dtype: float64 for float64 inputs else float32, the scale: dk^-0.5 unless given)."""
    n = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    wide = torch.float64 if v.dtype == torch.float64 else torch.float32
    return n, wide, q.shape[-1] ** -0.5 if scale is None else scale


def check_step_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                      beta: torch.Tensor) -> None:
    """Validate the shapes of one decode token per sequence (the state is each form's own)."""
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must be [batch, key_heads, dk] and equal; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hk, dk = q.shape
    if v.dim() != 3 or v.shape[0] != B or v.shape[1] % max(Hk, 1):
        raise ValueError(f"v must be [{B}, value_heads, dv] with value_heads a multiple of {Hk}; got {tuple(v.shape)}")
    Hv = v.shape[1]
    if beta.shape != (B, Hv):
        raise ValueError(f"beta must be [{B}, {Hv}], got {tuple(beta.shape)}")
    if g is not None and g.shape not in ((B, Hv), (B, Hv, dk)):
        raise ValueError(f"g must be [{B}, {Hv}] (per head) or [{B}, {Hv}, {dk}] (per key channel), "
                         f"got {tuple(g.shape)}")


def delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                         beta: torch.Tensor, *, scale: float | None = None, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = True, use_qk_l2norm: bool = False,
                         cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g log-decay (<= 0) [B, T, Hv] or [B, T, Hv, dk], None for no
    decay; beta [B, T, Hv]; initial_state [N, Hv, dk, dv] (N sequences: B, or len(cu_seqlens) - 1).
    Returns o [B, T, Hv, dv] in v's dtype and the final state [N, Hv, dk, dv] (float32, or float64 for
    float64 inputs). Computes in float64 for float64 inputs, else float32."""
    n, wide, scale = setup_inputs(q, k, v, g, beta, initial_state, cu_seqlens, scale)
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    out_dtype = v.dtype
    q, k, v, beta = (t.to(wide) for t in (q, k, v, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    r = Hv // Hk
    q, k = q.repeat_interleave(r, 2) * scale, k.repeat_interleave(r, 2)
    decay = None if g is None else g.to(wide).exp()
    if decay is not None and decay.dim() == 3:
        decay = decay[..., None]  # scalar per head: broadcast over the key channels
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        spans = [(0, int(cu_seqlens[i]), int(cu_seqlens[i + 1])) for i in range(n)]
    o = torch.zeros(B, T, Hv, dv, dtype=wide, device=v.device)
    finals = []
    for i, (b, s, e) in enumerate(spans):
        S = (torch.zeros(Hv, dk, dv, dtype=wide, device=v.device) if initial_state is None
             else initial_state[i].to(wide).clone())
        for t in range(s, e):
            if decay is not None:
                S = S * decay[b, t][..., None]                     # rows (key channels) decay
            err = v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t])
            S = S + torch.einsum("hk,hv->hkv", k[b, t], beta[b, t, :, None] * err)
            o[b, t] = torch.einsum("hkv,hk->hv", S, q[b, t])
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(out_dtype), final
