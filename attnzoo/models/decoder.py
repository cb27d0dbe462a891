"""A decoder-only LM assembled from a per-layer list: one forward for training,
scoring and serving, over a packed token stream described by a `Batch`; DeepSeek-V3's MTP modules, where
loaded, in `mtp` (models/mtp.py)."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers import Batch, ContiguousKVCache, RMSNorm, RotaryEmbedding
from attnzoo.layers.cache_spec import CacheSpec
from attnzoo.layers.norm import LayerNorm
from attnzoo.mechanisms import build_attention, build_ffn
from attnzoo.models.config import ModelConfig


class DecoderLayer(nn.Module):
    """norm -> attention -> residual, norm -> MLP -> residual; the attention and the MLP come from the
    mechanism registry (attnzoo/mechanisms/)."""

    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.layer_type, self.parallel = cfg.layer_types[idx], cfg.parallel_block
        self.input_layernorm = make_norm(cfg)
        self.attn = build_attention(cfg, idx)
        # the parallel block (Cohere) feeds attention and MLP from one norm
        self.post_attention_layernorm = None if cfg.parallel_block else make_norm(cfg)
        self.mlp = build_ffn(cfg, idx)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> torch.Tensor:
        if self.parallel:
            h = self.input_layernorm(x)
            return x + self.attn(h, rope, batch) + self.mlp(h)
        x = x + self.attn(self.input_layernorm(x), rope, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


def make_norm(cfg: ModelConfig) -> RMSNorm | LayerNorm:
    return LayerNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.norm == "layer" else RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    layer_cls: type[nn.Module] = DecoderLayer  # subclasses with another block (GLM-5.3-Flash's mHC) swap it

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tokenizer = None  # set by the loaders when the checkpoint carries one
        self.quantization: str | None = None   # "int4"/"int8" when load_model quantised the linears
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.build_rotary()
        from attnzoo.models.mtp import MTPLayer  # (mtp.py builds its block from this module's DecoderLayer)
        self.mtp = nn.ModuleList(MTPLayer(cfg, self) for _ in range(cfg.num_mtp_layers))  # DeepSeek-V3's MTP

    def build_rotary(self) -> None:
        """RoPE tables are computed, not loaded: the default one, and per layer type where the config says
        (MiMo-V2-Flash: a theta per type; Cohere2: no rotation on global layers)."""
        self.rotary = self.make_rotary()
        c = self.config
        self.layer_rotary: dict[str, RotaryEmbedding | None] = {
            t: None if r is None else RotaryEmbedding(int(c.head_dim * r.get("partial", c.partial_rotary_factor)),
                                                      r["theta"], r.get("scaling"), c.max_position_embeddings)
            for t, r in (c.layer_rope or {}).items()}

    def make_rotary(self) -> RotaryEmbedding | None:
        c = self.config
        if not c.use_rope:
            return None
        return RotaryEmbedding(c.rotary_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)

    def ropes(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """cos/sin for each layer, each distinct table evaluated once."""
        tables = {None: self.rotary, **self.layer_rotary}
        done = {k: None if r is None else r(positions) for k, r in tables.items()}
        return [done[t if t in self.layer_rotary else None] for t in self.config.layer_types]

    def cache_specs(self) -> list[CacheSpec | tuple[CacheSpec, ...]]:
        return [layer.attn.cache_spec() for layer in self.layers]

    def forward_batch(self, input_ids: torch.Tensor, batch: Batch, return_hidden: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [N] (packed) -> logits [len(batch.logits_rows) or N, V]; with return_hidden also the
        last layer's output at every row [N, H], before the final norm (what the MTP modules read)."""
        x = self.embed_tokens(input_ids)
        for layer, rope in zip(self.layers, self.ropes(batch.positions)):
            x = layer(x, rope, batch)
        logits = self.lm_head(self.norm(x if batch.logits_rows is None else x[batch.logits_rows]))
        logits = logits * self.config.logit_scale if self.config.logit_scale != 1.0 else logits
        return (logits, x) if return_hidden else logits

    def forward(self, input_ids: torch.Tensor, cache: ContiguousKVCache | None = None,
                last_only: bool = False, return_hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only). With a cache, the
        tokens continue the cached sequences and the cache advances by T. return_hidden: (logits, hidden),
        hidden [B, T, H] the last layer's output before the final norm (every position, even with last_only)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"{start + T} tokens exceed the model's context of "
                             f"{self.config.max_position_embeddings}")
        batch = Batch.dense(B, T, start, input_ids.device, cache)
        if last_only:
            batch.logits_rows = torch.arange(T - 1, B * T, T, device=input_ids.device)
        # the flag goes only where asked: a subclass's forward_batch (Glm5NextLM) does not take it
        out = self.forward_batch(input_ids.reshape(-1), batch, return_hidden=True) if return_hidden \
            else (self.forward_batch(input_ids.reshape(-1), batch),)
        if cache is not None:
            cache.length += T
        out = tuple(t.view(B, -1, t.shape[-1]) for t in out)
        return out if return_hidden else out[0]
