"""Losses that do not depend on how a batch is cut (README, Scale): PPO's policy/value loss and
SFT's (rejection sampling's) answer-token loss are token means over the whole (mini-)batch, all
micro-batches and ranks together. With ragged lengths, the gradients of micro-batches of 1, 2
and the whole batch are equal on 1 process and on 2 (gloo); the old rule, each micro-batch's
own mean weighted by its share of rows, is shown to differ (so these tests can fail)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from llamalab.data.sampling import ResumableRandomSampler, StepBatches
from llamalab.data.sft import stack_rows
from llamalab.model import Llama, LlamaConfig, LlamaScalar
from llamalab.rlhf.experience import Experience, mini_batch_backward, ppo_objective
from llamalab.rlhf.rollout import Rollout, response_logits, response_values
from llamalab.stages.pretrain import token_mean_objective

# The file also spawns 2 gloo processes (the last test): README "Tests", the suite split.
pytestmark = [pytest.mark.distributed]

VOCAB, PROMPT, RESPONSE = 64, 3, 8
LOSS = {"clip": 0.2, "value_clip": 0.2, "vf_coef": 0.1, "entropy_coef": 0.01}
CONFIG = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=VOCAB, multiple_of=16)


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    actor, critic = Llama(CONFIG), LlamaScalar(CONFIG)
    actor.init_weights()
    critic.init_weights()
    return actor, critic


def rollout_of(lengths: list[int]) -> tuple[Rollout, Experience]:
    """A rollout with responses of ``lengths`` tokens (right padded) and fixed PPO targets."""
    g = torch.Generator().manual_seed(1)
    b = len(lengths)
    mask = (torch.arange(RESPONSE)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, VOCAB, (b, PROMPT + RESPONSE), generator=g)
    attention = torch.cat([torch.ones(b, PROMPT, dtype=torch.long), mask], dim=1)
    rollout = Rollout(
        ids * attention, attention, ids[:, PROMPT:] * mask, mask, mask[:, -1] == 0,
        torch.zeros(b, RESPONSE), PROMPT,
    )  # fmt: skip

    def noise() -> torch.Tensor:
        return torch.randn(b, RESPONSE, generator=g) * mask

    experience = Experience(noise() - 4.0, noise(), noise(), noise())
    return rollout, experience


def flat_grads(*modules: nn.Module) -> torch.Tensor:
    grads = [p.grad.flatten() for m in modules for p in m.parameters() if p.grad is not None]
    out = torch.cat(grads)
    for m in modules:
        m.zero_grad(set_to_none=True)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def ppo_grads(rows: torch.Tensor, micro: int, token_count: float, lengths: list[int]):
    """This rank's gradient of one mini-batch, through the stage's own loop."""
    actor, critic = models()
    rollout, experience = rollout_of(lengths)
    mini_batch_backward(
        actor, critic, rollout, experience, rows, micro, token_count,
        lambda loss: loss.backward(), **LOSS,
    )  # fmt: skip
    return flat_grads(actor, critic)


def old_ppo_grads(rows: torch.Tensor, micro: int, lengths: list[int]) -> torch.Tensor:
    """The rule this replaces: each micro-batch's token mean, weighted by its share of rows."""
    actor, critic = models()
    rollout, experience = rollout_of(lengths)
    for part in rows.split(micro):
        batch, targets = rollout.select(part), experience.select(part)
        logits, values = response_logits(actor, batch), response_values(critic, batch)
        loss, _ = ppo_objective(logits, values, batch, targets, **LOSS)
        (loss * len(part) / len(rows)).backward()
    return flat_grads(actor, critic)


def test_ppo_gradient_does_not_depend_on_the_micro_batch() -> None:
    lengths = [1, 8, 8, 8]  # one early EOS
    rows, tokens = torch.arange(4), float(sum(lengths))
    whole = ppo_grads(rows, 4, tokens, lengths)
    for micro in (1, 2):
        assert rel(ppo_grads(rows, micro, tokens, lengths), whole) <= 1e-5
    # The whole mini-batch in one micro-batch is the plain token mean (the old rule agrees).
    assert rel(old_ppo_grads(rows, 4, lengths), whole) <= 1e-5
    assert rel(old_ppo_grads(rows, 1, lengths), whole) > 0.1  # 0.77 here


# ------------------------------------------------------------------------- SFT
def sft_rows(n: int = 4, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """Packed SFT rows with very different answer-token counts (-100 on prompt tokens)."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for i, answer in enumerate([1, 11, 6, 11, 2, 9, 11, 3][:n]):
        ids = torch.randint(1, VOCAB, (seq,), generator=g)
        labels = ids.clone()
        labels[: seq - answer] = -100
        rows.append({"input_ids": ids, "labels": labels, "row": torch.tensor(i)})
    return rows


def sft_grads(
    rows: list[dict], micro: int, step_rows: int, world: int = 1, rank: int = 0, old: bool = False
) -> torch.Tensor:
    """One optimizer step as Lightning runs it: micro-batches of ``StepBatches``, each objective
    divided by the accumulation, the ranks' gradients averaged (``old``: plain micro-batches,
    each its own token mean)."""
    actor, _ = models()
    sampler = ResumableRandomSampler(
        len(rows), seed=0, shuffle=False, num_replicas=world, rank=rank
    )
    loader = torch.utils.data.DataLoader(rows, step_rows, sampler=sampler, collate_fn=stack_rows)
    accumulate = step_rows // micro
    count = None
    for batch in StepBatches(loader, micro):
        if count is None and not old:  # summed over the ranks once per step
            count = batch["step_tokens"].float()
            if world > 1:
                dist.all_reduce(count)
        objective, _, _ = token_mean_objective(
            actor(batch["input_ids"]), batch["labels"], count, world * accumulate
        )
        (objective / accumulate).backward()
    grads = flat_grads(actor)
    if world > 1:
        dist.all_reduce(grads)
        grads /= world
    return grads


def test_sft_gradient_does_not_depend_on_the_micro_batch() -> None:
    rows = sft_rows()
    whole = sft_grads(rows, 4, 4)
    for micro in (1, 2):
        assert rel(sft_grads(rows, micro, 4), whole) <= 1e-5
    assert rel(sft_grads(rows, 1, 4, old=True), whole) > 0.1


# ------------------------------------------------------------------------- 2 processes (gloo)
def _two_ranks(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        lengths = [1, 8, 3, 8, 8, 2, 5, 8]  # the global mini-batch; rank r holds rows r::2
        mine = torch.arange(rank, 8, 2)
        count = torch.tensor(float(sum(lengths[i] for i in mine.tolist())))
        dist.all_reduce(count)
        out = {}
        for micro in (1, 2, 4):
            grads = ppo_grads(mine, micro, float(count) / 2, lengths)
            dist.all_reduce(grads)
            out[f"ppo{micro}"] = grads / 2
        rows = sft_rows(8)
        for micro in (1, 2, 4):
            out[f"sft{micro}"] = sft_grads(rows, micro, 4, world=2, rank=rank)
        out["sft_old"] = sft_grads(rows, 1, 4, world=2, rank=rank, old=True)
        if rank == 0:
            results.update(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gradients_on_two_processes_equal_the_whole_batch() -> None:
    """Two gloo ranks, each with half of a ragged mini-batch: the averaged gradient equals the
    single-process gradient of the whole batch, for every micro-batch size."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_two_ranks, args=(port, results), nprocs=2, join=True)
    lengths = [1, 8, 3, 8, 8, 2, 5, 8]
    whole = ppo_grads(torch.arange(8), 8, float(sum(lengths)), lengths)
    for micro in (1, 2, 4):
        assert rel(results[f"ppo{micro}"], whole) <= 1e-5, micro
    rows = sft_rows(8)
    whole = sft_grads(rows, 8, 8)
    for micro in (1, 2, 4):
        assert rel(results[f"sft{micro}"], whole) <= 1e-5, micro
    assert rel(results["sft_old"], whole) > 0.1
