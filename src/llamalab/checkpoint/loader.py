"""``load_model(path)``: any checkpoint this project meets, recognised by its files.

Formats, in the order they are tried:

- a Hugging Face directory (``config.json``): :func:`llamalab.checkpoint.hf.load_hf`;
- a Meta directory (``params.json`` + ``consolidated.NN.pth``): :func:`~.meta.load_meta`;
- a Lightning ``.ckpt`` file written by one of our stages;
- a DeepSpeed ZeRO checkpoint directory (Lightning's ``DeepSpeedStrategy`` writes
  ``<name>.ckpt/`` with a ``latest`` file and a tag folder of partitioned states): the fp32
  weights are gathered with ``deepspeed.utils.zero_to_fp32`` (DeepSpeed is imported only then);
- a torch distributed checkpoint directory (``.metadata``; Lightning's ``ModelParallelStrategy``
  / FSDP with ``save_distributed_checkpoint=True``, plus Lightning's ``meta.pt``): read in one
  process with ``torch.distributed.checkpoint`` (no process group needed);
- a run directory of ours (``outputs/<stage>/<run>/``) holding an ``export/`` folder.

Contract for our Lightning checkpoints (docs/interfaces.md, "checkpoint"): the LightningModule
stores ``checkpoint["llamalab"] = {"model_config": LlamaConfig.to_dict(), "head": "lm" | "scalar",
"prefix": "model."}`` and the model's weights are ``checkpoint["state_dict"]`` entries under that
prefix (PPO saves the policy under ``"actor."``).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint.hf import load_hf
from llamalab.checkpoint.io import CheckpointError, build_from_state, clean_name, head_of
from llamalab.checkpoint.meta import MetaCheckpoint, load_meta
from llamalab.model import ConfigError, Llama, LlamaConfig, LlamaScalar

LLAMALAB_KEY = "llamalab"  # where a LightningModule of ours records what its checkpoint holds
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor part of a distributed checkpoint
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")
LOOKED_FOR = (
    "a Hugging Face directory (config.json), a Meta directory (params.json + consolidated.NN.pth), "
    "a Lightning .ckpt file, a DeepSpeed ZeRO checkpoint directory (latest + tag folder), "
    "a torch distributed checkpoint directory (.metadata), or a run directory with export/"
)


def _torch_load(path: Path) -> Any:
    """``torch.load`` memory-mapped; a checkpoint with Python objects beyond tensors and
    containers (e.g. Hydra configs in ``hyper_parameters``) is one of ours: unpickle fully."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def model_from_training_checkpoint(
    checkpoint: dict[str, Any],
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama | LlamaScalar:
    """A Lightning checkpoint dict (contract above) -> the model it holds."""
    info = checkpoint.get(LLAMALAB_KEY)
    if not isinstance(info, dict) or "model_config" not in info:
        raise CheckpointError(
            f"{source} is not a llamalab training checkpoint: it has no "
            f"checkpoint[{LLAMALAB_KEY!r}]['model_config'] (written by our LightningModules)"
        )
    try:
        config = LlamaConfig.from_dict(dict(info["model_config"]))
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err
    prefix = info.get("prefix", "model.")
    weights = checkpoint.get("state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{source}: no 'state_dict' of tensors")
    state = {}
    for name, tensor in weights.items():
        name = clean_name(name)
        if name.startswith(prefix):
            state[name[len(prefix) :]] = tensor
    if not state:
        raise CheckpointError(f"{source}: no tensors under the prefix {prefix!r} in state_dict")
    head = info.get("head") or head_of(state, source)  # recorded, else read from the weights
    return build_from_state(config, head, state, source, device, dtype)


def load_lightning(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama | LlamaScalar:
    """A Lightning ``.ckpt`` file of ours -> the model it holds."""
    checkpoint = _torch_load(Path(path))
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: a checkpoint file should hold a dict")
    return model_from_training_checkpoint(checkpoint, str(path), device, dtype)


def is_deepspeed_dir(path: Path) -> bool:
    latest = path / "latest"
    if not latest.is_file():
        return False
    tag_dir = path / latest.read_text().strip()
    return tag_dir.is_dir() and any(tag_dir.glob("*model_states.pt"))


def _deepspeed_client_state(root: Path) -> dict[str, Any]:
    """The model-states file of a DeepSpeed checkpoint (our ``llamalab`` entry is in it); under
    ZeRO-3 the parameters there are empty placeholders, so it is small."""
    tag_dir = root / (root / "latest").read_text().strip()
    model_states = sorted(tag_dir.glob("*model_states.pt"))[0]
    client = torch.load(model_states, map_location="cpu", mmap=True, weights_only=False)
    return client if isinstance(client, dict) else {}


def load_deepspeed(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama | LlamaScalar:
    """A DeepSpeed ZeRO (stage 1-3) checkpoint directory written by Lightning.

    The partitioned fp32 master weights are consolidated by DeepSpeed's own ``zero_to_fp32``
    (the same call as Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``, without
    writing a file); our ``llamalab`` entry is in the client state of the model-states file.
    The consolidated model must fit in CPU memory.
    """
    # lazy: deepspeed is an optional heavy dependency, only ZeRO checkpoints need it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = Path(path)
    checkpoint = {
        LLAMALAB_KEY: _deepspeed_client_state(root).get(LLAMALAB_KEY),
        "state_dict": get_fp32_state_dict_from_zero_checkpoint(str(root)),
    }
    return model_from_training_checkpoint(checkpoint, str(root), device, dtype)


def load_distributed(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama | LlamaScalar:
    """A torch distributed checkpoint directory (Lightning ``ModelParallelStrategy`` / FSDP).

    Only the ``state_dict`` entry is read (optimizer shards are skipped), in this process, as
    ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` does.
    """
    # lazy: torch.distributed.checkpoint costs ~0.8 s (Lightning does not load it), only
    # distributed checkpoints need it; chat, generate and score load models without it
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    root = Path(path)
    if not (root / LIGHTNING_META).is_file():
        raise CheckpointError(
            f"distributed checkpoint {root}: no {LIGHTNING_META} (Lightning's metadata with the "
            f"{LLAMALAB_KEY!r} entry); without it the architecture is unknown"
        )
    checkpoint = _torch_load(root / LIGHTNING_META)
    loaded: dict[str, Any] = {}
    _load_state_dict(
        loaded,
        storage_reader=FileSystemReader(str(root)),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )
    checkpoint["state_dict"] = loaded.get("state_dict")
    return model_from_training_checkpoint(checkpoint, str(root), device, dtype)


def load_model(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama | LlamaScalar:
    """Load any checkpoint this project knows (see the module docstring) as ``Llama`` or
    ``LlamaScalar``, in eval mode. ``dtype=None`` keeps the stored dtype.

    Raises ``FileNotFoundError`` for a missing path and :class:`CheckpointError` for a path that
    is none of the formats (the message lists what was looked for).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no checkpoint at {root}")
    if root.is_file():
        if root.suffix in CKPT_SUFFIXES:
            return load_lightning(root, device, dtype)
    elif (root / "config.json").is_file():
        return load_hf(root, device, dtype)
    elif (root / "params.json").is_file():
        return load_meta(root, device, dtype)
    elif is_deepspeed_dir(root):
        return load_deepspeed(root, device, dtype)
    elif (root / ".metadata").is_file():
        return load_distributed(root, device, dtype)
    elif (root / "export").is_dir():
        return load_model(root / "export", device, dtype)
    raise CheckpointError(
        f"{root} is not a checkpoint this project can read; looked for {LOOKED_FOR}"
    )


def _recorded_config(checkpoint: Any) -> LlamaConfig | None:
    info = checkpoint.get(LLAMALAB_KEY) if isinstance(checkpoint, dict) else None
    if isinstance(info, dict) and "model_config" in info:
        return LlamaConfig.from_dict(dict(info["model_config"]))
    return None


def checkpoint_config(path: str | os.PathLike[str]) -> LlamaConfig:
    """The architecture stored with any checkpoint :func:`load_model` reads, without reading its
    weights: ``config.json`` (Hugging Face), ``params.json`` and the shards' index (Meta), our
    ``llamalab`` header (``.ckpt`` memory-mapped, DeepSpeed client state, Lightning's ``meta.pt``
    of a distributed checkpoint). Only a checkpoint without such a record is loaded whole."""
    root = Path(path)
    found: LlamaConfig | None = None
    if root.is_file() and root.suffix in CKPT_SUFFIXES:
        found = _recorded_config(_torch_load(root))
    elif (root / "config.json").is_file():
        found = LlamaConfig.from_hf_config(json.loads((root / "config.json").read_text()))
    elif (root / "params.json").is_file():
        found = MetaCheckpoint(root).config
    elif is_deepspeed_dir(root):
        found = _recorded_config(_deepspeed_client_state(root))
    elif (root / LIGHTNING_META).is_file():
        found = _recorded_config(_torch_load(root / LIGHTNING_META))
    elif (root / "export").is_dir():
        return checkpoint_config(root / "export")
    return found if found is not None else load_model(root).config
