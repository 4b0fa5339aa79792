"""A checkpoint's tensors under our names, read one at a time (or a range of rows at a time).

What a sharded load reads from (:func:`llamalab.scale.build.load_weights`): the model is built
partitioned, then each parameter is filled from here, so no process holds the whole checkpoint.

- A Hugging Face directory (or a run directory with ``export/``): its safetensors files are
  memory-mapped; a tensor, or some of its rows, is read when asked for.
- A Meta directory: :class:`llamalab.checkpoint.meta.MetaCheckpoint` (memory-mapped shards,
  merged one tensor at a time).
- Any other format (our ``.ckpt``, DeepSpeed and distributed checkpoints) is loaded whole into
  CPU memory by :func:`llamalab.checkpoint.load_model` first, then served from there.

``config`` and ``head`` (``"lm"`` / ``"scalar"``) come from the checkpoint's own record
(``config.json``, ``params.json``), read without its weights where the format allows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from llamalab.checkpoint.hf import from_hf_name, head_from_config
from llamalab.checkpoint.loader import load_model
from llamalab.checkpoint.meta import MetaCheckpoint
from llamalab.checkpoint.shards import SAFETENSORS_INDEX
from llamalab.model import LlamaConfig, LlamaScalar


def _safetensors_files(root: Path) -> list[Path]:
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    return sorted(root.glob("*.safetensors"))


class LazyCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of the checkpoint at ``path`` (module docstring), with :meth:`shape` (reads
    nothing), :meth:`rows` and :meth:`piece` (read only those rows / columns where the format is
    memory-mapped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        root = (
            self.path / "export" if (self.path / "export" / "config.json").exists() else self.path
        )
        self._files: dict[str, Any] = {}
        self._where: dict[str, tuple[str, str]] = {}
        self._meta: MetaCheckpoint | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self.config: LlamaConfig
        self.head: str
        if (root / "config.json").exists() and self._open_safetensors(root):
            cfg = json.loads((root / "config.json").read_text())
            self.config = LlamaConfig.from_hf_config(cfg)
            self.head = head_from_config(cfg, root)
        elif (root / "params.json").is_file():
            self._meta = MetaCheckpoint(root)
            self.config, self.head = self._meta.config, self._meta.head
        else:
            model = self._load_whole(self.path)
            self._state = {k: v.detach() for k, v in model.named_parameters()}
            self.config = model.config  # type: ignore[assignment]
            self.head = "scalar" if isinstance(model, LlamaScalar) else "lm"

    def _load_whole(self, path: Path) -> nn.Module:
        """The fallback for formats that cannot be read piece by piece (overridable)."""
        return load_model(path)

    def _open_safetensors(self, root: Path) -> bool:
        files = _safetensors_files(root)
        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            self._files[str(file)] = handle
            for hf_name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not hf_name.endswith("rotary_emb.inv_freq"):
                    self._where[from_hf_name(hf_name)] = (str(file), hf_name)
        return bool(files)

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._meta is not None:
            return self._meta[name]
        if self._state is not None:
            return self._state[name]
        file, hf_name = self._where[name]
        return self._files[file].get_tensor(hf_name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``self[name][start:stop]``, reading only those rows from a memory-mapped file."""
        if self._meta is not None:
            return self._meta.rows(name, start, stop)
        if self._state is not None:
            return self._state[name][start:stop]
        file, hf_name = self._where[name]
        return self._files[file].get_slice(hf_name)[start:stop]

    def piece(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``self[name]`` narrowed to ``[start, stop)`` along ``dim`` (0 or 1), reading only that
        piece from a memory-mapped safetensors file (a tensor-parallel rank's slice)."""
        if self._state is not None:  # a fresh tensor: the whole state may be dropped after
            return self._state[name].narrow(dim, start, stop - start).clone()
        if dim == 0:
            return self.rows(name, start, stop)
        if self._meta is None:
            file, hf_name = self._where[name]
            return self._files[file].get_slice(hf_name)[:, start:stop]
        return self[name].narrow(dim, start, stop - start).clone()

    def _names(self) -> Mapping[str, Any]:
        if self._meta is not None:
            return self._meta
        return self._state if self._state is not None else self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def shape(self, name: str) -> tuple[int, ...]:
        if self._meta is not None:
            return self._meta.shape(name)
        if self._state is not None:
            return tuple(self._state[name].shape)
        file, hf_name = self._where[name]
        return tuple(self._files[file].get_slice(hf_name).get_shape())
