"""A preallocated key/value cache for incremental decoding.

It stores only the ``n_kv_heads`` heads (GQA / MQA is where the memory saving at inference comes
from: ``bytes_per_token`` shows it). Sequences of a batch share one write position: prompts of
different lengths are left-padded, and the attention mask marks the padding.
"""

from __future__ import annotations

import torch

from llamalab.model.config import LlamaConfig


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens already written (same for every row)

    @classmethod
    def allocate(
        cls,
        config: LlamaConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        return cls(
            config.n_layers, batch_size, config.kv_heads, max_len, config.head_dim, device, dtype
        )

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token of one sequence (K and V, every layer)."""
        n_layers, _, heads, _, head_dim = self.k.shape
        return 2 * n_layers * heads * head_dim * self.k.element_size()

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v (B, Hkv, T, hd)`` after the cached prefix; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (drop finished sequences so they cost no more compute)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
