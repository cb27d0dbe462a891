"""`ModelConfig`: a decoder-only LM's architecture, composed of the model-wide fields and the mechanism
families' configs (each family's dataclass, coerced through the registry: this module names no family)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnzoo.mechanisms import registry
from attnzoo.mechanisms.common import coerce

if TYPE_CHECKING:  # the built-in families' configs, for readers and type checkers only
    from attnzoo.mechanisms.delta_rule import Config as DeltaRuleConfig
    from attnzoo.mechanisms.dsa import Config as DSAConfig
    from attnzoo.mechanisms.ffn import Config as MoEConfig
    from attnzoo.mechanisms.hyper import Config as HyperConfig
    from attnzoo.mechanisms.latent import Config as MLAConfig
    from attnzoo.mechanisms.msa import Config as MSAConfig
    from attnzoo.mechanisms.nsa import Config as NSAConfig


@dataclass
class ModelConfig:
    """Architecture of a decoder-only LM; field names follow transformers where one exists. A family
    registered from outside attnzoo keeps its config in `plugins` under its field name, read as
    `cfg.<field>` like a built-in one; build configs with plug-in fields by `ModelConfig.compose`."""
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
    # the mechanism families' own parameters (attnzoo/mechanisms/; dicts in JSON, coerced on construction)
    attention_type: str = "softmax"   # softmax | mla: the flavour of full/sliding attention layers
    mla: MLAConfig | None = None  # MLA (head_dim is then qk_rope_head_dim, what RoPE rotates)
    moe: MoEConfig | None = None
    mlp_layer_types: list[str] = field(default_factory=list)   # per layer: dense | sparse (MoE)
    delta_rule: DeltaRuleConfig | None = None   # delta-rule layers (layer type "linear_attention")
    attn_output_gate: bool = False    # Qwen3-Next: o * sigmoid(gate) from a doubled query projection
    use_rope: bool = True             # False: no positional encoding in attention (Kimi Linear's NoPE MLA)
    dsa: DSAConfig | None = None     # DeepSeek Sparse Attention on MLA
    hyper: HyperConfig | None = None  # mHC residual streams (GLM-5.3-Flash, models/glm5_next.py)
    msa: MSAConfig | None = None     # MiniMax Sparse Attention on GQA (layer type "sparse_attention")
    nsa: NSAConfig | None = None     # Native Sparse Attention (layer type "nsa"; training path only)
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
    num_mtp_layers: int = 0           # multi-token-prediction modules loaded into model.mtp (DeepSeek-V3)
    plugins: dict[str, Any] = field(default_factory=dict)   # plug-in families' configs by field name

    def __post_init__(self) -> None:
        types = registry.config_types()
        for name, cls in types.items():
            if name in FIELDS:
                setattr(self, name, coerce(cls, getattr(self, name)))
        if unknown := sorted(set(self.plugins) - set(types) | set(self.plugins) & FIELDS):
            raise ValueError(f"plugins {unknown} are no registered family's config; registered: "
                             f"{', '.join(sorted(set(types) - FIELDS)) or 'none'}")
        self.plugins = {k: coerce(types[k], v) for k, v in self.plugins.items()}
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        supported = registry.layer_types()
        bad = sorted(set(self.layer_types) - set(supported))
        if bad:
            raise ValueError(f"unsupported layer types {bad}; supported: {', '.join(supported)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        if self.attention_type not in ("softmax", "mla"):
            raise ValueError(f"unsupported attention_type {self.attention_type!r}; supported: softmax, mla")
        if (self.attention_type == "mla") != (self.mla is not None):
            raise ValueError("attention_type 'mla' and the mla parameters go together")
        registry.check(self)   # a family for every layer; each configured family's own checks
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be rms or layer, got {self.norm!r}")
        if not self.mlp_layer_types:
            first = self.moe.first_k_dense_replace if self.moe is not None else 0
            self.mlp_layer_types = ["sparse" if self.moe is not None and i >= first else "dense"
                                    for i in range(self.num_layers)]
        if len(self.mlp_layer_types) != self.num_layers or set(self.mlp_layer_types) - {"dense", "sparse"}:
            raise ValueError(f"mlp_layer_types must name dense or sparse for each of {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def __getattr__(self, name: str) -> Any:
        """A plug-in family's config by its field name (None when this model does not set it)."""
        plugins = self.__dict__.get("plugins")
        if plugins is not None and not name.startswith("__") and name in registry.config_types():
            return plugins.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def compose(cls, **fields: Any) -> ModelConfig:
        """A config from fields, plug-in families' configs among them by field name (kept in `plugins`)."""
        own = {k: v for k, v in fields.items() if k in FIELDS}
        plugins = {**own.pop("plugins", {}), **{k: v for k, v in fields.items() if k not in FIELDS}}
        if unknown := sorted(set(plugins) - set(registry.config_types())):
            raise ValueError(f"ModelConfig has no fields {unknown}, nor does a registered family keep its config there")
        return cls(**own, plugins=plugins)

    def evolve(self, **fields: Any) -> ModelConfig:
        """dataclasses.replace that also takes plug-in families' configs by field name."""
        return type(self).compose(**{**{f: getattr(self, f) for f in FIELDS}, **fields})

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))
