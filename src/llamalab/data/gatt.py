"""Ghost Attention data (PAPER.md §3.3): answers sampled from a chat model, cached, and adherence.

The paper's procedure: take a multi-turn dialog and an instruction, concatenate the instruction to
*every* user turn, sample the answers with the current chat model, then train on the dialog with
the instruction kept in the first user turn only and the loss on the last answer only
(:func:`llamalab.data.sft.build_gatt_dialog`, ``encode_sft_example(..., learn_only_last=True)``).

``data.gatt_sampler`` names the model that samples: any checkpoint
:func:`llamalab.checkpoint.load_model` reads, by default ``<outputs_root>/sft/latest`` (the newest
SFT run, the way :mod:`llamalab.pipeline` names a stage's input), or ``rules``: the dialogs'
answers as written (the built-in ones rewritten by rule, :func:`apply_instruction`), for a first
round that has no chat model yet.

Sampling (:func:`sample_gatt_answers`) goes through the KV-cache generation of
:func:`llamalab.generation.answer_turns`: batched, turn by turn, each dialog from its own earlier
answers, seeded. The result is cached in ``<cache_dir>/gatt/<key>.json``, ``key`` a hash of the
sampler checkpoint's identity (resolved path, file names, sizes and times), the dialogs (their
instructions and user turns), the seed, the sampling settings and the tokenizer: a rerun, a
resumed run and every rank reuse it. Local rank 0 samples; the other ranks wait for its file.

:func:`adherence_by_turn` measures how often a model follows the instruction at each turn of
held-out dialogs where it is given in the first turn only (``experiments/gatt_adherence/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalab import pipeline
from llamalab.checkpoint import load_model
from llamalab.data.builtin.gatt import GattPrompt, follows_instruction, gatt_sampling_messages
from llamalab.data.errors import DataError
from llamalab.data.tokens import file_sha256
from llamalab.generation import answer_turns
from llamalab.model import Llama
from llamalab.tokenizer import Message, Tokenizer

log = logging.getLogger(__name__)

RULES = "rules"  # data.gatt_sampler=rules: the answers as written, no model
CACHE_SUBDIR = "gatt"
TURN_STRIDE = 1_000_003  # turn t of the sampling is seeded seed + t * TURN_STRIDE


@dataclass(frozen=True)
class GattSampling:
    """How the GAtt answers are sampled (``data.gatt_sampling``).

    Temperature and top-p default to Meta's chat sampling (PAPER.md "Chat format"); ``device``
    ``auto`` samples on the GPU when there is one; ``wait_s`` bounds how long a rank other than
    local rank 0 waits for rank 0's samples.
    """

    max_new_tokens: int = 64
    temperature: float = 0.6
    top_p: float | None = 0.9
    batch_size: int = 64
    device: str = "auto"
    wait_s: float = 7200.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> GattSampling:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise ValueError(
                f"data.gatt_sampling.{unknown[0]} is not a setting; known: {sorted(known)}"
            )
        sampling = cls(**dict(values or {}))
        if sampling.max_new_tokens < 1 or sampling.batch_size < 1 or sampling.temperature < 0:
            raise ValueError(
                f"data.gatt_sampling: max_new_tokens and batch_size must be >= 1 and temperature "
                f">= 0, got {sampling}"
            )
        return sampling

    def cache_fields(self) -> dict[str, Any]:
        """The settings that change the samples (not where or how long to wait)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "wait_s")}


def default_sampler(outputs_root: str | None = None) -> str:
    """``<outputs_root>/sft/latest``: the newest chat model (configs/data/sft.yaml's default)."""
    return pipeline.latest("sft", outputs_root)


def check_sampler(sampler: str | os.PathLike[str] | None) -> str:
    """``rules``, or a checkpoint path that exists (None: :func:`default_sampler`); a missing one
    stops here with one message naming ``data.gatt_sampler`` and the stage that produces it."""
    value = str(sampler) if sampler not in (None, "") else default_sampler()
    if value == RULES:
        return RULES
    if not Path(value).exists():
        raise pipeline.MissingInputError(
            f"data.gatt_sampler={value} does not exist: Ghost Attention samples its answers from "
            f"a chat model; produce one with `{pipeline.producing_command('sft')}`, point "
            f"data.gatt_sampler at a checkpoint, or set data.gatt_sampler={RULES} for answers "
            "written by rule (a first round without a chat model)"
        )
    return value


def checkpoint_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a checkpoint's contents cheaply: its resolved path (``latest`` links
    followed; a run directory stands for its ``export/``) and each file's name, size and time."""
    root = Path(path).resolve()
    if root.is_dir() and (root / "export").is_dir():
        root = root / "export"
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return {
        "path": str(root),
        "files": [
            [str(p.relative_to(root)) if p != root else p.name, st.st_size, st.st_mtime_ns]
            for p in files
            for st in (p.stat(),)
        ],
    }


def sampler_tokenizer(path: str | os.PathLike[str], fallback: Tokenizer) -> Tokenizer:
    """The ``tokenizer.model`` exported with the sampler (beside it or in its ``export/``), else
    the tokenizer of the training data."""
    root = Path(path)
    folder = root if root.is_dir() else root.parent
    for candidate in (folder / "tokenizer.model", folder / "export" / "tokenizer.model"):
        if candidate.is_file():
            return Tokenizer(candidate)
    return fallback


def sampling_prompts(records: Sequence[Mapping[str, Any]]) -> list[list[Message]]:
    """Each GAtt record as the sampler sees it: the instruction on every user turn, no answers."""
    return [
        [m for m in gatt_sampling_messages(record) if m["role"] != "assistant"]  # type: ignore[arg-type]
        for record in records
    ]


def sample_gatt_answers(
    model: nn.Module,
    tokenizer: Tokenizer,
    records: Sequence[Mapping[str, Any]],
    sampling: GattSampling,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records with every answer sampled by ``model`` from the dialog with the instruction on
    every user turn; the records keep their own user turns (the instruction in the first one).
    Returns ``(records, stats)``: answers, how many ended with EOS, and (built-in instructions)
    the share that follow the instruction."""
    answers = answer_turns(
        model,
        tokenizer,
        sampling_prompts(records),
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=seed,
        batch_size=sampling.batch_size,
        turn_stride=TURN_STRIDE,
    )
    out, follows = [], []
    for record, replies in zip(records, answers, strict=True):
        it = iter(replies)
        messages = [
            {"role": "assistant", "content": next(it).response}
            if m["role"] == "assistant"
            else dict(m)
            for m in record["messages"]
        ]
        out.append({**record, "messages": messages})
        follows += [_follows(record["instruction"], a.response) for a in replies]
    checked = [f for f in follows if f is not None]
    stats = {
        "answers": len(follows),
        "finished": sum(a.finished for replies in answers for a in replies),
        "follows_instruction": sum(checked) / len(checked) if checked else None,
    }
    return out, stats


def _follows(instruction: str, answer: str) -> bool | None:
    """Whether the answer follows a built-in instruction; None for an instruction code cannot check."""
    try:
        return follows_instruction(instruction, answer)
    except ValueError:
        return None


def cache_key(
    identity: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    sampling: GattSampling,
    seed: int,
    tokenizer: Tokenizer,
) -> str:
    """The cache file's name: a hash of everything the samples depend on."""
    payload = {
        "sampler": identity,
        "dialogs": sampling_prompts(records),
        "sampling": sampling.cache_fields(),
        "seed": seed,
        "tokenizer": file_sha256(tokenizer.model_path),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampled_records(
    records: Sequence[Mapping[str, Any]],
    sampler: str,
    *,
    sampling: GattSampling,
    seed: int,
    cache_dir: str | os.PathLike[str],
    tokenizer: Tokenizer,
) -> list[dict[str, Any]]:
    """The GAtt records with their answers sampled by ``sampler`` (``rules``: unchanged), read from
    the cache when there (module docstring), else sampled (local rank 0) or waited for."""
    if sampler == RULES or not records:
        return [dict(r) for r in records]
    sample_tokenizer = sampler_tokenizer(sampler, tokenizer)
    key = cache_key(checkpoint_identity(sampler), records, sampling, seed, sample_tokenizer)
    path = Path(cache_dir) / CACHE_SUBDIR / f"{key}.json"
    if not path.is_file() and _local_rank() != 0:
        _wait_for(path, sampling.wait_s)
    if path.is_file():
        log.info("GAtt: %d dialogs sampled by %s read from %s", len(records), sampler, path)
        return json.loads(path.read_text())["records"]
    started = time.perf_counter()
    model = load_model(sampler, device=_device(sampling.device))
    if not isinstance(model, Llama):
        raise DataError(
            f"data.gatt_sampler={sampler} holds a {type(model).__name__}, not a chat model"
        )
    if model.config.vocab_size != sample_tokenizer.vocab_size:
        raise DataError(
            f"data.gatt_sampler={sampler}: the model has {model.config.vocab_size} pieces but its "
            f"tokenizer {sample_tokenizer.model_path} has {sample_tokenizer.vocab_size}"
        )
    out, stats = sample_gatt_answers(model, sample_tokenizer, records, sampling, seed)
    del model
    stats["seconds"] = round(time.perf_counter() - started, 2)
    log.info("GAtt: sampled %d dialogs with %s: %s (cached in %s)", len(out), sampler, stats, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    document = {"sampler": str(sampler), "seed": seed, "stats": stats, "records": out}
    tmp.write_text(json.dumps({**document, "sampling": sampling.cache_fields()}) + "\n")
    os.replace(tmp, path)  # readers see the whole file or none
    return out


def _wait_for(path: Path, wait_s: float, poll_s: float = 1.0) -> None:
    deadline = time.monotonic() + wait_s
    while not path.is_file():
        if time.monotonic() >= deadline:
            raise DataError(
                f"local rank {_local_rank()} waited {wait_s:.0f} s for the GAtt samples local rank "
                f"0 writes to {path}: did rank 0 fail? (data.gatt_sampling.wait_s sets the wait)"
            )
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def adherence_by_turn(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[GattPrompt],
    *,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int | None = 64,
    given: str = "first",
) -> dict[str, Any]:
    """How often ``model``'s greedy answers follow the instruction at each turn.

    Each prompt's instruction prefixes its first question only (``given="first"``), every
    question (``"every"``: the sampler's view) or none (``"none"``: how often answers satisfy the
    check by chance, the base rate); the model answers turn by turn from its own answers. Returns
    ``{"by_turn": [share at turn 1, 2, ...], "by_instruction": {instruction: [...]},
    "answers": [[text, ...], ...]}``.
    """
    if given not in ("first", "every", "none"):
        raise ValueError(f"given must be 'first', 'every' or 'none', got {given!r}")

    def shown(turn: int) -> bool:
        return given == "every" or (given == "first" and turn == 0)

    dialogs = [
        [
            {"role": "user", "content": f"{p['instruction']} {q}" if shown(t) else q}
            for t, q in enumerate(p["questions"])
        ]
        for p in prompts
    ]
    answers = answer_turns(
        model,
        tokenizer,
        dialogs,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        top_p=None,
        seed=seed,
        batch_size=batch_size,
    )
    n_turns = max(len(p["questions"]) for p in prompts)
    hits: dict[str, list[list[bool]]] = {}
    for prompt, replies in zip(prompts, answers, strict=True):
        per_turn = hits.setdefault(prompt["instruction"], [[] for _ in range(n_turns)])
        for turn, reply in enumerate(replies):
            per_turn[turn].append(follows_instruction(prompt["instruction"], reply.response))

    def share(values: list[bool]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {
        "by_turn": [
            share([h for turns in hits.values() for h in turns[t]]) for t in range(n_turns)
        ],
        "by_instruction": {k: [share(v) for v in turns] for k, turns in hits.items()},
        "answers": [[a.response for a in replies] for replies in answers],
    }
