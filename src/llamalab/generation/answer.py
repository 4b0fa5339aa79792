"""Answering prompts: chunked, seeded sampling, and dialogs in -> answers (text cut at EOS) out.

One path for every place that answers prompts: SFT's validation samples
(:mod:`llamalab.stages.sft`), ``src/generate.py`` and ``src/chat.py`` (:mod:`llamalab.chat`)
call :func:`answer_prompts`; Ghost Attention's samples and its adherence by turn
(:mod:`llamalab.data.gatt`) call :func:`answer_turns` (multi-turn dialogs, turn by turn), and
the red-team and win-rate suites :func:`play_turns` (the same, with fixed replies); PPO's
rollouts, rejection sampling and the held-out policy evaluation start from token ids and call
:func:`sample_responses`.

Chunk ``k`` of a call samples with ``seed + k * seed_stride``: the result depends only on
(weights, prompts, seed, chunk size), which is what an exactly resumed run needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from llamalab.generation.sampling import GenerationOutput, generate
from llamalab.tokenizer import Tokenizer

Message = dict[str, str]  # {"role", "content"}, as Tokenizer.encode_dialog reads it


@dataclass
class Answer:
    """One prompt's answer: ``response`` (text without EOS, stripped), the new token ids (EOS
    included) and whether it ended with EOS."""

    response: str
    tokens: list[int]
    finished: bool


def generate_chunks(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    chunk_size: int,
    seed: int | None,
    seed_stride: int = 1,
    **sampling: Any,
) -> Iterator[GenerationOutput]:
    """``generate`` over ``prompts`` in chunks of ``chunk_size`` (bounds the KV cache memory),
    the model in eval mode meanwhile; chunk ``k`` uses ``seed + k * seed_stride``."""
    if chunk_size < 1:
        raise ValueError(f"the batch size must be >= 1, got {chunk_size}")
    was_training = model.training
    model.eval()
    try:
        for k, start in enumerate(range(0, len(prompts), chunk_size)):
            yield generate(
                model,  # type: ignore[arg-type]
                [list(p) for p in prompts[start : start + chunk_size]],
                seed=None if seed is None else seed + k * seed_stride,
                **sampling,
            )
    finally:
        model.train(was_training)


def merge_generations(
    outputs: Sequence[GenerationOutput] | Iterator[GenerationOutput],
) -> GenerationOutput:
    """Several ``generate`` results (chunks of one batch) as one, in order."""
    merged = GenerationOutput([], [], [])
    for out in outputs:
        merged.tokens += out.tokens
        merged.logprobs += out.logprobs
        merged.finished += out.finished
    return merged


def sample_responses(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    eos_id: int,
    pad_id: int,
    seed: int,
    chunk_size: int,
) -> GenerationOutput:
    """One sampled response per prompt (token ids in and out), chunk ``k`` seeded ``seed + k``."""
    return merge_generations(
        generate_chunks(
            model,
            prompts,
            chunk_size=chunk_size,
            seed=seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=eos_id,
            pad_id=pad_id,
        )
    )


def decode_answer(tokenizer: Tokenizer, tokens: Sequence[int]) -> str:
    """New token ids as answer text: without the EOS id, surrounding whitespace stripped."""
    return tokenizer.decode(t for t in tokens if t != tokenizer.eos_id).strip()


def answer_prompts(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[list[Message]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int | None,
    batch_size: int | None = None,
    seed_stride: int = 1,
    encode: Callable[[list[Message]], list[int]] | None = None,
    compile: bool = False,
) -> Iterator[Answer]:
    """Answer each dialog, in order, lazily one batch at a time (batch ``b`` seeded
    ``seed + b * seed_stride``).

    Each dialog is encoded with ``encode`` (default: Meta's chat format, cut from the left to
    leave ``max_new_tokens`` of room in the model's context), batched by ``batch_size`` (None:
    one batch), answered with the KV cache (``compile``: the compiled decode step) and decoded
    up to its EOS (:func:`decode_answer`).
    """
    if encode is None:
        room = max(1, model.config.max_seq_len - max_new_tokens)  # type: ignore[union-attr, operator]

        def encode(messages: list[Message]) -> list[int]:
            return tokenizer.encode_dialog(messages)[-room:]

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    size = batch_size or max(1, len(prompts))
    for b, start in enumerate(range(0, len(prompts), size)):
        ids = [encode(messages) for messages in prompts[start : start + size]]
        (output,) = generate_chunks(
            model,
            ids,
            chunk_size=len(ids),
            seed=None if seed is None else seed + b * seed_stride,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            compile=compile,
        )
        for tokens, finished in zip(output.tokens, output.finished, strict=True):
            yield Answer(decode_answer(tokenizer, tokens), tokens, bool(finished))


TURN_SEED_STRIDE = 1_000_003  # play_turns / answer_turns: turn t is seeded seed + t * stride


def play_turns(
    model: nn.Module,
    tokenizer: Tokenizer,
    heads: Sequence[Sequence[Message]],
    turns: Sequence[Sequence[tuple[Message, str | None]]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int,
    batch_size: int | None = None,
    turn_stride: int = TURN_SEED_STRIDE,
) -> tuple[list[list[Message]], list[list[Answer]]]:
    """Play multi-turn dialogs to their end, turn by turn, batched across dialogs.

    Dialog ``i`` starts with ``heads[i]`` (a system message, or nothing) and has the turns
    ``turns[i]``: ``(user message, fixed assistant reply or None)``. At turn ``t`` every dialog
    with more than ``t`` turns gets its user message; a fixed reply is appended as it is (a
    primed history), otherwise the model answers given the dialog so far, its own earlier
    answers included. Turn ``t``'s answers are one :func:`answer_prompts` call seeded
    ``seed + t * turn_stride``, so the result is a function of (weights, dialogs, seed, batch
    size). Returns each dialog's messages and the model's answers, in turn order.
    """
    messages: list[list[Message]] = [[dict(m) for m in head] for head in heads]
    answers: list[list[Answer]] = [[] for _ in heads]
    for t in range(max((len(x) for x in turns), default=0)):
        pending = []
        for i, dialog_turns in enumerate(turns):
            if len(dialog_turns) <= t:
                continue
            user, fixed = dialog_turns[t]
            messages[i].append(dict(user))
            if fixed is not None:
                messages[i].append({"role": "assistant", "content": fixed})
            else:
                pending.append(i)
        replies = answer_prompts(
            model,
            tokenizer,
            [messages[i] for i in pending],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + t * turn_stride,
            batch_size=batch_size,
        )
        for i, reply in zip(pending, replies, strict=True):
            messages[i].append({"role": "assistant", "content": reply.response})
            answers[i].append(reply)
    return messages, answers


def answer_turns(
    model: nn.Module,
    tokenizer: Tokenizer,
    dialogs: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int,
    batch_size: int | None = None,
    turn_stride: int = TURN_SEED_STRIDE,
) -> list[list[Answer]]:
    """Answer multi-turn dialogs turn by turn, each from its own earlier answers
    (:func:`play_turns` with no fixed reply).

    ``dialogs[i]`` holds a dialog's messages without answers: an optional system message, then
    its user turns. Returns each dialog's answers in turn order.
    """
    for index, dialog in enumerate(dialogs):
        roles = [m["role"] for m in dialog]
        if "assistant" in roles or "user" not in roles:
            raise ValueError(
                f"dialog {index}: give the user turns (and an optional system) without answers"
            )
    heads = [[m for m in d if m["role"] != "user"] for d in dialogs]
    turns = [[(m, None) for m in d if m["role"] == "user"] for d in dialogs]
    _, answers = play_turns(
        model,
        tokenizer,
        heads,
        turns,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        turn_stride=turn_stride,
    )
    return answers
