"""`LlamaConfig`: the architecture of a LLaMA 2 model, as one typed dataclass.

Fields follow Meta's ``ModelArgs`` (``llama/model.py``); derived values (head size, FFN hidden
size, query heads per KV head) are properties so they can never disagree with the fields.
``n_kv_heads`` alone switches MHA (``None`` or ``n_heads``), GQA (in between) and MQA (``1``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


class ConfigError(ValueError):
    """An impossible architecture (raised when the config is built, before any allocation)."""


@dataclass(frozen=True)
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = MHA (as many KV heads as query heads)
    vocab_size: int = 32000
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # 70B: 1.3 (PAPER.md, Architecture)
    ffn_hidden_dim: int | None = None  # explicit FFN size for configs off Meta's rule (HF configs)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        problems = []
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0
        ):
            problems.append(
                f"n_kv_heads must be a positive integer or None, got {self.n_kv_heads!r}"
            )
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim <= 0:
            problems.append(f"ffn_hidden_dim must be positive, got {self.ffn_hidden_dim}")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            problems.append(f"ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            problems.append("norm_eps and rope_theta must be positive")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            elif self.head_dim % 2:
                problems.append(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
            if self.n_heads % self.kv_heads:
                problems.append(
                    f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})"
                )
        if problems:
            raise ConfigError("invalid LlamaConfig: " + "; ".join(problems))

    # ---- derived ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads, resolved (MHA when ``n_kv_heads`` is None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def n_rep(self) -> int:
        """Query heads sharing one KV head (1 = MHA, n_heads = MQA)."""
        return self.n_heads // self.kv_heads

    @property
    def attention_kind(self) -> str:
        return "mha" if self.kv_heads == self.n_heads else "mqa" if self.kv_heads == 1 else "gqa"

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: Meta's rule ``int(2*4*dim/3)``, x multiplier, round up."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes the KV cache needs per token of one sequence: K and V, every layer."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * dtype_bytes

    def num_params(self, head: str = "lm") -> int:
        """Exact parameter count without building the model.

        ``head="lm"``: untied output projection (vocab x dim); ``"scalar"``: one-output score
        head (reward / value models); ``"none"``: the backbone alone.
        """
        d, kv = self.dim, self.kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2  # wq, wo + wk, wv
        ffn = 3 * d * self.hidden_dim  # w1, w2, w3
        per_layer = attention + ffn + 2 * d  # + attention_norm, ffn_norm
        total = self.vocab_size * d + self.n_layers * per_layer + d  # + final norm
        heads = {"lm": self.vocab_size * d, "scalar": d, "none": 0}
        if head not in heads:
            raise ValueError(f"head must be one of {sorted(heads)}, got {head!r}")
        return total + heads[head]

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named size (``tiny`` ... ``70b``), with optional field overrides."""
        key = name.lower()
        if key not in NAMED_CONFIGS:
            raise ConfigError(f"unknown model size {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
        return replace(NAMED_CONFIGS[key], **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LlamaConfig:
        """Build from a mapping, refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown LlamaConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], vocab_size: int | None = None) -> LlamaConfig:
        """From Meta's ``params.json`` (``vocab_size: -1`` means: read it from the weights)."""
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            if vocab_size is None:
                raise ConfigError("params.json has vocab_size -1: pass the embedding's row count")
            vocab = vocab_size
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab,
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
            max_seq_len=params.get("max_seq_len", 4096),
        )

    def to_meta_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "dim": self.dim,
            "multiple_of": self.multiple_of,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
        }
        if self.n_kv_heads is not None:
            params["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            params["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.rope_theta != 10000.0:
            params["rope_theta"] = self.rope_theta
        return params

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` dict (``LlamaConfig`` in transformers)."""
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"rope_scaling {scaling} is not supported (LLaMA 2 uses none)")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ConfigError(f"config.json sets {flag}=true; LLaMA 2 has no biases")
        if cfg.get("tie_word_embeddings"):
            raise ConfigError("config.json ties embeddings; LLaMA 2 does not")
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim")
        if head_dim is not None and head_dim != dim // n_heads:
            raise ConfigError(f"head_dim {head_dim} != hidden_size / num_attention_heads")
        kv = cfg.get("num_key_value_heads")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=None if kv in (None, n_heads) else kv,
            vocab_size=cfg["vocab_size"],
            ffn_hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            max_seq_len=cfg.get("max_position_embeddings", 4096),
        )

    def to_hf_config(self, **extra: Any) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict for ``LlamaForCausalLM``."""
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        }
        cfg.update(extra)
        return cfg


# Named sizes. The CPU sizes use the built-in tokenizer's vocabulary (4096 pieces; a checkpoint or
# a user's tokenizer overrides it), MHA like 7B/13B, and short contexts that fit the built-in data.
NAMED_CONFIGS: dict[str, LlamaConfig] = {
    # about 5.3M parameters: the default job, trains in minutes on 2 CPU cores
    "tiny": LlamaConfig(dim=256, n_layers=4, n_heads=8, vocab_size=4096, multiple_of=32, max_seq_len=256),
    # about 30M
    "small": LlamaConfig(dim=512, n_layers=8, n_heads=8, vocab_size=4096, multiple_of=64, max_seq_len=512),
    # about 105M (GPT-2-base width, 14 layers)
    "base": LlamaConfig(dim=768, n_layers=14, n_heads=12, vocab_size=4096, multiple_of=256, max_seq_len=1024),
    # about 1.1B, GQA with 4 KV heads (the TinyLlama shape): the GPU-check size
    "1b": LlamaConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, max_seq_len=4096),
    # Meta's released sizes, exactly (PAPER.md table)
    "7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
        multiple_of=4096, ffn_dim_multiplier=1.3,
    ),
}  # fmt: skip
