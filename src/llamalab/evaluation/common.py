"""What every evaluation suite needs: the models it judges and the answers it scores.

- :func:`resolve_ckpt`: the model path of ``ckpt=`` (default: the newest chat model's ``latest``).
- :func:`check_head`: that a path is a language model or a reward model, read from its
  ``config.json`` without loading weights, so a suite checks every path before any compute.
- :func:`load_policy` / :func:`load_reward_model`: a language model or a reward model with its
  tokenizer, or one :class:`ModelError` saying what the path holds instead; :func:`open_policy`
  opens a language model to be read tensor by tensor (a tensor-parallel copy's slices).
- :func:`answer_dialogs`: dialogs (message lists ending with a user turn) -> answer texts, in
  batches on the KV-cache ``generate``, with a progress bar; :func:`play_dialogs` plays
  multi-turn dialogs (fixed replies or the policy's own) turn by turn.
- :func:`score_answers` / :func:`reward_scores`: reward-model scores of ``dialog + [answer]`` or of
  complete dialogs, encoded as the reward stage trains on them (its ``score_token_rows``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llamalab import chat, pipeline
from llamalab.checkpoint import CheckpointError, load_model
from llamalab.checkpoint.hf import head_from_config
from llamalab.checkpoint.lazy import LazyCheckpoint
from llamalab.generation import TURN_SEED_STRIDE, play_turns
from llamalab.model import Llama, LlamaScalar
from llamalab.stages.reward import score_token_rows
from llamalab.tokenizer import Message, Tokenizer

# Runs that hold chat models, newest stage of the recipe first: `ckpt=` defaults to the first
# that exists (`<outputs_root>/<run>/latest`, linked when a run finishes).
CHAT_RUNS = ("ppo", "dpo", "rejection_sampling", "sft")
HEADS = {"lm": "a language model", "scalar": "a reward model"}


class EvalError(ValueError):
    """An evaluation input that cannot be used (a path, a task name, a judge): the message says
    which and what to pass instead."""


class ModelError(EvalError, CheckpointError):
    """A model path (``ckpt``, a judge, a baseline) that is missing, is no checkpoint, or holds
    the other kind of model (a language model where a reward model is needed, or the reverse)."""


def resolve_ckpt(ckpt: str | Path | None, outputs_root: str | Path | None = None) -> Path:
    """``ckpt`` as a path that exists, or the newest chat model's ``latest`` when None."""
    if ckpt is not None:
        path = Path(ckpt)
        if not path.exists():
            raise EvalError(f"ckpt={ckpt}: no such file or directory")
        return path
    tried = [Path(pipeline.latest(run, outputs_root)) for run in CHAT_RUNS]
    for path in tried:
        if path.exists():
            return path
    raise EvalError(
        f"no chat model found ({', '.join(map(str, tried))} do not exist): pass ckpt=PATH "
        "(a run directory, Hugging Face or Meta directory, or .ckpt)"
    )


def device_of(name: str | torch.device | None) -> torch.device:
    """``None`` / ``auto``: cuda when available, else cpu."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(path: Path, what: str, device: torch.device) -> Llama | LlamaScalar:
    try:
        return load_model(path, device=device)
    except (CheckpointError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise ModelError(f"{what}={path} is not a model: {err}") from None


def _config_head(root: Path, what: str) -> str | None:
    """The head named by the Hugging Face ``config.json`` of ``root`` (or ``root/export``), None
    without one (a Meta directory, a Lightning ``.ckpt``)."""
    if not root.exists():
        raise ModelError(f"{what}={root} is not a model: no such file or directory")
    for folder in (root, root / "export"):
        config = folder / "config.json"
        if root.is_dir() and config.is_file():
            try:
                return head_from_config(json.loads(config.read_text()), folder)
            except CheckpointError as err:
                raise ModelError(f"{what}={root} is not a model: {err}") from None
    return None


def model_head(path: str | Path, what: str) -> str:
    """``"lm"`` or ``"scalar"``: the head of the checkpoint ``what=path`` names, read from the
    Hugging Face ``config.json`` when there is one (no weights read), else by loading it."""
    root = Path(path)
    head = _config_head(root, what)
    if head is not None:
        return head
    return "scalar" if isinstance(_load(root, what, torch.device("cpu")), LlamaScalar) else "lm"


def check_head(path: str | Path, what: str, want: str) -> None:
    """Stop unless ``what=path`` is a checkpoint with the ``want`` head (``"lm"`` / ``"scalar"``)."""
    head = model_head(path, what)
    if head != want:
        _wrong_head(Path(path), what, head)


def _wrong_head(path: Path, what: str, head: str) -> None:
    if head == "scalar":
        raise ModelError(
            f"{what}={path} is a reward model (scalar head), not a language model: pass a "
            "policy (pretrain, SFT, rejection sampling, PPO or DPO export)"
        )
    raise ModelError(
        f"{what}={path} is a language model, not a reward model: a judge must have a scalar "
        "head (`python src/train.py stage=reward` exports one)"
    )


def _tokenizer(path: Path, model: Llama | LlamaScalar, what: str) -> Tokenizer:
    try:
        tokenizer = Tokenizer(chat.find_tokenizer(path))
    except chat.ChatError as err:
        raise ModelError(f"{what}={path}: {err}") from None
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ModelError(
            f"{what}={path}: tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces "
            f"but the model has {model.config.vocab_size}"
        )
    return tokenizer


def load_policy(
    path: str | Path, device: torch.device | str | None = "cpu", what: str = "ckpt"
) -> tuple[Llama, Tokenizer]:
    """A language model (eval mode) and its tokenizer; ``what`` names the option in errors."""
    path = Path(path)
    if _config_head(path, what) == "scalar":  # stop before the weights are read
        _wrong_head(path, what, "scalar")
    model = _load(path, what, device_of(device))
    if not isinstance(model, Llama):
        _wrong_head(path, what, "scalar")
    return model.eval(), _tokenizer(path, model, what)


def open_policy(path: str | Path, what: str = "ckpt") -> LazyCheckpoint:
    """A language model's checkpoint opened for reading tensor by tensor (its config and head,
    no weights read from a Hugging Face export): what a tensor-parallel copy is sliced from."""
    path = Path(path)
    if _config_head(path, what) == "scalar":
        _wrong_head(path, what, "scalar")
    try:
        source = LazyCheckpoint(path)
    except (CheckpointError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise ModelError(f"{what}={path} is not a model: {err}") from None
    if source.head != "lm":
        _wrong_head(path, what, "scalar")
    return source


def policy_tokenizer(path: str | Path, model: Llama, what: str = "ckpt") -> Tokenizer:
    """The tokenizer of the language model at ``path`` (checked against ``model``'s vocabulary)."""
    return _tokenizer(Path(path), model, what)


def load_reward_model(
    path: str | Path, device: torch.device | str | None = "cpu", what: str = "judge"
) -> tuple[LlamaScalar, Tokenizer]:
    """A reward model (scalar head, eval mode) and its tokenizer."""
    path = Path(path)
    if _config_head(path, what) == "lm":  # stop before the weights are read
        _wrong_head(path, what, "lm")
    model = _load(path, what, device_of(device))
    if not isinstance(model, LlamaScalar):
        _wrong_head(path, what, "lm")
    return model.eval(), _tokenizer(path, model, what)


def answer_dialogs(
    model: Llama,
    tokenizer: Tokenizer,
    dialogs: Sequence[list[Message]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    desc: str = "answering",
    top_p: float | None = 0.9,
) -> list[str]:
    """One answer per dialog (Meta's chat format, greedy by default), in order; earlier
    assistant messages of a dialog are kept as they are."""
    sampling = chat.Sampling(temperature, top_p, max_new_tokens, seed)  # type: ignore[arg-type]
    answers = chat.answer_prompts(model, tokenizer, list(dialogs), sampling, batch_size)
    return [a["response"] for a in tqdm(answers, total=len(dialogs), desc=desc, leave=False)]


def score_answers(
    reward_model: LlamaScalar,
    tokenizer: Tokenizer,
    dialogs: Sequence[list[Message]],
    answers: Sequence[str],
    batch_size: int = 16,
) -> list[float]:
    """Raw reward of each ``dialog + [assistant answer]`` (:func:`reward_scores`; an empty or
    blank answer is scored as "…")."""
    complete = [
        [*dialog, {"role": "assistant", "content": answer.strip() or "…"}]
        for dialog, answer in zip(dialogs, answers, strict=True)
    ]
    return reward_scores(reward_model, tokenizer, complete, batch_size).tolist()


@torch.no_grad()
def reward_scores(
    model: LlamaScalar,
    tokenizer: Tokenizer,
    dialogs: Sequence[Sequence[Message]],
    batch_size: int = 16,
) -> torch.Tensor:
    """Raw rewards ``(N,)`` of complete dialogs (ending with the assistant answer to score), as
    :func:`score_answers`: a dialog longer than the context keeps its last ``max_seq_len`` tokens
    (the answer and the EOS the reward is read at)."""
    limit = model.config.max_seq_len
    rows = [tokenizer.encode_dialog(list(d))[-limit:] for d in dialogs]
    return score_token_rows(model, rows, tokenizer.pad_id, batch_size)


def play_dialogs(
    model: Llama,
    tokenizer: Tokenizer,
    dialogs: Sequence[tuple[str | None, Sequence[tuple[str, str | None]]]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int,
    batch_size: int,
) -> list[list[Message]]:
    """Play multi-turn dialogs to the end (:func:`llamalab.generation.play_turns`).

    ``dialogs[i]`` is ``(system or None, [(user text, fixed assistant reply or None), ...])``: a
    fixed reply is appended as is, otherwise the policy answers (turn ``t`` seeded
    ``seed + t * TURN_SEED_STRIDE``). Returns each dialog's messages; the last is the policy's
    answer to the last turn.
    """
    heads = [[{"role": "system", "content": system}] if system else [] for system, _ in dialogs]
    turns = [[({"role": "user", "content": u}, fixed) for u, fixed in t] for _, t in dialogs]
    messages, _ = play_turns(
        model,
        tokenizer,
        heads,
        turns,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        turn_stride=TURN_SEED_STRIDE,
    )
    return messages
