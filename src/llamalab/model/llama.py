"""The LLaMA 2 decoder (PAPER.md, Architecture), one backbone with two heads.

``Llama``: embedding -> ``n_layers`` pre-norm blocks -> RMSNorm -> untied output projection.
``LlamaScalar``: the same backbone with a one-output ``score`` head (reward and value models).

Parameter names follow Meta's ``model.py`` (``tok_embeddings``, ``layers.N.attention.wq`` ...),
so a Meta state dict loads by name. RoPE uses the *rotate-half* layout of Hugging Face: the
checkpoint module permutes ``wq``/``wk`` rows when it reads or writes Meta's interleaved layout.

Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU), with ``enable_gqa`` so K/V are never repeated in memory. The model contains no
parallelism code: strategies (DDP, FSDP, ZeRO-3) and compile are applied from outside.

Initialisation (the paper does not state it; we follow GPT-2 / torchtitan): every linear and
embedding weight ~ N(0, 0.02), the two residual output projections (``wo``, ``w2``) scaled by
``1/sqrt(2 * n_layers)`` so the residual stream's variance does not grow with depth; norms = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.model.config import LlamaConfig
from llamalab.model.kv_cache import KVCache
from llamalab.model.linear import Linear


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps)`` in float32, cast back, then times ``weight`` (Meta, HF)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (theta = 10000), cached, never saved, extended on demand."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._initial_len = max_seq_len
        if not self.cos.is_meta:
            self.reset(max_seq_len)

    def reset(self, length: int | None = None, device: torch.device | None = None) -> None:
        """(Re)compute the tables for positions ``[0, length)``, in float32."""
        length = length or max(self._initial_len, self.cos.shape[0])
        device = device or self.cos.device
        inv_freq = 1.0 / (
            self.theta
            ** (
                torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
                / self.head_dim
            )
        )
        angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim), rotate-half layout
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables gathered at ``position_ids (B, T)`` -> two ``(B, 1, T, head_dim)`` tensors."""
        needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if self.cos.is_meta or needed > self.cos.shape[0] or self.cos.device != position_ids.device:
            self.reset(max(needed, self._initial_len), device=position_ids.device)
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, T, head_dim)`` by position; maths in float32, result in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.head_dim,
        )
        self.wq = Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wv = Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, dim)
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,  # (B, 1, T, T_keys) bool, True = may attend; None = causal
        kv_cache: KVCache | None,
        layer_idx: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # (B, Hkv, T_keys, hd)
        gqa = self.n_kv_heads != self.n_heads
        # Without a cache, one query or many, causal is right; with one, a single new query
        # must see the whole cache (SDPA's causal mask is top-left aligned). T is not read
        # without a cache: under torch.compile with a dynamic length T > 1 is symbolic, and
        # SDPA takes only a Python bool (a symbolic one would break the graph in two).
        causal = mask is None and (kv_cache is None or T > 1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa
        )  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_idx: int, config: LlamaConfig) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rope, mask, kv_cache=None):  # type: ignore[no-untyped-def]
        # Read layer_idx only when a cache needs it: torch.compile specialises on integer module
        # attributes, so once a new sequence length made Dynamo recompile, reading it compiled
        # one graph per layer (and past its recompile limit, 8, left later layers eager).
        layer_idx = self.layer_idx if kv_cache is not None else 0
        h = x + self.attention(self.attention_norm(x), rope, mask, kv_cache, layer_idx)
        return h + self.feed_forward(self.ffn_norm(h))


def build_attention_mask(
    batch: int,
    q_len: int,
    past_len: int,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask ``(B, 1, q_len, past_len + q_len)`` or ``None`` for the plain causal case.

    Query ``i`` (absolute position ``past_len + i``) may attend to key ``j`` when ``j`` is not
    in its future, the key is a real token (``attention_mask``), and both lie in the same packed
    sample (``segment_ids``). SDPA's ``is_causal`` aligns to the top-left corner, wrong for a
    query block after a cached prefix, hence the explicit mask. Every query may attend to
    itself, so rows of padding queries never turn into NaN (their outputs are ignored).
    """
    if attention_mask is None and segment_ids is None and (past_len == 0 or q_len == 1):
        return None
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None]).expand(batch, q_len, k_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, -k_len:].bool()
    if segment_ids is not None:
        if past_len:
            raise ValueError("segment_ids (packed samples) cannot be combined with a KV cache")
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    allowed = allowed | (k_pos[None, None, :] == q_pos[None, :, None])
    return allowed.unsqueeze(1)


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded prompt starts at position 0."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).expand(batch, q_len)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions[:, -q_len:].clamp(min=0)


class LlamaBackbone(nn.Module):
    """Embedding, blocks and final norm: everything but the head."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)

    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T)
        *,
        attention_mask: torch.Tensor | None = None,  # (B, past + T): 1 real, 0 padding
        position_ids: torch.Tensor | None = None,  # (B, T)
        segment_ids: torch.Tensor | None = None,  # (B, T): packed-sample ids
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states ``(B, T, dim)``."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, B, T, past, input_ids.device)
        mask = build_attention_mask(B, T, past, attention_mask, segment_ids, input_ids.device)
        rope = self.rope(position_ids)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(h)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter in place (also after ``to_empty`` from the meta device)."""
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight")):
                p.normal_(0.0, residual_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)
        device = self.tok_embeddings.weight.device
        self.rope.reset(self.config.max_seq_len, device=device)


class Llama(LlamaBackbone):
    """LLaMA 2 language model: ``Llama(config)(input_ids) -> logits (B, T, vocab)``, float32."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.output = Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return self.output(self.hidden_states(input_ids, **kwargs)).float()

    @classmethod
    def from_config(cls, config: LlamaConfig, device: str | torch.device = "cpu") -> Llama:
        """Build (on ``meta``: no allocation at all) and initialise unless on ``meta``."""
        with torch.device(device):
            model = cls(config)
        if str(device) != "meta":
            model.init_weights()
        return model


class LlamaScalar(LlamaBackbone):
    """Backbone + ``score`` head with one output per token (reward and value models).

    ``forward`` returns ``(B, T)`` float32 values; :func:`last_token_values` reads each row at
    its last real token (the EOS that closes the response), whatever the padding side.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.score = Linear(config.dim, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return self.score(self.hidden_states(input_ids, **kwargs)).squeeze(-1).float()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        super().init_weights(std, generator)
        # A small head starts every reward near 0 (sigmoid 0.5); 1/sqrt(dim+1) as in peers' RMs.
        self.score.weight.normal_(0.0, 1.0 / math.sqrt(self.config.dim + 1), generator=generator)

    def score_sequences(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One scalar per sequence ``(B,)``: the value at the last real token."""
        values = self(input_ids, attention_mask=attention_mask)
        return last_token_values(values, attention_mask)


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``values (B, T)`` read at each row's last position where ``attention_mask`` is 1."""
    if attention_mask is None:
        return values[:, -1]
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=values.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=-1).values
    return values.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)
