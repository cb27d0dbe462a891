"""The gated delta rule (Gated DeltaNet, Kimi Delta Attention; docs/mechanisms/delta_rule.md).

One code path for both gate shapes: g [B, T, Hv] (a scalar decay per head, GDN) or [B, T, Hv, dk] (one per
key channel, KDA). Layout [batch, seq, heads, dim]; varlen via cu_seqlens over one packed row.
  delta_rule_reference        the token-by-token spec (float64 for float64 inputs)
  chunk_delta_rule            chunkwise WY form: prefill and training (differentiable)
  fused_recurrent_delta_rule  token loop vectorised over sequences and heads
  delta_rule_step             one decode token per sequence, state updated in place
Each of the last three runs its "torch" form (`*_torch`, CPU and CUDA) or its "triton" form (`*_triton`
in attnzoo.ops.delta_rule.triton_kernels, imported on first use so a CPU install needs no triton; the
decode step also takes `state_indices` into a state pool). attnzoo.ops.backend picks: `backend=`, else env
ATTNZOO_DELTA_BACKEND, else triton for CUDA tensors when triton imports, else torch.
"""

from typing import Any

from torch import Tensor

from attnzoo.ops import backend as _backend
from attnzoo.ops.delta_rule.chunk import chunk_delta_rule_torch
from attnzoo.ops.delta_rule.recurrent import delta_rule_step_torch, fused_recurrent_delta_rule_torch
from attnzoo.ops.delta_rule.reference import delta_rule_reference, l2norm

TRITON = "attnzoo.ops.delta_rule.triton_kernels"
_TRITON = ("chunk_delta_rule_triton", "fused_recurrent_delta_rule_triton", "delta_rule_step_triton")


def _form(name: str, backend: str | None, x: Tensor, torch_form: Any) -> Any:
    return _backend.kernel("delta_rule", backend, x, {"torch": torch_form}, (TRITON, f"{name}_triton"))


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                     backend: str | None = None, **kw: Any) -> tuple[Tensor, Tensor | None]:
    """The chunked form; see chunk_delta_rule_torch for the contract (scale, initial_state,
    output_final_state, use_qk_l2norm, cu_seqlens, chunk_size)."""
    return _form("chunk_delta_rule", backend, q, chunk_delta_rule_torch)(q, k, v, g, beta, **kw)


def fused_recurrent_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                               backend: str | None = None, **kw: Any) -> tuple[Tensor, Tensor | None]:
    """The token loop; see fused_recurrent_delta_rule_torch for the contract."""
    return _form("fused_recurrent_delta_rule", backend, q, fused_recurrent_delta_rule_torch)(q, k, v, g, beta, **kw)


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, state: Tensor, *,
                    backend: str | None = None, **kw: Any) -> Tensor:
    """One decode token per sequence, `state` updated in place; see delta_rule_step_torch."""
    return _form("delta_rule_step", backend, q, delta_rule_step_torch)(q, k, v, g, beta, state, **kw)


def __getattr__(name: str) -> Any:
    if name in _TRITON:
        from attnzoo.ops.delta_rule import triton_kernels
        return getattr(triton_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_TRITON, "chunk_delta_rule", "chunk_delta_rule_torch", "delta_rule_reference", "delta_rule_step",
           "delta_rule_step_torch", "fused_recurrent_delta_rule", "fused_recurrent_delta_rule_torch", "l2norm"]
