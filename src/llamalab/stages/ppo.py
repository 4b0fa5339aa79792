"""RLHF with PPO (PAPER.md §3.2.3): one Lightning training batch of prompts = one PPO iteration.

Each iteration: sample the batch's responses with the KV cache, score them with the frozen
helpfulness and safety reward models, turn the scores into per-token rewards (R~c =
WHITEN(LOGIT(Rc)) at the last token, -beta * KL against the frozen SFT reference at every token),
compute GAE advantages, then run ``ppo_epochs`` passes over mini-batches with one optimizer step
per mini-batch (manual optimisation; actor and critic share one AdamW with two parameter groups,
as DeepSpeed allows one optimizer only). ``trainer.max_steps`` keeps Lightning's meaning
(optimizer steps): :meth:`PPOStage.trainer_overrides` sets it from ``iterations``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from llamalab.model import Llama, LlamaScalar
from llamalab.optim import build_adamw, param_groups
from llamalab.pipeline import STAGES
from llamalab.rlhf import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    default_kl_coef,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    logit,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    sequence_rewards_to_token_rewards,
    truncation_penalty,
    value_loss,
    whiten,
)
from llamalab.stages.base import LlamaStage
from llamalab.stages.policy_eval import evaluate_batch, summarize
from llamalab.stages.rollout import (
    Rollout,
    Scores,
    build_rollout,
    in_chunks,
    response_logits,
    response_logprobs,
    response_values,
    sample_responses,
    score_rollout,
)

FROZEN = STAGES["ppo"].frozen_attributes  # submodules left out of checkpoints


@dataclass
class PPOConfig:
    """PPO settings (defaults: PAPER.md §3.2.3 and the common practice it notes)."""

    iterations: int = 400
    rollout_batch: int = 512  # prompts per iteration (per device)
    mini_batch: int = 64  # rows per optimizer step
    micro_batch: int | None = None  # rows per forward/backward inside a mini-batch (None = all)
    ppo_epochs: int = 1
    generation_batch: int = 64  # prompts per generate() call (bounds the KV cache)
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float | None = 0.01  # None = default_kl_coef(actor parameters)
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    safety_threshold: float = 0.15
    truncation_penalty: float = 1.0
    reward_whitening: str = "running"  # running (saved with checkpoints) | batch
    eval_every: int | None = 10  # iterations between held-out evaluations (None = never)
    eval_prompts: int | None = None  # held-out prompts per evaluation (None = all)
    eval_max_new_tokens: int | None = None  # None = max_new_tokens
    early_stopping_patience: int | None = None  # evaluations without a better held-out reward
    log_samples: int = 8  # rows of the W&B tables of samples
    gather_for_generation: str = "auto"  # ZeRO-3: gather the actor for generation

    def __post_init__(self) -> None:
        if self.reward_whitening not in ("running", "batch"):
            raise ValueError(
                f"reward_whitening must be running or batch, got {self.reward_whitening!r}"
            )
        if self.mini_batch < 1 or self.rollout_batch < 1 or self.ppo_epochs < 1:
            raise ValueError("rollout_batch, mini_batch and ppo_epochs must be >= 1")

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per iteration: one per mini-batch, per PPO epoch."""
        return self.ppo_epochs * math.ceil(self.rollout_batch / self.mini_batch)


@dataclass
class Experience:
    """Per-token targets of one rollout (B, R), all without gradient."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, rows: torch.Tensor) -> Experience:
        return Experience(*(getattr(self, f.name)[rows] for f in fields(self)))


def derive_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """A sampling seed for (run seed, iteration, rank): a resumed run draws the same tokens."""
    return (seed * 1_000_003 + iteration * 7_919 * 64 + rank * 104_729) % (2**31 - 1)


class PPOStage(LlamaStage):
    """Actor (``init``), frozen reference (same weights), critic (``critic_init``), frozen
    helpfulness and safety reward models; PPO on prompt batches (docs/interfaces.md)."""

    head = "lm"

    def __init__(
        self,
        arch: dict[str, Any],
        optim: dict[str, Any],
        critic_init: str | None = None,
        reward_helpful: str | None = None,
        reward_safety: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        names = {f.name for f in fields(PPOConfig)}
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        super().__init__(arch, optim, **kwargs)
        self.automatic_optimization = False
        self.cfg = PPOConfig(**settings)
        self.hparams.update(asdict(self.cfg))
        self.paths = {"critic": critic_init, "helpful": reward_helpful, "safety": reward_safety}
        self.seed = seed
        self.actor: Llama | None = None
        self.critic: LlamaScalar | None = None
        self.reference: Llama | None = None
        self.rm_helpful: LlamaScalar | None = None
        self.rm_safety: LlamaScalar | None = None
        self.kl_ctl: FixedKLController | AdaptiveKLController | None = None
        self.reward_moments = {k: RunningMoments() for k in ("combined", "helpful", "safety")}
        self.iteration = 0
        self.eval_state: dict[str, Any] = {"best": None, "bad_evals": 0}
        self._eval_samples: list[dict[str, Any]] = []
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """Build the five models once: actor and critic train, the other three are frozen."""
        if self.actor is not None:
            return
        from llamalab.stages.frozen import (
            check_same_vocabulary,
            load_critic,
            load_reference,
            load_reward_model,
        )

        missing = [k for k in ("critic", "helpful", "safety") if not self.paths[k]]
        if not self.init_path or missing:
            raise ValueError(
                f"PPO needs stage.init and the critic/reward paths (missing: {missing})"
            )
        actor = self.build_model()
        self.load_init(actor)
        if self.sharded:  # ZeRO-3 / FSDP: all five built sharded, loaded shard by shard
            from llamalab.scale.build import load_rlhf_models

            models = load_rlhf_models(self, {"reference": self.init_path, **self.paths})  # type: ignore[dict-item]
            reference, rm_helpful = models["reference"], models["rm_helpful"]
            rm_safety, critic = models["rm_safety"], models["critic"]
        else:
            reference = load_reference(self.init_path)
            rm_helpful = load_reward_model(str(self.paths["helpful"]), "reward_helpful")
            rm_safety = load_reward_model(str(self.paths["safety"]), "reward_safety")
            critic = load_critic(str(self.paths["critic"]))
        check_same_vocabulary(
            {
                "actor": actor,
                "critic": critic,
                "reward_helpful": rm_helpful,
                "reward_safety": rm_safety,
            }
        )
        self.reference, self.rm_helpful, self.rm_safety = reference, rm_helpful, rm_safety  # type: ignore[assignment]
        self.actor = self.wrap_model(actor)  # type: ignore[assignment]
        self.critic = self.wrap_model(critic)  # type: ignore[assignment]
        self.kl_ctl = self.make_kl_controller(actor)

    def make_kl_controller(self, actor: nn.Module) -> FixedKLController | AdaptiveKLController:
        beta = self.cfg.kl_coef
        if beta is None:  # the paper's beta for the actor's size
            beta = default_kl_coef(sum(p.numel() for p in actor.parameters()))
        if self.cfg.adaptive_kl:
            return AdaptiveKLController(beta, self.cfg.kl_target, self.cfg.kl_horizon)
        return FixedKLController(beta)

    def export_model(self) -> nn.Module:
        assert self.actor is not None
        return self.actor

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from llamalab.tokenizer import Tokenizer

            if self.tokenizer_path is None:
                raise ValueError("the PPO stage needs tokenizer_path (EOS and pad ids)")
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """One AdamW, two learning rates: the actor's groups at ``lr``, the critic's at
        ``critic_lr``; constant LR (PAPER.md §3.2.3), so no scheduler."""
        assert self.actor is not None and self.critic is not None
        o = self.optim_cfg
        groups = param_groups(self.actor.named_parameters(), o["weight_decay"], lr=o["lr"])
        groups += param_groups(
            self.critic.named_parameters(), o["weight_decay"], lr=o.get("critic_lr", o["lr"])
        )
        return build_adamw(
            groups,
            lr=o["lr"],
            betas=tuple(o.get("betas", (0.9, 0.95))),
            eps=o.get("eps", 1e-5),
            fused=o.get("fused"),
        )

    def trainer_overrides(self, trainer_cfg: Any) -> dict[str, Any]:
        """Trainer settings the PPO loop needs (called by ``llamalab.runner.run.train``).

        ``max_steps`` counts optimizer steps, so ``iterations * steps_per_iteration`` unless the
        user set it; epochs are unbounded (the prompt set is cycled); held-out evaluation every
        ``eval_every`` iterations (= training batches), over ``eval_prompts`` prompts.
        """
        out: dict[str, Any] = {"max_epochs": -1}
        if trainer_cfg.get("max_steps", -1) in (-1, None):
            out["max_steps"] = self.cfg.iterations * self.cfg.steps_per_iteration
        if self.cfg.eval_every:
            out.update(val_check_interval=int(self.cfg.eval_every), check_val_every_n_epoch=None)
            if self.cfg.eval_prompts:
                out["limit_val_batches"] = math.ceil(self.cfg.eval_prompts / self.cfg.rollout_batch)
        else:
            out["limit_val_batches"] = 0
        return out

    # ------------------------------------------------------------------ one iteration
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.actor is not None and self.kl_ctl is not None
        t0 = time.perf_counter()
        rollout = self.generate_rollout(batch["prompt_ids"], self.cfg.temperature, self.cfg.top_p)
        t1 = time.perf_counter()
        scores = self.score(rollout, batch["is_safety"])
        experience, stats = self.make_experience(rollout, scores)
        t2 = time.perf_counter()
        stats.update(self.ppo_update(rollout, experience))
        t3 = time.perf_counter()
        self.kl_ctl.update(float(stats["train/kl"]), len(rollout))
        stats.update(
            {
                "time/generate_s": t1 - t0,
                "time/score_s": t2 - t1,
                "time/train_s": t3 - t2,
                "train/iteration": float(self.iteration),
            }
        )
        self.log_dict(stats, on_step=True, on_epoch=False)
        # tokens/s and MFU of the whole iteration (every model's passes; frozen ones forward only)
        tokens = int(rollout.attention_mask.sum())
        self.log_throughput(tokens, self.iteration_flops(tokens / len(rollout)))
        self.log("train/reward", stats["train/reward_combined"], prog_bar=True, on_step=True)
        self.log("train/kl_ref", stats["train/kl"], prog_bar=True, on_step=True)
        if self.cfg.eval_every and self.iteration % self.cfg.eval_every == 0:
            self.log_samples_table("train/samples", batch["prompt_ids"], rollout, scores)
        self.iteration += 1

    def iteration_flops(self, mean_seq_len: float) -> float:
        """Model FLOPs of one iteration per token of experience (``llamalab.perf``)."""
        from llamalab.perf import ppo_flops_per_token

        assert self.actor is not None and self.critic is not None and self.rm_helpful is not None
        parts = ppo_flops_per_token(
            self.actor.config,  # type: ignore[arg-type]
            max(1, round(mean_seq_len)),
            value=self.critic.config,  # type: ignore[arg-type]
            reward=self.rm_helpful.config,  # type: ignore[arg-type]
            ppo_epochs=self.cfg.ppo_epochs,
        )
        return parts["total"]

    def generate_rollout(
        self, prompts: list[list[int]], temperature: float, top_p: float | None
    ) -> Rollout:
        """Sample one response per prompt (seeded by iteration and rank) and lay them out."""
        assert self.actor is not None
        tok = self.tokenizer
        rank = self.trainer.global_rank if self._trainer is not None else 0
        with self.generation_context() as actor:
            generated = sample_responses(
                actor,
                prompts,
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=temperature,
                top_p=None if top_p is None or top_p >= 1.0 else top_p,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                chunk_size=self.cfg.generation_batch,
                seed=derive_seed(self.seed, self.iteration, rank),
            )
        return build_rollout(prompts, generated, tok.pad_id, self.device)

    def generation_context(self) -> Any:
        """The actor to sample with: under ZeRO-3 / FSDP gathered once per rollout (PAPER.md
        §3.2.3: per-token gathering is ~20x slower) or, when it does not fit, per layer in
        lockstep across ranks (:func:`llamalab.scale.zero_gen.generation_model`)."""
        import contextlib

        if self._trainer is None or not self.sharded:
            return contextlib.nullcontext(self.actor)
        from llamalab.scale.zero_gen import generation_model

        return generation_model(self.actor, self.trainer.strategy, self.cfg.gather_for_generation)  # type: ignore[arg-type]

    def score(self, rollout: Rollout, is_safety: torch.Tensor) -> Scores:
        assert self.rm_helpful is not None and self.rm_safety is not None
        return score_rollout(
            self.rm_helpful,
            self.rm_safety,
            rollout,
            is_safety,
            self.cfg.mini_batch,
            self.cfg.safety_threshold,
        )

    @torch.no_grad()
    def make_experience(
        self, rollout: Rollout, scores: Scores
    ) -> tuple[Experience, dict[str, float]]:
        """Rewards (PAPER.md §3.2.3) and GAE advantages of a rollout, plus what to log."""
        actor, reference, critic = self.actor, self.reference, self.critic
        assert actor is not None and reference is not None and critic is not None
        assert self.kl_ctl is not None
        cfg, chunk, mask = self.cfg, self.cfg.mini_batch, rollout.response_mask
        old_logprobs = in_chunks(lambda r: response_logprobs(actor, r), rollout, chunk)
        ref_logprobs = in_chunks(lambda r: response_logprobs(reference, r), rollout, chunk)
        old_values = in_chunks(lambda r: response_values(critic, r), rollout, chunk)
        kl = kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # (B, R)
        # R~c = WHITEN(LOGIT(Rc)), then the length-limit penalty, then -beta*KL per token.
        raw = logit(scores.combined)
        if cfg.reward_whitening == "running":
            self.reward_moments["combined"].update(raw)
            score = self.reward_moments["combined"].whiten(raw)
        else:
            score = whiten(raw)
        penalised = truncation_penalty(score, rollout.finished, cfg.truncation_penalty)
        rewards = sequence_rewards_to_token_rewards(penalised, kl, mask, self.kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
        experience = Experience(old_logprobs, old_values, advantages, returns)
        stats = self.rollout_stats(rollout, scores, kl, old_logprobs, returns)
        stats.update(
            {"train/reward_whitened": float(score.mean()), "train/score": float(penalised.mean())}
        )
        return experience, stats

    def rollout_stats(
        self,
        rollout: Rollout,
        scores: Scores,
        kl: torch.Tensor,
        old_logprobs: torch.Tensor,
        returns: torch.Tensor,
    ) -> dict[str, float]:
        """Raw and whitened reward of each RM, KL, lengths, EOS rate (issue: W&B metrics)."""
        stats: dict[str, float] = {}
        for name, raw in (("helpful", scores.helpful_raw), ("safety", scores.safety_raw)):
            self.reward_moments[name].update(raw)
            stats[f"train/reward_raw_{name}"] = float(raw.mean())
            stats[f"train/reward_whitened_{name}"] = float(
                self.reward_moments[name].whiten(raw).mean()
            )
            stats[f"train/reward_{name}"] = float(torch.sigmoid(raw).mean())
        gap = (rollout.gen_logprobs - old_logprobs).abs() * rollout.response_mask
        stats.update(
            {
                "train/reward_combined": float(scores.combined.mean()),
                "train/used_safety_rm": float(scores.used_safety.float().mean()),
                "train/kl": float(kl.sum(dim=1).mean()),
                "train/kl_coef": float(self.kl_ctl.value),  # type: ignore[union-attr]
                "train/response_length": float(rollout.lengths.float().mean()),
                "train/eos_rate": float(rollout.finished.float().mean()),
                "train/returns": float(masked_mean(returns, rollout.response_mask)),
                "train/logprob_gap": float(gap.sum() / rollout.response_mask.sum().clamp_min(1)),
            }
        )
        return stats

    def ppo_update(self, rollout: Rollout, experience: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled mini-batches, one optimizer step each."""
        assert self.actor is not None and self.critic is not None
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list), "PPO uses one optimizer (actor + critic groups)"
        n_rows = len(rollout)
        n_mini = max(1, math.ceil(n_rows / self.cfg.mini_batch))
        micro = self.cfg.micro_batch or self.cfg.mini_batch
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.iteration) + 1)
        totals: dict[str, list[float]] = {}
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(n_rows, generator=generator).to(rollout.input_ids.device)
            for rows in order.tensor_split(n_mini):
                for part in rows.split(micro):
                    loss, stats = self.ppo_loss(rollout.select(part), experience.select(part))
                    if not self.check_finite(loss.detach(), "PPO loss"):
                        continue
                    self.manual_backward(loss * (len(part) / len(rows)))
                    for key, value in stats.items():
                        totals.setdefault(key, []).append(float(value))
                grad_clip = self.optim_cfg.get("grad_clip")
                if grad_clip:
                    self.clip_gradients(
                        optimizer,  # type: ignore[arg-type]
                        gradient_clip_val=grad_clip,
                        gradient_clip_algorithm="norm",
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return {k: sum(v) / len(v) for k, v in totals.items()}

    def ppo_loss(
        self, rollout: Rollout, experience: Experience
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy."""
        assert self.actor is not None and self.critic is not None
        mask = rollout.response_mask
        logits = response_logits(self.actor, rollout)
        logprobs = logprobs_from_logits(logits, rollout.response)
        values = response_values(self.critic, rollout)
        pg_loss, pg_stats = policy_loss(
            logprobs, experience.old_logprobs, experience.advantages, mask, self.cfg.clip
        )
        vf_loss, vf_clipfrac = value_loss(
            values, experience.old_values, experience.returns, mask, self.cfg.value_clip
        )
        entropy = masked_mean(entropy_from_logits(logits), mask)
        loss = pg_loss + self.cfg.vf_coef * vf_loss - self.cfg.entropy_coef * entropy
        return loss, {
            "train/policy_loss": pg_loss.detach(),
            "train/value_loss": vf_loss.detach(),
            "train/value_clipfrac": vf_clipfrac,
            "train/entropy": entropy.detach(),
            "train/clipfrac": pg_stats["clipfrac"],
            "train/approx_kl": pg_stats["approx_kl"],
            "train/ratio": pg_stats["ratio"],
            "train/explained_variance": explained_variance(
                values.detach(), experience.returns, mask
            ),
        }

    # ------------------------------------------------------------------ held-out evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.actor is not None and self.rm_helpful is not None
        assert self.rm_safety is not None
        with self.generation_context() as actor:  # gathered once under ZeRO-3 / FSDP
            samples = evaluate_batch(
                actor,
                batch["prompt_ids"],
                batch["is_safety"],
                self.tokenizer,
                self.rm_helpful,
                self.rm_safety,
                self.reference,
                max_new_tokens=self.cfg.eval_max_new_tokens or self.cfg.max_new_tokens,
                chunk_size=self.cfg.generation_batch,
                seed=derive_seed(self.seed, 0) + batch_idx,
                safety_threshold=self.cfg.safety_threshold,
            )
        for sample, index, prompt in zip(samples, batch["index"].tolist(), batch["prompt_ids"]):
            self._eval_samples.append({**sample, "index": index, "prompt_ids": prompt})

    def on_validation_epoch_end(self) -> None:
        samples, self._eval_samples = self._eval_samples, []
        if not samples:
            return
        records = self.eval_records([s["index"] for s in samples])
        metrics = summarize(samples, records)
        self.log_dict({f"eval/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self.log_eval_table(samples, records)
        self.track_early_stopping(metrics["reward"])

    def eval_records(self, indices: list[int]) -> list[dict[str, Any]] | None:
        """The held-out prompt records (for the ground-truth judge), when the data has them."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "records"):
            return None
        records = datamodule.records("val")
        return [records[i] for i in indices]

    def track_early_stopping(self, reward: float) -> None:
        """Stop when the held-out reward has not improved for ``early_stopping_patience`` evals."""
        best = self.eval_state["best"]
        if best is None or reward > best:
            self.eval_state.update(best=reward, bad_evals=0)
        else:
            self.eval_state["bad_evals"] += 1
        patience = self.cfg.early_stopping_patience
        if patience and self.eval_state["bad_evals"] >= patience and self.trainer.training:
            self.trainer.should_stop = True

    # ------------------------------------------------------------------ W&B tables
    def _wandb(self) -> Any:
        for logger in self.loggers:
            if hasattr(logger, "log_table"):
                return logger
        return None

    def log_samples_table(
        self, key: str, prompts: list[list[int]], rollout: Rollout, scores: Scores
    ) -> None:
        logger = self._wandb()
        if logger is None or not self.trainer.is_global_zero:
            return
        n = min(self.cfg.log_samples, len(rollout))
        rows = [
            [
                self.iteration,
                self.tokenizer.decode(prompts[i]),
                self.tokenizer.decode(
                    rollout.response[i][rollout.response_mask[i].bool()].tolist()
                ),
                float(scores.helpful_raw[i]),
                float(scores.safety_raw[i]),
                float(scores.combined[i]),
            ]
            for i in range(n)
        ]
        columns = ["iteration", "prompt", "response", "helpful_raw", "safety_raw", "reward"]
        logger.log_table(key=key, columns=columns, data=rows)

    def log_eval_table(self, samples: list[dict[str, Any]], records: list[Any] | None) -> None:
        logger = self._wandb()
        if logger is None or not self.trainer.is_global_zero:
            return
        from llamalab.data.judge import ground_truth

        rows = []
        for i, s in enumerate(samples[: self.cfg.log_samples]):
            truth = None
            if records is not None and (records[i].get("reference") or records[i].get("kind")):
                truth = ground_truth(records[i], s["response"])
            rows.append(
                [
                    self.iteration,
                    self.tokenizer.decode(s["prompt_ids"]),
                    s["response"],
                    s["helpful"],
                    s["safety"],
                    s["reward"],
                    truth,
                ]
            )
        columns = ["iteration", "prompt", "response", "helpful", "safety", "reward", "ground_truth"]
        logger.log_table(key="eval/samples", columns=columns, data=rows)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The actor under ``actor.`` (docs/interfaces.md), the critic, the PPO state; the frozen
        models are reloaded from their paths on resume, not saved."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["llamalab"]["prefix"] = "actor."
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.split(".", 1)[0] in FROZEN]:
            del state[key]
        assert self.kl_ctl is not None
        checkpoint["ppo"] = {
            "iteration": self.iteration,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_moments": {k: m.state_dict() for k, m in self.reward_moments.items()},
            "eval_state": dict(self.eval_state),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.setdefault("state_dict", {})
        for name, tensor in self.state_dict().items():  # frozen weights as loaded from paths
            if name.split(".", 1)[0] in FROZEN:
                state.setdefault(name, tensor)
        saved = checkpoint.get("ppo")
        if saved is None:
            return
        self.iteration = int(saved["iteration"])
        if self.kl_ctl is not None:
            self.kl_ctl.load_state_dict(saved["kl_controller"])
        for key, moments in self.reward_moments.items():
            moments.load_state_dict(saved["reward_moments"][key])
        self.eval_state = dict(saved["eval_state"])
