"""Rejection-sampling fine-tuning (PAPER.md §3.2.3): K answers per prompt from the SFT policy at
a high temperature, scored by the reward models, the best kept (pooled with earlier iterations'
best), then SFT on them with the SFT stage's own training step.

Sampling runs once, in ``setup("fit")`` before the optimizer and the schedule exist (the number
of training batches depends on what was kept). Under ZeRO-3 / FSDP the sampling policy and the
reward models are loaded sharded (the one loader, :func:`llamalab.scale.build.load_roles`) and
stay sharded: the policy samples through the rollout engine of ``stage.rollout_engine`` /
``stage.rollout_tp_size`` as PPO's actor does (:mod:`llamalab.scale.rollout_engine`: a gathered
copy, per-layer gathering, or a tensor-parallel copy inside each group of GPUs), and the reward
models score with sharded forwards, one unit gathered at a time
(:func:`llamalab.scale.zero_gen.sharded_forwards`). Those forwards are collectives, so every rank
runs the same chunks: the ranks' prompt shares are padded to equal counts with copies of the
first prompt, whose answers are dropped (:func:`pad_share`). Held-out evaluation does the same
with the trained policy (:func:`llamalab.stages.policy_eval.eval_policy`); no rank gathers a
whole model unless the engine is (or ``auto`` picks) ``gather``: then the policy alone, once for
all the chunks. The chosen dialogs are written to ``<run>/best_samples.jsonl``; a later iteration lists
earlier runs in ``pool_from``. Sampling seeds derive from ``seed`` (per rank, or per
tensor-parallel group leader), so a resumed run chooses the same answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalab.generation import GenerationOutput, sample_responses
from llamalab.rlhf.rollout import build_rollout, score_rollout
from llamalab.scale.build import Role, load_roles, module_sharding
from llamalab.scale.plan_gen import engine_settings
from llamalab.scale.rollout_engine import RolloutEngine, generation_how, stage_rollout
from llamalab.scale.zero_gen import sharded_forwards
from llamalab.stages.policy_eval import eval_policy, evaluate_batch, finish_evaluation
from llamalab.stages.sft import SFTStage

log = logging.getLogger("llamalab")
SAMPLES_FILE = "best_samples.jsonl"
RANK_SEED = 104_729  # rank r samples with seed + RANK_SEED * r (its TP group leader's under TP)


def pick_best(rewards: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """Index of the best of K answers per prompt: (N, K) rewards in (0, 1) and EOS flags ->
    (N,). An answer that ended with EOS beats any answer cut by the length limit; among equals
    the highest reward wins (the first on a tie)."""
    return (rewards + 2.0 * finished.float()).argmax(dim=1)


@torch.no_grad()
def best_of_k(
    policy: nn.Module,
    reward_helpful: nn.Module,
    reward_safety: nn.Module,
    items: list[dict[str, Any]],
    tokenizer: Any,
    *,
    num_samples: int,
    temperature: float,
    top_p: float | None,
    max_new_tokens: int,
    generation_batch: int,
    seed: int,
    safety_threshold: float,
    sample: Callable[..., GenerationOutput] | None = None,
) -> list[dict[str, Any]]:
    """For each prompt item, the best of ``num_samples`` answers under Rc (PAPER.md §3.2.3).

    An answer that ended with EOS always beats one cut by the length limit (fine-tuning on a
    cut answer would teach the model to ramble). Returns ``{"index", "response", "reward",
    "helpful", "safety", "mean_reward", "finished"}`` per item, in order. ``sample(prompts,
    **kwargs)`` draws the answers (default: ``sample_responses`` on ``policy``; the stage hands
    its rollout engine's); each chunk of ``generation_batch // num_samples`` prompts is one
    call, seeded ``seed + 7919 * start``, and one scoring pass.
    """
    device = next(policy.parameters()).device
    per_call = max(1, generation_batch // num_samples)  # prompts per chunk, K answers each
    draw = sample or (lambda rows, **kwargs: sample_responses(policy, rows, **kwargs))
    chosen = []
    for start in range(0, len(items), per_call):
        chunk = items[start : start + per_call]
        prompts = [item["prompt_ids"] for item in chunk for _ in range(num_samples)]
        generated = draw(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            seed=seed + 7_919 * start,
            # one call for this chunk; a TP group fills calls of generation_batch rows
            chunk_size=max(len(prompts), generation_batch),
        )
        rollout = build_rollout(prompts, generated, tokenizer.pad_id, device)
        is_safety = torch.tensor([item["is_safety"] for item in chunk for _ in range(num_samples)])
        scores = score_rollout(
            reward_helpful, reward_safety, rollout, is_safety, generation_batch, safety_threshold
        )
        rc = scores.combined.view(len(chunk), num_samples)
        best = pick_best(rc, rollout.finished.view(len(chunk), num_samples))
        for i, item in enumerate(chunk):
            j = i * num_samples + int(best[i])
            chosen.append(
                {
                    "index": int(item["index"]),
                    "response": tokenizer.decode(generated.tokens[j]),
                    "reward": float(scores.combined[j]),
                    "helpful": float(torch.sigmoid(scores.helpful_raw[j])),
                    "safety": float(torch.sigmoid(scores.safety_raw[j])),
                    "mean_reward": float(rc[i].mean()),
                    "finished": bool(generated.finished[j]),
                }
            )
    return chosen


def pad_share(items: list[dict[str, Any]], rank: int, world: int) -> tuple[list[Any], int]:
    """Rank ``rank``'s share of ``items`` (every ``world``-th, from ``rank``), padded with copies
    of the first item to the largest share's length, and how many of it are real: sharded
    generation and scoring are collectives, so every rank must run the same chunks; the answers
    to the padding are dropped."""
    share = items[rank::world]
    size = -(-len(items) // world)
    return share + [items[0]] * (size - len(share)), len(share)


def read_pool(paths: list[str]) -> list[dict[str, Any]]:
    """Chosen dialogs of earlier iterations: each path a ``best_samples.jsonl`` or a run
    directory (or its ``latest`` link) holding one."""
    rows = []
    for path in paths:
        p = Path(path)
        file = p / SAMPLES_FILE if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(
                f"stage.pool_from: {path} has no {SAMPLES_FILE} (a rejection-sampling run writes it)"
            )
        rows += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return rows


def pool_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dialog per prompt: the highest reward over every iteration (PAPER.md §3.2.3)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = json.dumps(row["messages"][:-1], sort_keys=True)
        if key not in best or row["reward"] > best[key]["reward"]:
            best[key] = row
    return list(best.values())


def zero3_init(strategy: Any) -> Any:
    """``deepspeed.zero.Init`` with the strategy's ZeRO settings, usable in ``setup``: Lightning's
    ``model_sharded_context`` would complete the DeepSpeed config from the training batches,
    which exist only once the answers are chosen."""
    import deepspeed  # lazy: optional heavy dependency, only under a DeepSpeed strategy

    config = {"train_micro_batch_size_per_gpu": 1, **dict(strategy.config or {})}
    return deepspeed.zero.Init(config_dict_or_path=config, remote_device=strategy.remote_device)


class RejectionSamplingStage(SFTStage):
    """SFT on the best of K sampled answers (data: ``RejectionSamplingDataModule``)."""

    def __init__(
        self,
        *args: Any,
        reward_helpful: str | None = None,
        reward_safety: str | None = None,
        num_samples: int = 10,
        temperature: float = 1.2,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        generation_batch: int = 64,
        max_prompts: int | None = None,
        pool_from: list[str] | str | None = None,
        safety_threshold: float = 0.15,
        eval_max_new_tokens: int | None = None,
        seed: int = 0,
        rollout_engine: str = "auto",
        rollout_tp_size: int | None = None,
        gather_for_generation: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("sample_generations", 0)
        super().__init__(*args, max_new_tokens=max_new_tokens, **kwargs)
        if num_samples < 1:
            raise ValueError(f"stage.num_samples must be >= 1, got {num_samples}")
        self.paths = {"helpful": reward_helpful, "safety": reward_safety}
        self.sampling: dict[str, Any] = dict(
            num_samples=num_samples,
            temperature=temperature,
            top_p=None if top_p >= 1.0 else top_p,
            max_new_tokens=max_new_tokens,
            generation_batch=generation_batch,
            safety_threshold=safety_threshold,
        )
        self.max_prompts = max_prompts
        self.pool_from = [pool_from] if isinstance(pool_from, str) else list(pool_from or [])
        self.eval_max_new_tokens = eval_max_new_tokens or max_new_tokens
        self.seed = seed
        engine, tp_size = engine_settings(rollout_engine, rollout_tp_size, gather_for_generation)
        self.rollouts = RolloutEngine(engine, tp_size)  # samples with the sharded policies
        self.frozen: dict[str, nn.Module] = {}  # not submodules: never trained or checkpointed
        self.dialogs: list[dict[str, Any]] | None = None
        self._eval_samples: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ sampling
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.dialogs is not None:
            return
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
        self.load_frozen(self.trainer.strategy.root_device)
        t0 = time.perf_counter()
        chosen = self.sample_shard(datamodule)
        records = datamodule.records("train")
        dialogs = [self.as_dialog(records[c["index"]], c) for c in chosen]
        dialogs = self.gather(dialogs)
        if self.pool_from:
            dialogs = pool_best(dialogs + read_pool(self.pool_from))
        self.dialogs = dialogs
        summary = datamodule.set_dialogs(dialogs)
        self.report_sampling(chosen, summary, time.perf_counter() - t0)

    def load_frozen(self, device: torch.device) -> None:
        """The sampling policy (``init``, also the KL reference) and the two reward models,
        sharded like the trained policy under ZeRO-3 / FSDP, whole on ``device`` otherwise."""
        if self.frozen:
            return
        if not (self.init_path and self.paths["helpful"] and self.paths["safety"]):
            raise ValueError(
                "rejection sampling needs stage.init, reward_helpful and reward_safety"
            )
        roles = {
            "policy": Role(self.init_path, "lm", False, "init"),
            "helpful": Role(self.paths["helpful"], "scalar", False, "reward_helpful"),
            "safety": Role(self.paths["safety"], "scalar", False, "reward_safety"),
        }
        mode = module_sharding(self)
        if mode == "none":
            self.frozen = {k: m.to(device) for k, m in load_roles(self, roles).items()}
            return
        with zero3_init(self.trainer.strategy) if mode == "zero3" else contextlib.nullcontext():
            self.frozen = load_roles(self, roles)

    def sample_shard(self, datamodule: Any) -> list[dict[str, Any]]:
        """Best-of-K over this rank's share of the training prompts: with the frozen models
        themselves when they are whole; sharded, through the rollout engine and sharded
        scoring forwards over a share padded to the other ranks' length (module docstring)."""
        items = datamodule.prompt_items("train")[: self.max_prompts]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        frozen, mode = self.frozen, module_sharding(self)
        models = (frozen["policy"], frozen["helpful"], frozen["safety"])
        if mode == "none":
            share = items[rank::world]
            seed = self.seed + RANK_SEED * rank
            return best_of_k(*models, share, datamodule.tokenizer, seed=seed, **self.sampling)
        share, real = pad_share(items, rank, world)
        # One engine for every chunk, chosen once (auto weighs free memory, which a kept copy
        # changes); under gather one whole copy of the policy serves every chunk.
        engine = self.rollouts.choose(frozen["policy"], mode, int(self.trainer.num_devices))
        if rank == 0:
            log.info("rejection sampling: best-of-K with the %s rollout engine", engine)

        copy: nn.Module | None = None  # the gathered policy under gather

        def sample(prompts: list[list[int]], *, seed: int, **kwargs: Any) -> GenerationOutput:
            if copy is not None:
                return sample_responses(copy, prompts, seed=seed + RANK_SEED * rank, **kwargs)
            return stage_rollout(
                self.rollouts,
                self,
                frozen["policy"],
                prompts,
                seed_of=lambda r: seed + RANK_SEED * r,
                keep=True,  # one TP copy for every chunk: the frozen weights never change
                chosen=engine,
                **kwargs,
            )

        with contextlib.ExitStack() as stack:
            stack.callback(self.rollouts.release)
            if engine == "gather":
                copy = stack.enter_context(self.generation_context(frozen["policy"], "always"))
            stack.enter_context(sharded_forwards(list(models), mode))
            chosen = best_of_k(
                *models, share, datamodule.tokenizer, seed=self.seed, sample=sample,
                **self.sampling,
            )  # fmt: skip
        return chosen[:real]

    @staticmethod
    def as_dialog(record: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
        messages = [*record["prompt"], {"role": "assistant", "content": chosen["response"]}]
        return {"messages": messages, **{k: chosen[k] for k in ("reward", "helpful", "safety")}}

    def gather(self, dialogs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every rank's chosen dialogs, through files in the run directory; rank 0's file
        ``best_samples.jsonl`` holds them all."""
        out = Path(self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        strategy, rank = self.trainer.strategy, self.trainer.global_rank
        shard = out / f"{SAMPLES_FILE}.rank{rank}"
        shard.write_text("".join(json.dumps(d) + "\n" for d in dialogs))
        strategy.barrier("rejection-sampling-gather")
        everything = []
        for r in range(self.trainer.world_size):
            everything += read_pool([str(out / f"{SAMPLES_FILE}.rank{r}")])
        strategy.barrier("rejection-sampling-read")
        shard.unlink()
        if rank == 0:
            (out / SAMPLES_FILE).write_text("".join(json.dumps(d) + "\n" for d in everything))
        return everything

    def report_sampling(
        self, chosen: list[dict[str, Any]], summary: dict[str, int], seconds: float
    ) -> None:
        """Best vs mean reward of the K samples (the gain of rejection sampling), to the logs."""
        n = max(1, len(chosen))
        stats = {
            "rs/best_reward": sum(c["reward"] for c in chosen) / n,
            "rs/mean_reward": sum(c["mean_reward"] for c in chosen) / n,
            "rs/best_eos_rate": sum(c["finished"] for c in chosen) / n,
            "rs/dialogs": float(len(self.dialogs or [])),
            "rs/rows": float(summary["rows"]),
            "time/sampling_s": seconds,
        }
        for logger in self.loggers:
            logger.log_metrics(stats, step=0)
        rows = [[c["index"], c["response"], c["reward"], c["mean_reward"]] for c in chosen[:16]]
        self.log_table("rs/best", ["index", "response", "reward", "mean_reward"], rows)

    # ------------------------------------------------------------------ held-out evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Judge greedy answers to held-out prompts (batches of ``PromptDataModule``)."""
        assert self.model is not None
        self.load_frozen(self.device)
        tokenizer = self.trainer.datamodule.tokenizer  # type: ignore[attr-defined]
        frozen, how = self.frozen, generation_how(self.rollouts.engine)
        with (
            eval_policy(self, how, self.export_model()) as (policy, sampler),
            sharded_forwards(list(frozen.values()), module_sharding(self)),
        ):
            samples = evaluate_batch(
                policy,
                batch["prompt_ids"],
                batch["is_safety"],
                tokenizer,
                frozen["helpful"],
                frozen["safety"],
                frozen["policy"],  # the KL reference: the sampling policy
                max_new_tokens=self.eval_max_new_tokens,
                chunk_size=self.sampling["generation_batch"],
                seed=self.seed + batch_idx,
                safety_threshold=self.sampling["safety_threshold"],
                sample=sampler,
            )
        for sample, index in zip(samples, batch["index"].tolist()):
            self._eval_samples.append({**sample, "index": index})

    def on_validation_epoch_end(self) -> None:
        self.rollouts.release()  # the trained policy's TP copy: training changes the weights
        samples, self._eval_samples = self._eval_samples, []
        if samples:
            finish_evaluation(self, samples)
