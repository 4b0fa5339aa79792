"""A tensor-parallel inference copy of a ``Llama``, built shard by shard, for rollouts.

Within a tensor-parallel (TP) group of ``N`` ranks (the GPUs of one node by default) every rank
holds ``1/N`` of every block weight, the Megatron-LM layout:

- column-parallel ``wq``, ``wk``, ``wv`` (whole heads: rank ``r`` owns query heads
  ``[r H/N, (r+1) H/N)`` and KV heads ``[r Hkv/N, (r+1) Hkv/N)``, so grouped-query attention
  keeps its pairing locally) and ``w1``, ``w3`` (FFN columns);
- row-parallel ``wo`` and ``w2``, each followed by one ``all_reduce`` of the ``(B, T, dim)``
  partial sums: two all-reduces per block per forward, nothing else inside a block;
- the head (``output``) vocabulary-parallel: each rank computes its ``V/N`` logits and one
  ``all_gather`` assembles the whole row, so sampling sees the exact distribution (a head whose
  vocabulary does not divide by ``N`` stays whole on every rank);
- the embedding and the norms replicated: a lookup reads one row per token (a vocabulary-parallel
  embedding would cost one more all-reduce per forward to save ``(1 - 1/N) V dim`` weights,
  0.46 GB per GPU at 70B against the 17 GB of the sharded blocks).

The KV cache is therefore split by KV heads: :attr:`TPLlama.config` reports the local head
counts, and :func:`llamalab.generation.sampling.generate` allocates the cache from it. The copy
is a :class:`~llamalab.model.llama.Llama` whose linear layers have local shapes, so ``generate``
(left padding, EOS, the cache) runs on it unchanged; every rank of a group runs it on the same
prompts with the same seed and, since the all-reduces and all-gathers leave identical values on
every rank, draws the same tokens (greedy and temperature sampling alike).

Implementation: a plain ``chunk`` of each weight and ``torch.distributed.all_reduce`` /
``all_gather``, not DTensor's ``parallelize_module``. Both work on gloo (docs ENV.md), but on
CPU a DTensor column linear cost about 425 us of dispatch per call against 19 us for the plain
matmul, CPU SDPA has no DTensor sharding rule, and DTensor activations cannot mix with the plain
RoPE tables and KV cache; the plain split needs no change to the model code.

:func:`build_tp_copy` makes the copy from a ZeRO-3 (``deepspeed.zero.GatheredParameters``),
FSDP2 (``full_tensor``) or plain model one unit (a block, the embedding, ...) at a time: each
unit is gathered whole for a moment, each rank keeps its slice, the unit is released, so no rank
ever holds more than the copy plus one whole unit. :func:`load_tp_copy` makes the same copy
from a checkpoint on disk, each rank reading only its slices (evaluation: ``eval.tp_size``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from llamalab.checkpoint.lazy import LazyCheckpoint
from llamalab.model import Llama, LlamaConfig
from llamalab.model.linear import Linear
from llamalab.scale.build import gathered, outside_zero_init, units
from llamalab.scale.plan_gen import tp_copy_bytes

__all__ = ["TPLlama", "build_tp_copy", "check_tp", "load_tp_copy", "slice_rule", "tp_copy_bytes"]

COLUMN = ("wq", "wk", "wv", "w1", "w3")  # output features split: whole heads / FFN columns
ROW = ("wo", "w2")  # input features split, then all-reduce


class TPError(ValueError):
    """A model or world that cannot be split at the requested tensor-parallel size."""


def check_tp(
    config: LlamaConfig,
    tp: int,
    world: int = 1,
    option: str = "stage.rollout_tp_size",
    hint: str = "or stage.rollout_engine=gather|layerwise",
) -> None:
    """Refuse a TP size that does not divide the heads, KV heads, FFN width or the world; the
    message names ``option`` (the setting that chose ``tp``) and ends with ``hint``."""
    problems = []
    if tp < 1:
        problems.append(f"the TP size must be >= 1, got {tp}")
    else:
        for what, n in (
            ("n_heads", config.n_heads),
            ("KV heads", config.kv_heads),
            ("FFN hidden size", config.hidden_dim),
        ):
            if n % tp:
                problems.append(f"{what} ({n}) is not divisible by the TP size {tp}")
        if world % tp:
            problems.append(f"the world size ({world}) is not divisible by the TP size {tp}")
    if problems:
        raise TPError(
            f"{option}: " + "; ".join(problems) + f" (choose a TP size dividing them, {hint})"
        )


class LocalConfig:
    """The model config as one TP rank sees it: the local query and KV head counts (what the
    KV cache is allocated from); every other field is the whole model's."""

    def __init__(self, config: LlamaConfig, tp: int) -> None:
        self.full, self.tp = config, tp
        self.n_heads = config.n_heads // tp
        self.kv_heads = config.kv_heads // tp
        self.n_kv_heads = self.kv_heads

    def __getattr__(self, name: str) -> Any:
        return getattr(self.full, name)


class RowParallel(nn.Module):
    """A row-parallel linear: the local product, then the sum over the TP group."""

    def __init__(self, in_features: int, out_features: int, group: Any) -> None:
        super().__init__()
        self.inner = Linear(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.group is not None:
            dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """The head split over the vocabulary: local logits, then one all-gather along the vocab."""

    def __init__(self, dim: int, local_vocab: int, tp: int, group: Any) -> None:
        super().__init__()
        self.inner = Linear(dim, local_vocab, bias=False)
        self.tp, self.group = tp, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.inner(x).contiguous()
        if self.group is None:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)


class TPLlama(Llama):
    """A ``Llama`` whose blocks (and head) hold one TP rank's slices; same forward signature."""

    tp_rank: int
    tp_size: int


def _local_name(name: str) -> str:
    """Where a whole model's parameter lives in the copy (row-parallel layers are wrapped)."""
    parts = name.split(".")
    if (len(parts) >= 2 and parts[-2] in ROW) or name == "output.weight":
        return ".".join([*parts[:-1], "inner", parts[-1]])
    return name


def slice_rule(
    name: str, shape: Sequence[int], tp: int, rank: int, vocab_parallel: bool
) -> tuple[int, int, int] | None:
    """Where rank ``rank``'s piece of the whole tensor ``name`` (of ``shape``) lies:
    ``(dim, start, stop)``, or None when every rank keeps it whole (the one slicing rule, used on
    gathered tensors and on tensors read from a file alike; pieces as ``torch.chunk`` cuts)."""
    layer = name.split(".")[-2] if "." in name else ""
    if layer in COLUMN or (name == "output.weight" and vocab_parallel):
        dim = 0
    elif layer in ROW:
        dim = 1
    else:
        return None
    size = -(-shape[dim] // tp)
    start = min(rank * size, shape[dim])
    return dim, start, min(start + size, shape[dim])


def local_slice(
    name: str, full: torch.Tensor, tp: int, rank: int, vocab_parallel: bool
) -> torch.Tensor:
    """Rank ``rank``'s piece of the whole tensor ``full`` named ``name`` (a view)."""
    where = slice_rule(name, full.shape, tp, rank, vocab_parallel)
    if where is None:
        return full
    dim, start, stop = where
    return full.narrow(dim, start, stop - start)


def _skeleton(config: LlamaConfig, tp: int, group: Any, vocab_parallel: bool) -> TPLlama:
    """The copy's modules on ``meta``, with local shapes."""
    with outside_zero_init(), torch.device("meta"):
        copy = TPLlama(config)
        for block in copy.layers:
            att, ffn = block.attention, block.feed_forward
            att.n_heads, att.n_kv_heads = config.n_heads // tp, config.kv_heads // tp
            hd, hidden = config.head_dim, config.hidden_dim // tp
            att.wq = Linear(config.dim, att.n_heads * hd, bias=False)
            att.wk = Linear(config.dim, att.n_kv_heads * hd, bias=False)
            att.wv = Linear(config.dim, att.n_kv_heads * hd, bias=False)
            att.wo = RowParallel(att.n_heads * hd, config.dim, group)  # type: ignore[assignment]
            ffn.w1 = Linear(config.dim, hidden, bias=False)
            ffn.w3 = Linear(config.dim, hidden, bias=False)
            ffn.w2 = RowParallel(hidden, config.dim, group)  # type: ignore[assignment]
        if vocab_parallel:
            head = VocabParallelHead(config.dim, config.vocab_size // tp, tp, group)
        else:
            head = VocabParallelHead(config.dim, config.vocab_size, 1, None)
        copy.output = head  # type: ignore[assignment]
    return copy


@torch.no_grad()
def build_tp_copy(
    model: Llama,
    mode: str,
    tp: int,
    rank: int,
    group: Any,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> TPLlama:
    """Rank ``rank``'s TP copy of ``model`` (``mode``: ``zero3`` | ``fsdp`` | ``none``).

    A collective under ZeRO-3 / FSDP: every rank of the world must call it (each unit is
    gathered over the data-parallel shards). ``group`` is this rank's TP process group (None
    when ``tp == 1``).
    """
    config: LlamaConfig = model.config  # type: ignore[assignment]
    check_tp(config, tp, tp)  # the model splits (the world is checked by the engine)
    vocab_parallel = config.vocab_size % tp == 0
    copy = _skeleton(config, tp, group if tp > 1 else None, vocab_parallel)
    state: dict[str, torch.Tensor] = {}
    for prefix, unit in units(model):
        with gathered(unit, mode, modifier_rank=None):
            for name, p in unit.named_parameters():
                full = p.full_tensor() if isinstance(p, DTensor) else p  # FSDP: a collective
                piece = local_slice(prefix + name, full.detach(), tp, rank, vocab_parallel)
                out = piece.to(device=device or full.device, dtype=dtype or full.dtype)
                # a copy of the slice: DeepSpeed frees or reuses the gathered buffer
                state[_local_name(prefix + name)] = out.clone() if out is piece else out
    return _finish(copy, state, config, tp, rank)


def _finish(
    copy: TPLlama, state: dict[str, torch.Tensor], config: LlamaConfig, tp: int, rank: int
) -> TPLlama:
    """Assign the local tensors to the meta skeleton; the RoPE tables and the local config."""
    copy.load_state_dict(state, strict=True, assign=True)
    state.clear()
    first = next(copy.parameters())
    copy.rope.reset(config.max_seq_len, device=first.device)
    copy.config = LocalConfig(config, tp)  # type: ignore[assignment]
    copy.tp_rank, copy.tp_size = rank, tp
    return copy.eval()


@torch.no_grad()
def load_tp_copy(
    source: str | Path | LazyCheckpoint,
    tp: int,
    rank: int,
    group: Any,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TPLlama:
    """Rank ``rank``'s TP copy read straight from a checkpoint, never the whole model in memory.

    From a Hugging Face export (or a run directory's ``export/``) each tensor's slice is read
    from the memory-mapped safetensors (``safe_open(...).get_slice``) by :func:`slice_rule`, so a
    rank reads and holds only its copy: ``1/tp`` of the blocks and head plus the embedding and
    norms. A Meta directory is read one merged tensor at a time; other formats are loaded whole
    first (:class:`~llamalab.checkpoint.lazy.LazyCheckpoint`). ``dtype=None`` keeps the stored
    dtype. Equal to :func:`build_tp_copy` of the loaded model, tensor for tensor.
    """
    source = source if isinstance(source, LazyCheckpoint) else LazyCheckpoint(source)
    config = source.config
    if source.head != "lm":
        raise TPError(f"{source.path}: a tensor-parallel copy needs a language model")
    check_tp(config, tp, tp)
    vocab_parallel = config.vocab_size % tp == 0
    copy = _skeleton(config, tp, group if tp > 1 else None, vocab_parallel)
    state: dict[str, torch.Tensor] = {}
    for name in source:
        where = slice_rule(name, source.shape(name), tp, rank, vocab_parallel)
        piece = source[name] if where is None else source.piece(name, *where)
        state[_local_name(name)] = piece.to(device=device, dtype=dtype or piece.dtype)
    return _finish(copy, state, config, tp, rank)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters (one rank's TP copy: what it allocates)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def tp_groups(world: int, tp: int) -> Sequence[Sequence[int]]:
    """Consecutive ranks form a TP group (the GPUs of one node when ``tp`` = GPUs per node)."""
    return [list(range(start, start + tp)) for start in range(0, world, tp)]


def tp_and_dp_groups(tp: int) -> tuple[Any, Any]:
    """This rank's TP group (consecutive ranks, :func:`tp_groups`) and its data-parallel group
    (the ranks at the same place in every TP group), created collectively on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine: list[Any] = [None, None]
    layouts = (tp_groups(world, tp), [list(range(j, world, tp)) for j in range(tp)])
    for k, layout in enumerate(layouts):
        for ranks in layout:
            group = dist.new_group(list(ranks))  # every rank creates every group
            if rank in ranks:
                mine[k] = group
    return mine[0], mine[1]
