"""The LLaMA 2 backbone: config, model, heads and KV cache (torch only)."""

from llamalab.model.config import NAMED_CONFIGS, ConfigError, LlamaConfig
from llamalab.model.kv_cache import KVCache
from llamalab.model.llama import Llama, LlamaBackbone, LlamaScalar, RMSNorm, last_token_values

__all__ = [
    "NAMED_CONFIGS",
    "ConfigError",
    "KVCache",
    "Llama",
    "LlamaBackbone",
    "LlamaConfig",
    "LlamaScalar",
    "RMSNorm",
    "last_token_values",
]
