"""Meta's checkpoint format: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards.

Reading merges the shards by the rules of Meta's model-parallel layers (PAPER.md, "Meta
checkpoint layout"): ``tok_embeddings`` is split along dim 1; ``wq, wk, wv, w1, w3, output`` along
dim 0 (column-parallel); ``wo, w2`` along dim 1 (row-parallel); norms are replicated. Meta's RoPE
rotates adjacent pairs ``(x0, x1), (x2, x3), ...`` of each head; ours rotates halves
``(x_i, x_{i + head_dim/2})`` like Hugging Face, so the rows of ``wq`` and ``wk`` are permuted on
the way in (:func:`interleaved_to_halves`) and back on the way out (PAPER.md, "Architecture").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from llamalab.checkpoint.io import CheckpointError, atomic_directory, build_from_state
from llamalab.model import Llama, LlamaConfig

# Which dimension a parameter is split along across model-parallel shards (None = replicated).
_SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings": 1,
    "output": 0,
    "norm": None,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,
    "feed_forward.w1": 0,
    "feed_forward.w3": 0,
    "feed_forward.w2": 1,
    "attention_norm": None,
    "ffn_norm": None,
}
_IGNORED = ("rope.freqs",)  # Meta's stored RoPE frequencies: we recompute them
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


def _module_of(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``attention.wq``; ``output.weight`` -> ``output``."""
    stem = name.removesuffix(".weight")
    return re.sub(r"^layers\.\d+\.", "", stem)


def split_dim(name: str) -> int | None:
    module = _module_of(name)
    if module not in _SPLIT_DIM:
        raise CheckpointError(f"unexpected tensor {name!r} in a Meta checkpoint")
    return _SPLIT_DIM[module]


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of ``wq``/``wk`` ``(n_heads * head_dim, dim)``: Meta's pairs -> rotate-half.

    Within each head, row ``2i`` goes to ``i`` and row ``2i + 1`` to ``i + head_dim/2`` (the HF
    conversion script's ``permute``). ``n_heads`` is ``n_kv_heads`` for ``wk``.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_halves` (our layout -> Meta's)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_qk(state: dict[str, torch.Tensor], config: LlamaConfig, to_meta: bool) -> None:
    permute = halves_to_interleaved if to_meta else interleaved_to_halves
    for name in state:
        if name.endswith("attention.wq.weight"):
            state[name] = permute(state[name], config.n_heads)
        elif name.endswith("attention.wk.weight"):
            state[name] = permute(state[name], config.kv_heads)


def shard_paths(path: Path) -> list[Path]:
    """``consolidated.00.pth ...`` in shard order; an error if numbers are missing."""
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _SHARD_RE.match(p.name)))
    if not found:
        raise CheckpointError(f"Meta checkpoint {path}: no consolidated.NN.pth shards")
    numbers = [n for n, _ in found]
    if numbers != list(range(len(found))):
        raise CheckpointError(f"Meta checkpoint {path}: shard numbers {numbers} are not 0..N-1")
    return [p for _, p in found]


def merge_shards(shards: list[Mapping[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    """Model-parallel shards -> one state dict (still in Meta's interleaved q/k layout)."""
    names = [n for n in shards[0] if n not in _IGNORED]
    for i, shard in enumerate(shards[1:], start=1):
        if {n for n in shard if n not in _IGNORED} != set(names):
            raise CheckpointError(f"{source}: shard {i} holds different tensors than shard 0")
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        pieces = [shard[name] for shard in shards]
        dim = split_dim(name)
        if dim is None:
            if any(not torch.equal(pieces[0], p) for p in pieces[1:]):
                raise CheckpointError(f"{source}: replicated tensor {name} differs between shards")
            merged[name] = pieces[0]
        else:
            merged[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
    return merged


def load_meta(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
) -> Llama:
    """Read a Meta checkpoint directory into a :class:`Llama` (any number of shards).

    ``vocab_size: -1`` in ``params.json`` is read from the embedding's rows. Shards are opened
    memory-mapped (``torch.load(mmap=True)``), so the merged copy is the only one in RAM.
    ``dtype=None`` keeps the stored dtype (bf16 for Meta's release). ``max_seq_len`` (absent
    from ``params.json``) defaults to 4096, LLaMA 2's context.
    """
    root = Path(path)
    params_file = root / "params.json"
    if not params_file.is_file():
        raise CheckpointError(f"{root} is not a Meta checkpoint: no params.json")
    params = json.loads(params_file.read_text())
    shards = [
        torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in shard_paths(root)
    ]
    state = merge_shards(shards, str(root))
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"Meta checkpoint {root}: no tok_embeddings.weight")
    if max_seq_len is not None:
        params = {**params, "max_seq_len": max_seq_len}
    config = LlamaConfig.from_meta_params(
        params, vocab_size=state["tok_embeddings.weight"].shape[0]
    )
    _permute_qk(state, config, to_meta=False)
    model = build_from_state(config, "lm", state, str(root), device, dtype)
    assert isinstance(model, Llama)
    return model


def _check_divisible(config: LlamaConfig, n_shards: int) -> None:
    sizes = {
        "dim": config.dim,
        "n_kv_heads": config.kv_heads,  # whole KV heads per shard (Meta's n_local_kv_heads)
        "vocab_size": config.vocab_size,
        "ffn hidden size": config.hidden_dim,
    }
    bad = [f"{name} = {size}" for name, size in sizes.items() if size % n_shards]
    if n_shards < 1 or bad:
        raise CheckpointError(f"cannot split into {n_shards} Meta shards: {', '.join(bad)}")


def save_meta(
    model: Llama,
    path: str | os.PathLike[str],
    n_shards: int = 1,
    dtype: torch.dtype | None = None,
    vocab_in_params: bool = False,
) -> Path:
    """Write ``model`` as a Meta checkpoint directory with ``n_shards`` model-parallel shards.

    Like Meta's release, ``params.json`` says ``vocab_size: -1`` unless ``vocab_in_params``,
    and each shard carries ``rope.freqs``. ``dtype`` casts the weights (Meta ships bf16).
    Written crash-safely (a temporary directory renamed into place). Returns the path.
    """
    if not isinstance(model, Llama):
        raise CheckpointError("Meta's format has only the language-model head; got a scalar model")
    config = model.config
    _check_divisible(config, n_shards)
    state = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in model.state_dict().items()}
    _permute_qk(state, config, to_meta=True)
    freqs = 1.0 / config.rope_theta ** (
        torch.arange(0, config.head_dim, 2, dtype=torch.float32)[: config.head_dim // 2]
        / config.head_dim
    )
    params = config.to_meta_params()
    if not vocab_in_params:
        params["vocab_size"] = -1
    with atomic_directory(path) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for rank in range(n_shards):
            shard = {}
            for name, tensor in state.items():
                dim = split_dim(name)
                piece = tensor if dim is None else tensor.chunk(n_shards, dim=dim)[rank]
                shard[name] = piece.clone()  # a view would save the whole tensor
            shard["rope.freqs"] = freqs.to(dtype or torch.float32)
            torch.save(shard, tmp / f"consolidated.{rank:02d}.pth")
    return Path(path)
