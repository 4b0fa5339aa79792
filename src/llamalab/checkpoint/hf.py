"""Name mapping between our state dict (Meta's names) and Hugging Face's ``LlamaForCausalLM``.

Our RoPE uses Hugging Face's rotate-half layout, so the tensors themselves are identical: only
the names differ. (Meta's interleaved layout needs a row permutation of ``wq``/``wk``; see
:mod:`llamalab.checkpoint.meta`.)
"""

from __future__ import annotations

import re

import torch

_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "score.weight": "score.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def to_hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}.weight"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def from_hf_name(name: str) -> str:
    for ours, theirs in _TOP.items():
        if name == theirs:
            return ours
    match = _HF_LAYER_RE.match(name)
    if match:
        for ours, theirs in _LAYER.items():
            if match.group(2) == theirs:
                return f"layers.{match.group(1)}.{ours}.weight"
    raise KeyError(f"unexpected Hugging Face tensor {name!r}")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors -> our names; buffers HF may store (``rotary_emb.inv_freq``) are skipped."""
    return {from_hf_name(k): v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
