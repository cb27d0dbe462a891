from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention", "sparse_attention", "nsa")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only LM; field names follow transformers where one exists."""
    architecture: str  # llama mistral qwen3 deepseek_v3 deepseek_v32 glm_moe_dsa qwen3_next qwen3_5 kimi_linear
    #                    minimax_m3 glm5_next
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
    # MLA (attention_type "mla"): q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
    # v_head_dim, rope_interleave; head_dim is then qk_rope_head_dim (what RoPE rotates)
    attention_type: str = "softmax"
    mla: dict[str, Any] | None = None
    # MoE (kind deepseek, the default, or qwen): n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_group, topk_group,
    # norm_topk_prob, routed_scaling_factor, n_shared_experts, first_k_dense_replace (dense layers before)
    moe: dict[str, Any] | None = None
    mlp_layer_types: list[str] = field(default_factory=list)   # per layer: dense | sparse (MoE)
    # delta-rule layers (layer type "linear_attention"): kind gdn | kda, num_k_heads, num_v_heads, k_dim,
    # v_dim, conv_width; kda may add gate_lower_bound (GLM-5.3-Flash's safe gate)
    linear: dict[str, Any] | None = None
    attn_output_gate: bool = False    # Qwen3-Next: o * sigmoid(gate) from a doubled query projection
    use_rope: bool = True             # False: no positional encoding in attention (Kimi Linear's NoPE MLA)
    # DeepSeek Sparse Attention on MLA: index_n_heads, index_head_dim, index_topk, indexer_interleaved_rope,
    # indexer_types (per layer full | shared: IndexShare); GLM-5.3-Flash's k-pool indexer adds index_kpool,
    # index_kpool_always_select_tail
    dsa: dict[str, Any] | None = None
    # mHC residual streams (GLM-5.3-Flash, models/glm5_next.py): hc_mult, hc_sinkhorn_iters, hc_eps
    hyper: dict[str, Any] | None = None
    # MiniMax Sparse Attention on GQA (layer type "sparse_attention"): index_head_dim, block_size,
    # topk_blocks, local_blocks
    msa: dict[str, Any] | None = None
    # Native Sparse Attention (layer type "nsa"; training path only): NativeSparseAttention's options
    # (block_len, stride, select_block, num_selected, window, shared_kv, compress, compress_hidden, gate_hidden)
    nsa: dict[str, Any] | None = None
    mlp_clamp: tuple[float, ...] | None = None   # (alpha, limit[, up_offset]): ClampedGLU (GPT-OSS / MiniMax-M3;
    #                                                GLM-5.3-Flash: (1, swiglu_limit, 0))
    # SWA/global hybrids (Cohere2, MiMo-V2-Flash)
    layer_rope: dict[str, dict[str, Any] | None] | None = None  # per layer type: {theta, partial, scaling}
                                                                 # or None = NoPE for that type
    rope_interleaved: bool = False    # softmax attention rotates (x[2i], x[2i+1]) pairs (Cohere2)
    sliding_num_kv_heads: int | None = None   # KV heads of sliding layers when they differ (MiMo: 2x)
    v_head_dim: int | None = None     # value head width when it differs from head_dim (MiMo: 128 vs 192)
    sliding_sinks: bool = False       # learned per-head sink logits on sliding layers (MiMo)
    value_scale: float = 1.0          # values scaled after v_proj (MiMo 0.707); folded into the weights at load
    norm: str = "rms"                 # rms | layer (mean-centred, weight only: Cohere)
    parallel_block: bool = False      # x + attn(ln(x)) + mlp(ln(x)) with one norm (Cohere)
    logit_scale: float = 1.0          # logits multiplied by this (Cohere)

    def __post_init__(self) -> None:
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"unsupported layer types {bad}; supported: {', '.join(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        if self.attention_type not in ("softmax", "mla"):
            raise ValueError(f"unsupported attention_type {self.attention_type!r}; supported: softmax, mla")
        if (self.attention_type == "mla") != (self.mla is not None):
            raise ValueError("attention_type 'mla' and the mla parameters go together")
        if "linear_attention" in self.layer_types and self.linear is None:
            raise ValueError("linear_attention layers need the linear (delta rule) parameters")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be rms or layer, got {self.norm!r}")
        if "sparse_attention" in self.layer_types and self.msa is None:
            raise ValueError("sparse_attention layers need the msa parameters")
        if "nsa" in self.layer_types and self.nsa is None:
            raise ValueError("nsa layers need the nsa parameters")
        if self.dsa is not None:
            if self.mla is None:
                raise ValueError("DSA runs on MLA: the mla parameters are needed")
            types = self.dsa.setdefault("indexer_types", ["full"] * self.num_layers)
            if len(types) != self.num_layers or set(types) - {"full", "shared"} or types[0] != "full":
                raise ValueError(f"indexer_types must name full or shared for each of {self.num_layers} layers, "
                                 f"the first full; got {types}")
        if not self.mlp_layer_types:
            first = (self.moe or {}).get("first_k_dense_replace", 0)
            self.mlp_layer_types = ["sparse" if self.moe is not None and i >= first else "dense"
                                    for i in range(self.num_layers)]
        if len(self.mlp_layer_types) != self.num_layers or set(self.mlp_layer_types) - {"dense", "sparse"}:
            raise ValueError(f"mlp_layer_types must name dense or sparse for each of {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)
