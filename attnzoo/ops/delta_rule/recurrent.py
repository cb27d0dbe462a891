"""The gated delta rule token by token, vectorised over sequences and heads: decode (T is usually 1).

One step per value head (q scaled; decay = exp(g), a scalar or one per key channel, acting on S's rows):
    S <- Diag(decay) S;   S <- S + k (beta (v - S^T k))^T;   o = S^T q
`delta_rule_step` is the engine's decode call and updates the state in place; `fused_recurrent_delta_rule`
runs whole sequences (same contract as delta_rule_reference) and is differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.ops.delta_rule import chunk as _chunk  # module: tests swap its output_buffer
from attnzoo.ops.delta_rule.chunk import make_layout, needs_grad, prepare_qk, sequences
from attnzoo.ops.delta_rule.reference import check_step_inputs, setup_inputs


def _rows(decay: Tensor) -> Tensor:
    """decay [.., Hv] or [.., Hv, dk] -> broadcastable to the state [.., Hv, dk, dv]."""
    return decay[..., None] if decay.dim() == 3 else decay[..., None, None]


def _step(S: Tensor, q: Tensor, k: Tensor, v: Tensor, decay: Tensor | None, beta: Tensor,
          inplace: bool) -> tuple[Tensor, Tensor]:
    """S [a, Hv, dk, dv]; q, k [a, Hv, dk]; v [a, Hv, dv]; decay None, [a, Hv] or [a, Hv, dk]; beta [a, Hv].
    Returns (o [a, Hv, dv], new S); `inplace` writes S itself (S may be any strided view)."""
    if decay is not None:
        S = S.mul_(_rows(decay)) if inplace else S * _rows(decay)
    err = v - (k[..., None, :] @ S).squeeze(-2)
    kk, uu = k[..., :, None], (beta[..., None] * err)[..., None, :]  # rank-1 write k u^T
    S = S.addcmul_(kk, uu) if inplace else torch.addcmul(S, kk, uu)
    return (q[..., None, :] @ S).squeeze(-2), S


def delta_rule_step_torch(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, state: Tensor, *,
                    scale: float | None = None, use_qk_l2norm: bool = False) -> Tensor:
    """One decode token per sequence: q, k [B, Hk, dk]; v [B, Hv, dv]; g [B, Hv] or [B, Hv, dk] (or None);
    beta [B, Hv]; state [B, Hv, dk, dv] (float32, or any float dtype: computed in it) UPDATED IN PLACE
    (it may be a strided view into a state pool). Returns o [B, Hv, dv] in v's dtype."""
    check_step_inputs(q, k, v, g, beta)
    B, Hk, dk = q.shape
    Hv, dv = v.shape[1:]
    if state.shape != (B, Hv, dk, dv) or not state.is_floating_point():
        raise ValueError(f"state must be a float [{B}, {Hv}, {dk}, {dv}] tensor, "
                         f"got {state.dtype} {tuple(state.shape)}")
    dt, r = state.dtype, Hv // Hk
    q, k = prepare_qk(q.to(dt), k.to(dt), dk ** -0.5 if scale is None else scale, use_qk_l2norm)
    q, k = q.repeat_interleave(r, 1), k.repeat_interleave(r, 1)
    decay = None if g is None else g.to(dt).exp()
    o, _ = _step(state, q, k, v.to(dt), decay, beta.to(dt), inplace=True)
    return o.to(v.dtype)


def fused_recurrent_delta_rule_torch(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                               scale: float | None = None, initial_state: Tensor | None = None,
                               output_final_state: bool = True, use_qk_l2norm: bool = False,
                               cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Same contract as delta_rule_reference (and chunk_delta_rule): one step per token, all sequences
    (batch rows or cu_seqlens spans) and heads at once. In-place state updates when no gradient is
    needed, out of place (differentiable) otherwise."""
    n, wide, scale = setup_inputs(q, k, v, g, beta, initial_state, cu_seqlens, scale)
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    out_dtype = v.dtype
    # casts, scale, l2norm and exp(g) happen per step: no full-length temporaries
    q, k, v, g, beta = (None if t is None else t.flatten(0, 1) for t in (q, k, v, g, beta))
    r = Hv // Hk
    # step t: token t of every sequence still running, longest first (the state rows are in that order)
    lay = make_layout(*sequences(B, T, cu_seqlens), 1, q.device)
    S = (v.new_zeros(n, Hv, dk, dv, dtype=wide) if initial_state is None
         else initial_state.to(wide).index_select(0, lay.order))
    # S is our own copy (index_select): without autograd it is updated in place, outputs go straight to
    # their rows; with autograd, out of place and collected
    inplace = not needs_grad(q, k, v, g, beta, S)
    out = _chunk.output_buffer(B * T, Hv, dv, S) if inplace else None
    outs = []
    for t, (first, a) in enumerate(lay.steps):
        if lay.dense:  # B equal rows: token t of each is a strided view, no gather
            qt, kt, vt, gt, bt = (None if x is None else x.view(B, T, *x.shape[1:])[:, t].to(wide)
                                  for x in (q, k, v, g, beta))
        else:
            idx = lay.gather[first:first + a, 0]
            qt, kt, vt, gt, bt = (None if x is None else x[idx].to(wide) for x in (q, k, v, g, beta))
        qt, kt = prepare_qk(qt, kt, scale, use_qk_l2norm)
        dt = None if gt is None else gt.exp()
        if r > 1:
            qt, kt = qt.repeat_interleave(r, 1), kt.repeat_interleave(r, 1)
        o, Sa = _step(S[:a], qt, kt, vt, dt, bt, inplace)
        if inplace:
            lay.write(out, o[..., None, :], first, a)  # one-token chunks
        else:
            outs.append(o)
            S = Sa if a == n else torch.cat([Sa, S[a:]])
    if not inplace:
        out = torch.cat(outs)[lay.token_chunk] if outs else S.new_zeros(0, Hv, dv)
    final = S.index_select(0, torch.argsort(lay.order)) if output_final_state else None
    return out.reshape(B, T, Hv, dv).to(out_dtype), final
