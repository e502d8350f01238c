"""SalaConfig: the MiniCPM-SALA configuration, with the released `config.json` field names.

The released checkpoint's `config.json` (model_type `minicpm_sala`, with `auto_map` entries for remote code)
loads unchanged. `SalaConfig.from_preset(name)` gives the released shape and small shapes for tests and demos.
"""
from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

SPARSE = "minicpm4"
LIGHTNING = "lightning-attn"
MIXER_TYPES = (SPARSE, LIGHTNING)

RELEASED_SPARSE_LAYERS = (0, 9, 16, 17, 22, 29, 30, 31)

DEFAULT_SPARSE_CONFIG: dict[str, Any] = {
    "kernel_size": 32,
    "kernel_stride": 16,
    "block_size": 64,
    "topk": 64,
    "init_blocks": 1,
    "window_size": 2048,
    "dense_len": 8192,
    "use_nope": False,
}


def released_mixer_types(num_layers: int = 32) -> list[str]:
    return [SPARSE if i in RELEASED_SPARSE_LAYERS else LIGHTNING for i in range(num_layers)]


def scaled_mixer_types(num_layers: int, sparse_fraction: float = 0.25) -> list[str]:
    """The released pattern scaled down: first and last layers sparse, ~`sparse_fraction` sparse, spread evenly."""
    n_sparse = max(2 if num_layers > 1 else 1, round(num_layers * sparse_fraction))
    if num_layers == 1:
        return [SPARSE]
    idx = {round(i * (num_layers - 1) / (n_sparse - 1)) for i in range(n_sparse)}
    return [SPARSE if i in idx else LIGHTNING for i in range(num_layers)]


class SalaConfig(PretrainedConfig):
    """Configuration of a SALA hybrid (InfLLM-V2 sparse + Lightning linear attention) causal LM.

    Field names follow the released MiniCPM-SALA `config.json`. Fields this project adds:
    `use_sparse_attention` (False: sparse layers run plain dense causal attention, as in the paper's
    short-context stages) and `hype_query_scale_base` (opt-in HyPE query scaling s_t = log(t+a)/log(a) in
    the softmax layers; None, the released behaviour, disables it).
    """

    model_type = "minicpm_sala"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 73448,
        hidden_size: int = 4096,
        intermediate_size: int = 16384,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 2,
        head_dim: int | None = 128,
        lightning_nh: int | None = 32,
        lightning_nkv: int | None = 32,
        lightning_head_dim: int | None = 128,
        lightning_scale: str | float = "1/sqrt(d)",
        hidden_act: str = "silu",
        max_position_embeddings: int = 524288,
        initializer_range: float = 0.1,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = (2, 73440),
        pad_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        scale_emb: float = 12.0,
        scale_depth: float = 1.4,
        dim_model_base: int = 256,
        qk_norm: bool = True,
        use_output_norm: bool = True,
        use_output_gate: bool = True,
        attn_use_rope: bool = False,
        lightning_use_rope: bool = True,
        attn_use_output_gate: bool = True,
        sparse_config: dict[str, Any] | None = None,
        mixer_types: list[str] | None = None,
        use_sparse_attention: bool = True,
        hype_query_scale_base: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.lightning_nh = lightning_nh if lightning_nh is not None else num_attention_heads
        self.lightning_nkv = lightning_nkv if lightning_nkv is not None else self.lightning_nh
        self.lightning_head_dim = lightning_head_dim if lightning_head_dim is not None else self.head_dim
        self.lightning_scale = lightning_scale
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.scale_emb = scale_emb
        self.scale_depth = scale_depth
        self.dim_model_base = dim_model_base
        self.qk_norm = qk_norm
        self.use_output_norm = use_output_norm
        self.use_output_gate = use_output_gate
        self.attn_use_rope = attn_use_rope
        self.lightning_use_rope = lightning_use_rope
        self.attn_use_output_gate = attn_use_output_gate
        self.sparse_config = {**DEFAULT_SPARSE_CONFIG, **(sparse_config or {})}
        self.mixer_types = list(mixer_types) if mixer_types is not None else released_mixer_types(num_hidden_layers)
        self.use_sparse_attention = use_sparse_attention
        self.hype_query_scale_base = hype_query_scale_base
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling:
            raise ValueError(f"SalaConfig: rope_scaling {rope_scaling!r} is not supported (the released model uses "
                             "plain RoPE, rope_scaling null)")
        if isinstance(eos_token_id, tuple):
            eos_token_id = list(eos_token_id)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the rule it breaks."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"SalaConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "lightning_nh", "lightning_nkv", "lightning_head_dim"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(len(self.mixer_types) == self.num_hidden_layers,
             f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, m in enumerate(self.mixer_types):
            need(m in MIXER_TYPES, f"mixer_types[{i}] = {m!r} is unknown; expected one of {list(MIXER_TYPES)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads}) for grouped-query attention")
        need(self.lightning_nh % self.lightning_nkv == 0,
             f"lightning_nh ({self.lightning_nh}) must be a multiple of lightning_nkv ({self.lightning_nkv})")
        need(self.head_dim % 2 == 0 and self.lightning_head_dim % 2 == 0,
             f"head dims must be even for RoPE, got head_dim={self.head_dim}, "
             f"lightning_head_dim={self.lightning_head_dim}")
        self.lightning_scale_value()  # raises on a bad value
        sc = self.sparse_config
        unknown = set(sc) - set(DEFAULT_SPARSE_CONFIG)
        need(not unknown, f"sparse_config has unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_SPARSE_CONFIG)}")
        for key in ("kernel_size", "kernel_stride", "block_size", "topk", "window_size"):
            need(isinstance(sc[key], int) and sc[key] > 0, f"sparse_config.{key} must be a positive integer, "
                                                           f"got {sc[key]!r}")
        need(isinstance(sc["init_blocks"], int) and sc["init_blocks"] >= 0,
             f"sparse_config.init_blocks must be >= 0, got {sc['init_blocks']!r}")
        need(sc["kernel_size"] % sc["kernel_stride"] == 0,
             f"sparse_config.kernel_size ({sc['kernel_size']}) must be a multiple of kernel_stride "
             f"({sc['kernel_stride']})")
        need(sc["block_size"] % sc["kernel_stride"] == 0,
             f"sparse_config.block_size ({sc['block_size']}) must be a multiple of kernel_stride "
             f"({sc['kernel_stride']})")
        need(sc["window_size"] % sc["block_size"] == 0,
             f"sparse_config.window_size ({sc['window_size']}) must be a multiple of block_size ({sc['block_size']})")
        need(sc["init_blocks"] + sc["window_size"] // sc["block_size"] + 1 <= sc["topk"] + sc["window_size"] //
             sc["block_size"], f"sparse_config.topk ({sc['topk']}) must be >= init_blocks + 1 "
                               f"({sc['init_blocks'] + 1}) so forced blocks fit in the selection")
        if self.hype_query_scale_base is not None:
            need(self.hype_query_scale_base > 1, f"hype_query_scale_base must be > 1, got {self.hype_query_scale_base}")

    # ------------------------------------------------------------------ derived values
    def lightning_scale_value(self) -> float:
        """The lightning output scale as a float ("1/sqrt(d)" -> lightning_head_dim ** -0.5)."""
        s = self.lightning_scale
        if isinstance(s, (int, float)):
            return float(s)
        table = {"1/sqrt(d)": self.lightning_head_dim ** -0.5, "1": 1.0, "1/d": 1.0 / self.lightning_head_dim}
        if s not in table:
            try:
                return float(s)
            except (TypeError, ValueError):
                raise ValueError(f"SalaConfig: lightning_scale {s!r} is not one of {list(table)} or a number") from None
        return table[s]

    @property
    def residual_scale(self) -> float:
        """Multiplier of every residual branch: scale_depth / sqrt(num_hidden_layers)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        """The final hidden state is divided by hidden_size / dim_model_base before lm_head."""
        return self.hidden_size / self.dim_model_base

    @property
    def sparse_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.mixer_types) if m == SPARSE]

    @property
    def lightning_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.mixer_types) if m == LIGHTNING]

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "SalaConfig":
        """A named configuration: "minicpm-sala-9b" (the released shape) or a small one for tests and demos."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        kwargs = dict(PRESETS[name])
        sparse = {**kwargs.pop("sparse_config", {}), **overrides.pop("sparse_config", {})}
        kwargs.update(overrides)
        if "mixer_types" not in kwargs:
            kwargs["mixer_types"] = scaled_mixer_types(kwargs["num_hidden_layers"])
        return cls(sparse_config=sparse, **kwargs)


_SMALL_SPARSE = {"kernel_size": 8, "kernel_stride": 4, "block_size": 16, "topk": 4, "init_blocks": 1,
                 "window_size": 32, "dense_len": 128}

PRESETS: dict[str, dict[str, Any]] = {
    # The released MiniCPM-SALA shape (9.47 B parameters).
    "minicpm-sala-9b": dict(mixer_types=released_mixer_types(32)),
    # ~0.5 M parameters: unit tests. Sparse regime from position (topk + window/block) * block = 96.
    "sala-tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, lightning_nh=4, lightning_nkv=4, lightning_head_dim=16,
        dim_model_base=16, max_position_embeddings=65536, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        sparse_config=dict(_SMALL_SPARSE, topk=2),
    ),
    # ~30 M parameters: demos, CPU prefill of long contexts, and the small training runs.
    "sala-small": dict(
        vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, lightning_nh=8, lightning_nkv=8, lightning_head_dim=64,
        dim_model_base=64, max_position_embeddings=1 << 21, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        sparse_config={"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "topk": 16, "init_blocks": 1,
                       "window_size": 512, "dense_len": 2048},
    ),
}
