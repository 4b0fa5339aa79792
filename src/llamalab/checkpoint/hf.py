"""The Hugging Face format in and out: ``config.json`` + safetensors + SentencePiece tokenizer.

Our RoPE uses Hugging Face's rotate-half layout, so the tensors themselves are identical: only
the names differ. (Meta's interleaved layout needs a row permutation of ``wq``/``wk``; see
:mod:`llamalab.checkpoint.meta`.) A ``Llama`` is written as ``LlamaForCausalLM``, a
``LlamaScalar`` (reward / value model) as ``LlamaForSequenceClassification`` with one label, so
``transformers.AutoModelFor...from_pretrained`` loads either without llamalab (DESIGN.md). Writing
needs no ``transformers``; only the tests import it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm
import torch
from safetensors import safe_open

from llamalab.checkpoint.io import CheckpointError, atomic_directory, build_from_state
from llamalab.checkpoint.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    SAFETENSORS_INDEX,
    ShardWriter,
    parse_size,
)
from llamalab.model import ConfigError, Llama, LlamaConfig, LlamaScalar

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


# ---- writing ------------------------------------------------------------------------------------
# Meta's chat format (PAPER.md "Chat format", ``llamalab.tokenizer.encode_dialog``) as a Jinja chat
# template, written into the tokenizer_config.json of chat models: transformers'
# ``apply_chat_template`` (lm-eval's ``--apply_chat_template``, vLLM, TGI) then renders a dialog
# that its LlamaTokenizer turns into ``encode_dialog``'s ids, token for token. Each pair is
# ``<s> [INST] user [/INST] answer </s>``: the space after ``<s>`` stands for SentencePiece's dummy
# prefix, which Meta's code gets by encoding every pair separately and which the Hugging Face
# tokenizer (a Metaspace pre-tokenizer prepending only at the start of the text) does not add
# after a special token. A leading system message joins the first user turn inside
# ``<<SYS>>\n...\n<</SYS>>\n\n``; roles must alternate user/assistant and contents must not
# hold Meta's tags (Meta's ``chat_completion`` refuses both).
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('roles must alternate user/assistant, starting with user') }}"
    "{%- endif -%}"
    "{%- for tag in ['[INST]', '[/INST]', '<<SYS>>', '<</SYS>>'] -%}"
    "{%- if tag in m['content'] -%}"
    "{{ raise_exception('a message contains the special tag ' + tag) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if loop.index0 == 0 and system is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] -%}"
    "{%- else -%}{%- set content = m['content'] -%}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{ bos_token + ' [INST] ' + content | trim + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + content | trim + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
# Meta's sampling defaults (PAPER.md, "Chat format"), written to generation_config.json.
_GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}


class SentencePieceTokenizer(Protocol):
    """What an export needs from a tokenizer (``llamalab.tokenizer.Tokenizer`` has it)."""

    model_path: Path
    bos_id: int
    eos_id: int
    pad_id: int


def _token_ids(
    model: Llama | LlamaScalar, tokenizer: SentencePieceTokenizer | None
) -> dict[str, int | None]:
    """bos/eos/pad ids for the config. Without a tokenizer: LLaMA's 1/2 and pad = unk id 0.

    A sequence-classification model needs a pad id different from EOS: transformers pools
    each row at its last token that is not the pad id, and the reward is read at the EOS.
    """
    if tokenizer is None:
        ids: dict[str, int | None] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    else:
        ids = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    if isinstance(model, LlamaScalar) and ids["pad_token_id"] in (None, ids["eos_token_id"]):
        raise CheckpointError("a reward/value model export needs a pad id different from EOS")
    if not isinstance(model, LlamaScalar) and tokenizer is None:
        ids["pad_token_id"] = None  # LLaMA defines none; a tokenizer export names its choice
    return ids


def hf_config(
    model: Llama | LlamaScalar, tokenizer: SentencePieceTokenizer | None, dtype: torch.dtype
) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM`` or ``LlamaForSequenceClassification``."""
    config: LlamaConfig = model.config
    dtype_name = str(dtype).removeprefix("torch.")
    extra: dict[str, Any] = {
        **_token_ids(model, tokenizer),
        "dtype": dtype_name,  # transformers >= 5
        "torch_dtype": dtype_name,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "use_cache": True,
    }
    if isinstance(model, LlamaScalar):
        extra.update(
            architectures=["LlamaForSequenceClassification"],
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
        )
    return config.to_hf_config(**extra)


def _write_tokenizer(
    tokenizer: SentencePieceTokenizer, model: Llama | LlamaScalar, out: Path, chat: bool
) -> None:
    """``tokenizer.model`` + ``tokenizer_config.json`` + ``special_tokens_map.json``.

    transformers builds its ``LlamaTokenizer`` from the SentencePiece file (a conversion that
    uses protobuf). It adds BOS, not EOS, like Meta's ``encode(bos=True)``; it differs from
    SentencePiece on leading spaces only (PAPER.md, "Architecture"). A reward model pads on the
    right (transformers then needs no position ids), a language model on the left (generation).
    ``chat``: add :data:`LLAMA2_CHAT_TEMPLATE` (a chat model's export).
    """
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))
    if sp.vocab_size() > model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer {tokenizer.model_path} has {sp.vocab_size()} pieces but the model's "
            f"vocabulary is {model.config.vocab_size}: they do not belong together"
        )
    shutil.copyfile(tokenizer.model_path, out / "tokenizer.model")
    special = {
        "bos_token": sp.id_to_piece(tokenizer.bos_id),
        "eos_token": sp.id_to_piece(tokenizer.eos_id),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "pad_token": sp.id_to_piece(tokenizer.pad_id),
    }
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.config.max_seq_len,
        "padding_side": "right" if isinstance(model, LlamaScalar) else "left",
    }
    if chat:
        tokenizer_config["chat_template"] = LLAMA2_CHAT_TEMPLATE
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def save_hf(
    model: Llama | LlamaScalar,
    tokenizer: SentencePieceTokenizer | None,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
    chat: bool = False,
) -> Path:
    """Export ``model`` (and its tokenizer) as a Hugging Face directory; returns the path.

    Writes ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` and
    ``model.safetensors.index.json`` above ``max_shard_size``), ``generation_config.json``
    (language models) and, with a tokenizer, ``tokenizer.model`` + ``tokenizer_config.json`` +
    ``special_tokens_map.json``. ``dtype`` casts the weights (default: as they are). ``chat``
    (chat models: SFT, rejection sampling, PPO, DPO) writes Meta's chat format as the tokenizer's
    ``chat_template`` (:data:`LLAMA2_CHAT_TEMPLATE`).

    The weights stream through :class:`~llamalab.checkpoint.shards.ShardWriter`: host memory
    holds one shard at a time, never a second copy of the model. They are ``model``'s own, or
    ``tensors``: ``(name, whole tensor)`` pairs under our names, on any device, produced one at a
    time (a sharded model gathered unit by unit: :func:`llamalab.scale.zero_gen.host_tensors`);
    ``model`` then only gives the config and head, and the names must be exactly its parameters.
    Crash-safe: everything goes to ``<path>.tmp-<pid>`` and is renamed into place at the end;
    an existing export is replaced only once the new one is complete.
    """
    max_bytes = parse_size(max_shard_size)
    expected = set(model.state_dict())
    weight_dtype = dtype or model.tok_embeddings.weight.dtype
    config = hf_config(model, tokenizer, weight_dtype)
    if tensors is None:
        tensors = ((name, t) for name, t in model.state_dict().items())
    with atomic_directory(path) as tmp:
        _write_json(tmp / "config.json", config)
        writer = ShardWriter(tmp, max_bytes, dtype)
        written: set[str] = set()
        for name, tensor in tensors:
            if name not in expected or name in written:
                raise CheckpointError(f"export {path}: unexpected or repeated tensor {name}")
            writer.add(to_hf_name(name), tensor)
            written.add(name)
        if written != expected:
            missing = sorted(expected - written)
            raise CheckpointError(f"export {path}: tensors missing: {missing[:8]}")
        writer.close()
        if isinstance(model, Llama):
            ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            generation = {**ids, **_GENERATION_DEFAULTS, "max_length": model.config.max_seq_len}
            _write_json(tmp / "generation_config.json", generation)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, model, tmp, chat)
    return Path(path)


# ---- reading ------------------------------------------------------------------------------------
def _weight_files(root: Path) -> list[Path]:
    """The safetensors (or legacy ``pytorch_model.bin``) files of an HF directory, in order."""
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (root / single).is_file():
            return [root / single]
    raise CheckpointError(
        f"Hugging Face checkpoint {root}: no model.safetensors, {SAFETENSORS_INDEX} "
        "or pytorch_model.bin"
    )


def _hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", mmap=True, weights_only=True).items()


def read_hf_state(root: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, under our names (unknown names are an error)."""
    state, unknown = {}, []
    for name, tensor in _hf_tensors(_weight_files(root)):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        try:
            state[from_hf_name(name)] = tensor
        except KeyError:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"Hugging Face checkpoint {root}: unexpected tensors {unknown[:8]}")
    return state


def head_from_config(cfg: dict[str, Any], root: Path) -> str:
    """``"lm"`` or ``"scalar"`` for an HF ``config.json`` (the one head detection)."""
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{root}/config.json: model_type {cfg['model_type']!r} is not llama")
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch == "LlamaForCausalLM":
        return "lm"
    if arch == "LlamaForSequenceClassification":
        labels = len(cfg.get("id2label") or {"0": ""})
        if labels != 1:
            raise CheckpointError(f"{root}: a scalar model has one label, config.json has {labels}")
        return "scalar"
    raise CheckpointError(f"{root}/config.json: unsupported architecture {arch!r}")


def load_hf(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama | LlamaScalar:
    """Read a Hugging Face Llama directory into :class:`Llama` (``LlamaForCausalLM``) or
    :class:`LlamaScalar` (``LlamaForSequenceClassification`` with one label).

    Single or sharded safetensors (via the index). ``dtype=None`` keeps the stored dtype.
    """
    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{root} is not a Hugging Face checkpoint: no config.json")
    cfg = json.loads(config_file.read_text())
    head = head_from_config(cfg, root)
    try:
        config = LlamaConfig.from_hf_config(cfg)
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{config_file}: {err}") from err
    state = read_hf_state(root)
    return build_from_state(config, head, state, str(root), device, dtype)
