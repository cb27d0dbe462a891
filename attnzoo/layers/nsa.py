"""Native Sparse Attention layer (DeepSeek, arXiv 2502.11089; docs/mechanisms/sparse.md §2): one path over the
Batch's store, whatever holds the rows (one pass for training and scoring, the engine, the reference generator)."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.batch import Batch, Context, stack_aligned, stack_equal
from attnzoo.layers.cache_spec import CompressedKV, RowKV
from attnzoo.layers.norm import RMSNorm
from attnzoo.ops.nsa import nsa
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

    Decode cache (`cache_spec`), per token per layer, elements (`dk = dv = head_dim`):
      * RowKV: the raw K/V of every set, 2 * Hkv * head_dim each: the selection branch may read any
        block, the window branch its last `window` tokens, and a compression block's raw K/V are read
        once, when the block completes (the window set is kept for every token: one page table serves
        all three; a separate sliding table would save (T - window) rows of it);
      * CompressedKV: one compressed K/V row, 2 * Hkv * head_dim, per completed block (1/stride per token),
        computed once when its last token arrives.
    Shared K/V (fla): 2 * Hkv * head_dim * (1 + 1 / stride).
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

    def cache_spec(self) -> tuple[RowKV, CompressedKV]:
        """The raw K/V sets per token and the compressed K/V per completed block (class docstring)."""
        width = 2 * self.num_kv_heads * self.head_dim
        return RowKV(self.kv_sets * width), CompressedKV(width, self.block_len, self.stride)

    def _compress_blocks(self, kb: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw blocks [..., Hkv, block_len, d] -> one key/value each [..., Hkv, d]."""
        if self.compress == "mean":
            return kb.mean(-2), vb.mean(-2)
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
        """Store the new tokens' raw K/V, compress the blocks they complete (reading each block's raw
        compression K/V back from the store) and store those, then run the three branches per sequence over
        its stored tokens (queries are the last positions: bottom-right). One pass keeps nothing (NoCache):
        every block of the step is completed by it."""
        n, H, Hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, kvs = self.project(x, rope)
        g = torch.sigmoid(self.gate(x)).view(n, H, 3)
        rows_spec, cmp_spec = self.cache_spec()
        raw = torch.cat([t.reshape(n, -1) for kv in kvs for t in kv], -1)  # set by set: k, v
        ctx = batch.store(self.layer_idx, rows_spec, raw)
        cctx = batch.store(self.layer_idx, cmp_spec, self._compress_new(ctx, batch.positions, q.dtype))
        out = q.new_empty(n, H, d)
        seqs = [[p for s in c.spans for p in s.per_sequence()] for c in (ctx, cctx)]
        for s, cs in stack_aligned(*seqs):   # sequences of equal lengths run as one batch
            kv = ctx.rows[s.keys].to(q.dtype).unflatten(-1, (2 * self.kv_sets, Hkv, d))   # [R, L, 2 * sets, Hkv, d]
            cm = cctx.rows[cs.keys].to(q.dtype).unflatten(-1, (2, Hkv, d))               # [R, Nc, 2, Hkv, d]
            sets = [(kv[:, :, 2 * i], kv[:, :, 2 * i + 1]) for i in range(self.kv_sets)]
            (_, _), (k_s, v_s), (k_w, v_w) = sets if not self.shared_kv else sets * 3
            gs = g[s.rows]
            s.put(out, nsa(s.take(q), cm[:, :, 0], cm[:, :, 1], k_s, v_s, k_w, v_w, gs[..., 0], gs[..., 1],
                           gs[..., 2], l=self.block_len, d=self.stride, l_sel=self.select_block, n=self.num_selected,
                           window=self.window, reduce="sum"))
        return self.o_proj(out.reshape(n, H * d))

    def _compress_new(self, ctx: Context, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A compressed row [N, 2 * Hkv * d] per new token that completes a block (0 elsewhere), from the
        block's raw compression K/V (the first set of the stored rows; span keys are by position)."""
        Hkv, d, l = self.num_kv_heads, self.head_dim, self.block_len
        done = (pos >= l - 1) & ((pos - (l - 1)) % self.stride == 0)   # the token completes a block
        new = ctx.rows.new_zeros(len(pos), 2 * Hkv * d, dtype=dtype)
        if not bool(done.any()):
            return new
        raw_cmp = ctx.rows[:, : 2 * Hkv * d]
        for s in stack_equal([p for span in ctx.spans for p in span.unpacked()]):
            r, t = done[s.rows].nonzero(as_tuple=True)
            if len(r) == 0:
                continue
            cols = pos[s.rows[r, t]][:, None] - (l - 1) + torch.arange(l, device=pos.device)   # [M, l]
            blk = raw_cmp[s.keys[r[:, None], cols]].to(dtype).unflatten(-1, (2, Hkv, d))        # [M, l, 2, Hkv, d]
            kc, vc = self._compress_blocks(blk[:, :, 0].transpose(1, 2), blk[:, :, 1].transpose(1, 2))
            new[s.rows[r, t]] = torch.cat([kc.flatten(1), vc.flatten(1)], -1)
        return new
