"""Training on prepared shards: a weighted mixture of datasets made by ``src/prepare.py``.

``data.sources=[{path: outputs/data/web, weight: 3}, {path: outputs/data/code, weight: 1}]``
names prepared directories (:mod:`llamalab.data.prepare`). Each is read through its
``manifest.json`` (a directory without one was not finished and is refused), its windows of
``seq_len`` tokens come from ``litdata.StreamingDataset(item_loader=TokensLoader(seq_len))``
over the chunks of each part (random access: ``dataset[i]``), and every source must be made with
the training tokenizer.

The order is ours, not litdata's (litdata's ``CombinedStreamingDataset`` draws its mixture in
each dataloader worker and resumes through ``StreamingDataLoader.state_dict``, which
:mod:`llamalab.data.pretrain` does not use): epoch ``e`` of a mixture is one global sequence of
``sum(n_i)`` window ids drawn from ``seed + e`` (:func:`mixture_order`). Each position picks a
source with probability ``weight / sum(weights)``; each source walks through seeded permutations
of its windows, starting a new permutation when one is used up (up-sampling). Ranks deal the
sequence out like ``ResumableSampler``, so a checkpoint's count of consumed windows resumes it
exactly, on any world size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset, TokensLoader
from torch.utils.data import Dataset

from llamalab.data.errors import DataError
from llamalab.data.prepare import FORMAT_VERSION, MANIFEST, PLAN, TOKENIZER


def check_sources(sources: Any) -> list[tuple[str, float]]:
    """``data.sources`` as ``[(path, weight)]``; a malformed entry names its field."""
    if not isinstance(sources, Sequence) or isinstance(sources, str) or not sources:
        raise DataError("expected a non-empty list of {path: DIR, weight: W}", field="data.sources")
    out = []
    for i, entry in enumerate(sources):
        field = f"data.sources[{i}]"
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError("expected {path: DIR, weight: W}", field=field)
        unknown = set(entry) - {"path", "weight"}
        if unknown:
            raise DataError(f"unknown keys {sorted(unknown)}", field=field)
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise DataError(f"expected a number, got {weight!r}", field=f"{field}.weight")
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"must be positive, got {weight}", field=f"{field}.weight")
        out.append((str(entry["path"]), float(weight)))
    return out


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a prepared directory; refused when missing or unfinished."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(
            "no prepared dataset here: make one with "
            f"`python src/prepare.py data.path=SRC data.name={root.name}`",
            path=str(root),
        )
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        hint = (
            "its preparation did not finish: rerun the same prepare.py command to resume it"
            if (root / PLAN).is_file()
            else "not a directory written by src/prepare.py"
        )
        raise DataError(f"no {MANIFEST}: {hint}", path=str(root))
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise DataError(f"invalid JSON: {err}", path=str(manifest_path)) from err
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(
            f"format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}: prepare again",
            path=str(manifest_path),
            field="format",
        )
    return manifest


def source_tokenizer(path: str) -> Path:
    """The tokenizer a prepared directory was made with (copied next to its manifest)."""
    return Path(path).expanduser() / TOKENIZER


def check_tokenizer(path: str, manifest: dict[str, Any], sha256: str, tokenizer: str) -> None:
    """Shards from another tokenizer are refused, naming the source and the fix."""
    if manifest.get("tokenizer_sha256") != sha256:
        raise DataError(
            f"made with another tokenizer (sha256 {str(manifest.get('tokenizer_sha256'))[:12]}...) "
            f"than this run's {tokenizer} ({sha256[:12]}...): train with "
            f"data.tokenizer_path={source_tokenizer(path)} or prepare it again with this tokenizer",
            path=str(Path(path) / MANIFEST),
            field="tokenizer_sha256",
        )


def windows_in(directory: str, seq_len: int) -> int:
    """The ``seq_len`` windows of a litdata directory written with ``TokensLoader``, from its
    ``index.json`` (each chunk's ``dim`` tokens hold ``dim // seq_len`` windows).

    Not ``len(StreamingDataset)``: under ``torch.distributed`` that is this rank's share of
    litdata's own sharding, while llamalab deals the one global order over ranks itself and
    reads windows by their global index (``StreamingDataset[i]``)."""
    index = json.loads((Path(directory) / "index.json").read_text())
    return sum(int(chunk["dim"]) // seq_len for chunk in index["chunks"])


class SourceWindows(Dataset[np.ndarray]):
    """The ``seq_len`` windows of one split of a prepared directory, part after part (litdata
    windows do not cross chunk ends: each chunk's last ``< seq_len`` tokens are not used)."""

    def __init__(self, root: str, manifest: dict[str, Any], split: str, seq_len: int) -> None:
        self.root, self.seq_len = str(root), seq_len
        self.dirs = [
            str(Path(root) / part[split]["dir"])
            for part in manifest["parts"]
            if split in part and part[split]["dir"]
        ]
        self._datasets: list[StreamingDataset] | None = None
        self.lengths = [windows_in(d, seq_len) for d in self.dirs]
        self.starts = np.cumsum([0, *self.lengths])

    @property
    def datasets(self) -> list[StreamingDataset]:
        if self._datasets is None:
            self._datasets = [
                StreamingDataset(d, item_loader=TokensLoader(block_size=self.seq_len))
                for d in self.dirs
            ]
        return self._datasets

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range ({len(self)} windows)")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return np.asarray(self.datasets[part][index - int(self.starts[part])], dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the chunks themselves.
        return {**self.__dict__, "_datasets": None}


class MixtureWindows(Dataset[dict[str, torch.Tensor]]):
    """Windows of several sources under one id space: source ``i`` holds ids
    ``[offsets[i], offsets[i + 1])``. Items are ``{"input_ids", "labels"}`` (equal: the loss
    shifts them) of ``seq_len`` int64 tokens."""

    def __init__(self, sources: list[SourceWindows]) -> None:
        self.sources = sources
        self.sizes = [len(s) for s in sources]
        self.offsets = np.cumsum([0, *self.sizes])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        window = torch.from_numpy(self.sources[source][index - int(self.offsets[source])])
        return {"input_ids": window, "labels": window.clone()}


def mixture_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> torch.Tensor:
    """``(sum(sizes),)`` global window ids of one epoch of the weighted mixture (module doc).

    With one source this is a plain seeded permutation of its windows.
    """
    total = sum(sizes)
    generator = torch.Generator().manual_seed(seed + epoch)
    if len(sizes) == 1:
        return torch.randperm(total, generator=generator)
    probs = torch.tensor(weights, dtype=torch.float64)
    choice = torch.multinomial(probs / probs.sum(), total, replacement=True, generator=generator)
    order = torch.empty(total, dtype=torch.int64)
    offset = 0
    for i, size in enumerate(sizes):
        where = (choice == i).nonzero().flatten()
        laps = math.ceil(len(where) / size) if size else 0
        if laps:
            local = torch.cat([torch.randperm(size, generator=generator) for _ in range(laps)])
            order[where] = local[: len(where)] + offset
        offset += size
    return order


def source_shares(order: torch.Tensor, sizes: list[int]) -> list[float]:
    """The share of ``order``'s windows drawn from each source."""
    bounds = torch.tensor(np.cumsum([0, *sizes])[1:-1], dtype=torch.int64)
    counts = torch.bincount(torch.bucketize(order, bounds, right=True), minlength=len(sizes))
    return (counts.double() / max(len(order), 1)).tolist()
