"""Native Sparse Attention layer (DeepSeek, arXiv 2502.11089; docs/mechanisms/sparse.md §2). Training path only."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.batch import Batch
from attnzoo.layers.cache_spec import Unserved
from attnzoo.layers.norm import RMSNorm
from attnzoo.ops.nsa import nsa, nsa_compress_keys
from attnzoo.ops.rope import apply_rope


class NativeSparseAttention(nn.Module):
    """NSA: compressed, selected and sliding-window attention branches mixed by sigmoid gates.

    Paper mode (default): each branch has its own K/V projection (the paper's guard against shortcut
    learning between branches); the compression branch cuts its keys/values into blocks of `block_len`
    tokens with stride `stride` and maps each block to one key/value with an MLP (shared by the KV heads)
    after adding a learned intra-block position embedding (one per KV head and slot); selection keeps
    `num_selected` blocks of `select_block` tokens (block 0 and the two local blocks included) ranked by
    the compression probabilities summed over each GQA group; the window branch sees the last `window`
    keys (None: no window branch). Gates: sigmoid(MLP(x)), one per branch and head.
    fla mode: `shared_kv=True, compress="mean"` with block_len == stride == select_block (one K/V for all
    branches, mean-pooled compression), the variant fla's `naive_nsa` implements.
    RoPE (when given) rotates q and every branch's raw keys; the compressor sees rotated keys (as fla's
    mean pooling does). Block boundaries count from each sequence's first token.

    Cache cost per token per layer (elements; `dk = dv = head_dim`), what a decode path would keep:
      * selection branch: raw K/V of every token (any block may be selected): 2 * Hkv * head_dim;
      * compression branch: the compressed K/V, 2 * Hkv * head_dim / stride per token, plus the raw K/V of
        the block being filled (a constant per sequence);
      * window branch (separate K/V): 2 * Hkv * head_dim, but only for the last `window` tokens.
    Shared K/V (fla): 2 * Hkv * head_dim * (1 + 1 / stride). Paper config (Hkv=4, dk=192, dv=128, d=16):
    1280 + 80 = 1360 shared, plus up to 1280 * window for the separate window K/V. No cache holds these
    yet: `cache_spec` says so (Unserved, costed at the raw-K/V part for cost models), so a cache refuses
    the layer and the engine refuses the model.
    """

    def __init__(self, layer_idx: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 block_len: int = 32, stride: int = 16, select_block: int = 64, num_selected: int = 16,
                 window: int | None = 512, shared_kv: bool = False, compress: str = "mlp", qk_norm: bool = False,
                 norm_eps: float = 1e-6, compress_hidden: int | None = None, gate_hidden: int | None = None,
                 use_rope: bool = True):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        if compress not in ("mlp", "mean"):
            raise ValueError(f"compress must be 'mlp' or 'mean', got {compress!r}")
        if block_len % stride or select_block % stride:
            raise ValueError(f"block_len ({block_len}) and select_block ({select_block}) must be multiples of "
                             f"stride ({stride}) (the paper's mapping from compression to selection scores)")
        self.layer_idx, self.num_heads = layer_idx, num_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.block_len, self.stride = block_len, stride
        self.select_block, self.num_selected = select_block, num_selected
        self.window, self.shared_kv, self.compress, self.use_rope = window, shared_kv, compress, use_rope
        self.kv_sets = 1 if shared_kv else 3  # order: compression, selection, window
        kv_width = 2 * num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, num_heads * head_dim + self.kv_sets * kv_width, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norms = nn.ModuleList(RMSNorm(head_dim, norm_eps) for _ in range(self.kv_sets)) if qk_norm else None
        if compress == "mlp":
            ch = compress_hidden or 4 * head_dim
            self.k_pos = nn.Parameter(torch.randn(num_kv_heads, block_len, head_dim) * 0.02)
            self.v_pos = nn.Parameter(torch.randn(num_kv_heads, block_len, head_dim) * 0.02)
            self.k_compress = nn.Sequential(nn.Linear(block_len * head_dim, ch), nn.SiLU(), nn.Linear(ch, head_dim))
            self.v_compress = nn.Sequential(nn.Linear(block_len * head_dim, ch), nn.SiLU(), nn.Linear(ch, head_dim))
        gh = gate_hidden or max(16, hidden_size // 4)
        self.gate = nn.Sequential(nn.Linear(hidden_size, gh), nn.SiLU(), nn.Linear(gh, 3 * num_heads))

    def cache_spec(self) -> Unserved:
        """No decode cache yet; the raw K/V per token (the selection branch may read any block) is what
        one would keep at least: see the class docstring."""
        return Unserved("NSA", "decode through the engine is not implemented; use it for training (the arena)",
                        2 * self.num_kv_heads * self.head_dim)

    def _compressed(self, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed keys/values packed per sequence: [total_cmp, Hkv, head_dim]."""
        l, d = self.block_len, self.stride
        if self.compress == "mean":
            return nsa_compress_keys(k, l, d, "mean", cu), nsa_compress_keys(v, l, d, "mean", cu)
        kb = nsa_compress_keys(k, l, d, "blocks", cu)  # [Nc, Hkv, l, dk]
        vb = nsa_compress_keys(v, l, d, "blocks", cu)
        return self.k_compress((kb + self.k_pos).flatten(-2)), self.v_compress((vb + self.v_pos).flatten(-2))

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """q [N, H, d] and the (k, v) [N, Hkv, d] of each K/V set (compression, selection, window; one when
        shared), normalised and rotated."""
        n, d, H, Hkv = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        parts = self.qkv_proj(x).split([H * d] + [Hkv * d] * (2 * self.kv_sets), -1)
        q = parts[0].reshape(n, H, d)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.use_rope and rope is not None:
            q = apply_rope(q, *rope)
        kvs = []
        for i in range(self.kv_sets):
            k, v = parts[1 + 2 * i].reshape(n, Hkv, d), parts[2 + 2 * i].reshape(n, Hkv, d)
            if self.k_norms is not None:
                k = self.k_norms[i](k)
            if self.use_rope and rope is not None:
                k = apply_rope(k, *rope)
            kvs.append((k, v))
        return q, kvs

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        batch.store(self.layer_idx, self.cache_spec())  # nothing to keep in one pass; a cache refuses it
        n, H = x.shape[0], self.num_heads
        q, kvs = self.project(x, rope)
        (k_c, v_c), (k_s, v_s), (k_w, v_w) = kvs if not self.shared_kv else kvs * 3
        k_cmp, v_cmp = self._compressed(k_c, v_c, batch.cu_seqlens)
        g = torch.sigmoid(self.gate(x)).view(n, H, 3)
        o = nsa(q, k_cmp, v_cmp, k_s, v_s, k_w, v_w, g[..., 0], g[..., 1], g[..., 2], l=self.block_len,
                d=self.stride, l_sel=self.select_block, n=self.num_selected, window=self.window,
                cu_seqlens=batch.cu_seqlens, reduce="sum")
        return self.o_proj(o.reshape(n, H * self.head_dim))
