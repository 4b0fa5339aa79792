"""Checkpoints in and out: Meta, Hugging Face, and our own Lightning / DeepSpeed / FSDP ones.

- :func:`load_model` recognises any of them by its files (:mod:`~.loader`).
- :func:`save_hf` / :func:`load_hf`: the Hugging Face format every stage exports (:mod:`~.hf`).
- :func:`load_meta` / :func:`save_meta`: Meta's sharded ``consolidated.NN.pth`` (:mod:`~.meta`).
- Streaming: :class:`~.lazy.LazyCheckpoint` reads a checkpoint one tensor (or row range) at a
  time from memory-mapped files, :func:`~.loader.checkpoint_config` its architecture without its
  weights, and :class:`~.shards.ShardWriter` writes safetensors shards as tensors arrive.
- :func:`load_state_into` / :func:`load_backbone_into`: strict loading with errors that name the
  tensor and both shapes (:mod:`~.io`).
"""

from llamalab.checkpoint.hf import load_hf, save_hf
from llamalab.checkpoint.io import CheckpointError, load_backbone_into, load_state_into
from llamalab.checkpoint.loader import load_model
from llamalab.checkpoint.meta import load_meta, save_meta

__all__ = [
    "CheckpointError",
    "load_backbone_into",
    "load_hf",
    "load_meta",
    "load_model",
    "load_state_into",
    "save_hf",
    "save_meta",
]
