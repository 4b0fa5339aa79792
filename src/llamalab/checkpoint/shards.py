"""Safetensors shards written as the tensors arrive, in the Hugging Face layout.

A model larger than ``max_shard_size`` is written as ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` (``metadata.total_size`` and a ``weight_map`` from tensor name to
file), what ``transformers``' ``save_pretrained(max_shard_size=...)`` writes and
``from_pretrained`` reads; a model that fits is one ``model.safetensors``.

:class:`ShardWriter` takes tensors one at a time and keeps only the current shard: a tensor is
moved to host memory (cast to the export dtype) as it arrives, and the shard is written with
``safetensors.torch.save_file`` as soon as the next tensor would make it pass the limit. So
writing a model of any size holds at most one shard (plus the tensor that is arriving) in host
memory, never the whole model. A tensor larger than the limit gets a shard of its own; tensors
are never split. Shards are written under ``.part`` names, renamed once their count is known,
and the index is written last, so a folder whose writing stopped half-way has no file a loader
would take for a complete export (the caller also writes the whole export in a temporary
directory renamed into place: :func:`llamalab.checkpoint.io.atomic_directory`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hugging Face convention
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_PART = ".part"


def parse_size(size: int | float | str) -> int:
    """``5_000_000`` or ``"5GB"`` / ``"500MiB"`` / ``"200KB"`` -> bytes."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    if isinstance(size, (int, float)) and float(size).is_integer():
        return int(size)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a read-only descriptor: nothing to do
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Write tensors into ``folder`` as safetensors shards of at most ``max_bytes`` each.

    ``add(name, tensor)`` in the order the tensors should be stored, then ``close()``, which
    returns the index (``None`` for a single ``model.safetensors``). ``dtype`` casts floating
    tensors. Only the current shard is held in host memory: a device tensor is copied to the
    host, a host tensor of the right dtype is kept by reference (the caller must not change it
    before the shard is written; a gathered buffer that will be reused must be passed as a
    copy).
    """

    def __init__(self, folder: Path, max_bytes: int, dtype: torch.dtype | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_shard_size must be more than 0 bytes, got {max_bytes}")
        self.folder, self.max_bytes, self.dtype = Path(folder), max_bytes, dtype
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.files: list[list[str]] = []  # names in each written shard
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.shard or any(name in names for names in self.files):
            raise ValueError(f"tensor {name} written twice")
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else None
        host = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        size = nbytes(host)
        if self.shard and self.shard_bytes + size > self.max_bytes:
            self._flush()
        self.shard[name] = host
        self.shard_bytes += size
        self.total += size

    def _part(self, i: int) -> Path:
        return self.folder / f"model-{i + 1:05d}{_PART}"

    def _flush(self) -> None:
        part = self._part(len(self.files))
        save_file(self.shard, str(part), metadata={"format": "pt"})
        _fsync(part)
        self.files.append(list(self.shard))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> dict | None:
        """Write the last shard, give every shard its final name, then write the index."""
        if self.shard or not self.files:
            self._flush()
        count = len(self.files)
        if count == 1:
            os.replace(self._part(0), self.folder / SINGLE_FILE)
            return None
        weight_map = {}
        for i, names in enumerate(self.files):
            filename = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._part(i), self.folder / filename)
            weight_map.update(dict.fromkeys(names, filename))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        tmp = self.folder / (SAFETENSORS_INDEX + _PART)
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.folder / SAFETENSORS_INDEX)
        return index
