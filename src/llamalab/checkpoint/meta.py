"""Meta's checkpoint format: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards.

Reading merges the shards by the rules of Meta's model-parallel layers (PAPER.md, "Meta
checkpoint layout"): ``tok_embeddings`` is split along dim 1; ``wq, wk, wv, w1, w3, output`` along
dim 0 (column-parallel); ``wo, w2`` along dim 1 (row-parallel); norms are replicated. Meta's RoPE
rotates adjacent pairs ``(x0, x1), (x2, x3), ...`` of each head; ours rotates halves
``(x_i, x_{i + head_dim/2})`` like Hugging Face, so the rows of ``wq`` and ``wk`` are permuted on
the way in (:func:`interleaved_to_halves`) and back on the way out (PAPER.md, "Architecture").

Reading streams (:class:`MetaCheckpoint`): every shard is memory-mapped
(``torch.load(mmap=True, weights_only=True)``, which reads only the pickled index), and a tensor
is merged and permuted when it is asked for, one at a time. The architecture comes from
``params.json`` (and, for ``vocab_size: -1``, from the embedding's shape in the index) without
reading any weight. So loading costs the model itself plus one merged tensor of anonymous memory
(at 70B: the 1 GiB bf16 embedding), and a rank that needs only some rows (an FSDP shard) reads
only the pages holding them (:meth:`MetaCheckpoint.rows`). The mapped file pages count in a
process's RSS while they are mapped, but they are clean page cache the kernel drops under
pressure, not copies.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from llamalab.checkpoint.io import CheckpointError, atomic_directory, build_from_state
from llamalab.model import ConfigError, Llama, LlamaConfig

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


def _qk_heads(name: str, config: LlamaConfig) -> int | None:
    """The head count whose rows are permuted (``wq``: n_heads, ``wk``: n_kv_heads), else None."""
    if name.endswith("attention.wq.weight"):
        return config.n_heads
    if name.endswith("attention.wk.weight"):
        return config.kv_heads
    return None


def _permute_qk(state: dict[str, torch.Tensor], config: LlamaConfig, to_meta: bool) -> None:
    permute = halves_to_interleaved if to_meta else interleaved_to_halves
    for name in state:
        heads = _qk_heads(name, config)
        if heads is not None:
            state[name] = permute(state[name], heads)


def shard_paths(path: Path) -> list[Path]:
    """``consolidated.00.pth ...`` in shard order; an error if numbers are missing."""
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _SHARD_RE.match(p.name)))
    if not found:
        raise CheckpointError(f"Meta checkpoint {path}: no consolidated.NN.pth shards")
    numbers = [n for n, _ in found]
    if numbers != list(range(len(found))):
        raise CheckpointError(f"Meta checkpoint {path}: shard numbers {numbers} are not 0..N-1")
    return [p for _, p in found]


def read_params(root: Path) -> dict:
    params_file = root / "params.json"
    if not params_file.is_file():
        raise CheckpointError(f"{root} is not a Meta checkpoint: no params.json")
    try:
        params = json.loads(params_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{params_file}: not valid JSON ({err})") from err
    if not isinstance(params, dict):
        raise CheckpointError(f"{params_file}: expected a JSON object")
    return params


class MetaCheckpoint(Mapping[str, torch.Tensor]):
    """A Meta checkpoint directory read lazily, under our names and in our q/k layout.

    Opening maps every shard and checks that they hold the same tensor names (all of them
    known); ``config`` is the architecture. ``ckpt[name]`` merges one tensor from the mapped
    shards (a fresh tensor, except a one-shard checkpoint's tensors outside ``wq``/``wk``, which
    are views of the mapped file: copy them before changing them); :meth:`rows` reads a
    row range of it; :meth:`shape` reads nothing.
    """

    head = "lm"  # Meta's format has only the language-model head

    def __init__(self, path: str | os.PathLike[str], max_seq_len: int | None = None) -> None:
        self.root = Path(path)
        params = read_params(self.root)
        self._shards = [
            torch.load(p, map_location="cpu", mmap=True, weights_only=True)
            for p in shard_paths(self.root)
        ]
        self._names = [n for n in self._shards[0] if n not in _IGNORED]
        for i, shard in enumerate(self._shards[1:], start=1):
            if {n for n in shard if n not in _IGNORED} != set(self._names):
                raise CheckpointError(
                    f"{self.root}: shard {i} holds different tensors than shard 0"
                )
        for name in self._names:
            split_dim(name)  # unknown names stop here, before any tensor is read
        if "tok_embeddings.weight" not in self._names:
            raise CheckpointError(f"Meta checkpoint {self.root}: no tok_embeddings.weight")
        if max_seq_len is not None:
            params = {**params, "max_seq_len": max_seq_len}
        vocab = self._shards[0]["tok_embeddings.weight"].shape[0]
        try:
            self.config = LlamaConfig.from_meta_params(params, vocab_size=vocab)
        except (ConfigError, KeyError, TypeError) as err:
            raise CheckpointError(f"{self.root / 'params.json'}: {err}") from err

    def _pieces(self, name: str) -> list[torch.Tensor]:
        if name not in self._shards[0] or name in _IGNORED:
            raise KeyError(name)
        return [shard[name] for shard in self._shards]

    def shape(self, name: str) -> tuple[int, ...]:
        pieces, dim = self._pieces(name), split_dim(name)
        shape = list(pieces[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in pieces)
        return tuple(shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        pieces, dim = self._pieces(name), split_dim(name)
        if dim is None:
            if any(not torch.equal(pieces[0], p) for p in pieces[1:]):
                raise CheckpointError(
                    f"{self.root}: replicated tensor {name} differs between shards"
                )
            merged = pieces[0]
        else:
            merged = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
        heads = _qk_heads(name, self.config)
        return merged if heads is None else interleaved_to_halves(merged, heads)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``self[name]`` (a fresh tensor), reading only their pages."""
        pieces, dim = self._pieces(name), split_dim(name)
        index = torch.arange(start, stop)
        heads = _qk_heads(name, self.config)
        if heads is not None:  # our row r is Meta's row order[r]
            total = self.shape(name)[0]
            order = interleaved_to_halves(torch.arange(total).view(total, 1), heads).flatten()
            index = order[start:stop]
        if dim == 0:  # the rows are spread over the shards' row blocks
            bounds = torch.tensor([0] + [p.shape[0] for p in pieces]).cumsum(0)
            which = torch.searchsorted(bounds, index, right=True) - 1
            out = torch.empty((len(index), *pieces[0].shape[1:]), dtype=pieces[0].dtype)
            for i, piece in enumerate(pieces):
                hit = (which == i).nonzero().flatten()
                if len(hit):
                    out[hit] = piece[index[hit] - bounds[i]]
            return out
        if dim == 1:
            return torch.cat([p[index] for p in pieces], dim=1)
        return self[name][index]  # replicated: small (norms), checked across shards

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_meta(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
) -> Llama:
    """Read a Meta checkpoint directory into a :class:`Llama` (any number of shards).

    Streams (:class:`MetaCheckpoint`): the model is built on ``meta`` and each parameter is
    merged from the mapped shards and converted one at a time, so the peak is the model plus one
    tensor. ``vocab_size: -1`` in ``params.json`` is read from the embedding's shape.
    ``dtype=None`` keeps the stored dtype (bf16 for Meta's release). ``max_seq_len`` (absent
    from ``params.json``) defaults to 4096, LLaMA 2's context.
    """
    ckpt = MetaCheckpoint(path, max_seq_len)
    model = build_from_state(ckpt.config, "lm", ckpt, str(ckpt.root), device, dtype)
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
