"""RLHF with PPO (PAPER.md §3.2.3): one Lightning training batch of prompts = one PPO iteration.

Each iteration: sample the batch's responses with the KV cache, score them with the frozen
helpfulness and safety reward models, turn the scores into per-token rewards (R~c =
WHITEN(LOGIT(Rc)), LOGIT(Rc) being the chosen raw score, at the last token; -beta * KL against
the frozen SFT reference at every token), compute GAE advantages, then run ``ppo_epochs`` passes
over mini-batches with one optimizer step per mini-batch (manual optimisation; actor and critic
share one AdamW with two parameter groups, as DeepSpeed allows one optimizer only).
``trainer.max_steps`` keeps Lightning's meaning (optimizer steps):
:meth:`PPOStage.trainer_overrides` sets it from ``iterations``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import nn

from llamalab.model import Llama, LlamaScalar
from llamalab.optim import build_adamw, param_groups
from llamalab.perf import ppo_flops_per_token
from llamalab.pipeline import STAGES
from llamalab.rlhf import AdaptiveKLController, FixedKLController, RunningMoments
from llamalab.rlhf.experience import (
    Experience,
    experience_stats,
    make_experience,
    mini_batch_backward,
)
from llamalab.rlhf.rollout import (
    Rollout,
    Scores,
    build_rollout,
    in_chunks,
    response_logprobs,
    response_values,
    score_rollout,
)
from llamalab.scale.batches import BatchLayout
from llamalab.scale.build import Role, check_same_vocabulary, load_roles
from llamalab.scale.rollout_engine import RolloutEngine, stage_rollout
from llamalab.stages import ppo_config
from llamalab.stages.base import LlamaStage
from llamalab.stages.policy_eval import (
    EVAL_COLUMNS,
    ROLLOUT_COLUMNS,
    eval_policy,
    eval_table,
    evaluate_batch,
    finish_evaluation,
    rollout_table,
)
from llamalab.stages.ppo_config import PPOConfig, actor_parameters, derive_seed, kl_controller
from llamalab.tokenizer import Tokenizer

FROZEN = STAGES["ppo"].frozen_attributes  # submodules left out of checkpoints
__all__ = ["FROZEN", "PPOConfig", "PPOStage", "derive_seed"]


class PPOStage(LlamaStage):
    """Actor (``init``), frozen KL reference (``reference``; None: ``init``), critic
    (``critic_init``), frozen reward models; PPO on prompt batches (docs/interfaces.md)."""

    frozen = FROZEN

    head = "lm"
    chat_model = True

    def __init__(
        self,
        arch: dict[str, Any],
        optim: dict[str, Any],
        critic_init: str | None = None,
        reference: str | None = None,
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
        self.paths["reference"] = reference or self.init_path
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
        self.rollouts = RolloutEngine(self.cfg.rollout_engine, self.cfg.rollout_tp_size)

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """Build the five models once: actor and critic train, the other three are frozen."""
        if self.actor is not None:
            return
        missing = [k for k in ("critic", "helpful", "safety") if not self.paths[k]]
        if not self.init_path or missing:
            raise ValueError(
                f"PPO needs stage.init and the critic/reward paths (missing: {missing})"
            )
        actor = self.build_model()
        self.load_init(actor)
        models = load_roles(  # sharded like the actor under ZeRO-3 / FSDP, whole otherwise
            self,
            {
                "reference": Role(str(self.paths["reference"]), "lm", False, "reference"),
                "rm_helpful": Role(str(self.paths["helpful"]), "scalar", False, "reward_helpful"),
                "rm_safety": Role(str(self.paths["safety"]), "scalar", False, "reward_safety"),
                "critic": Role(str(self.paths["critic"]), "scalar", True, "critic_init"),
            },
        )
        check_same_vocabulary(
            {
                "actor": actor,
                "reference": models["reference"],
                "critic": models["critic"],
                "reward_helpful": models["rm_helpful"],
                "reward_safety": models["rm_safety"],
            }
        )
        self.reference, self.rm_helpful = models["reference"], models["rm_helpful"]  # type: ignore[assignment]
        self.rm_safety = models["rm_safety"]  # type: ignore[assignment]
        self.actor = self.wrap_model(actor)  # type: ignore[assignment]
        self.critic = self.wrap_model(models["critic"])  # type: ignore[assignment]
        self.kl_ctl = kl_controller(self.cfg, actor_parameters(actor))

    def export_model(self) -> nn.Module:
        assert self.actor is not None
        return self.actor

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
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
        """Trainer settings the PPO loop needs (called by ``llamalab.runner.run.train``)."""
        return ppo_config.trainer_overrides(self.cfg, trainer_cfg)

    # ------------------------------------------------------------------ one iteration
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.actor is not None and self.kl_ctl is not None
        t0 = time.perf_counter()
        rollout = self.generate_rollout(batch["prompt_ids"], self.cfg.temperature, self.cfg.top_p)
        t1 = time.perf_counter()
        scores = self.score(rollout, batch["is_safety"])
        experience, stats = self.experience(rollout, scores, batch["is_safety"])
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
        every = self.cfg.eval_every
        if self.table_loggers() and every and self.iteration % every == 0:
            n, tok = self.cfg.log_samples, self.tokenizer
            rows = rollout_table(self.iteration, tok, batch["prompt_ids"], rollout, scores, n)
            self.log_table("train/samples", ROLLOUT_COLUMNS, rows)
        self.iteration += 1

    def iteration_flops(self, mean_seq_len: float) -> float:
        """Model FLOPs of one iteration per token of experience (``llamalab.perf``)."""
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
        """Sample one response per prompt (seeded by iteration and rank) and lay them out; the
        rollout keeps ``temperature`` so every log-prob read from it is on-policy (issue #18)."""
        assert self.actor is not None
        PPOConfig.check_sampling(temperature, top_p)
        tok = self.tokenizer
        generated = stage_rollout(  # the engine of stage.rollout_engine (scale.rollout_engine)
            self.rollouts,
            self,
            self.actor,
            prompts,
            seed_of=lambda rank: derive_seed(self.seed, self.iteration, rank),
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=temperature,
            top_p=None,  # PPOConfig.check_sampling: the full distribution only
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            chunk_size=self.cfg.generation_batch,  # a TP group fills it with all its GPUs' prompts
        )
        return build_rollout(prompts, generated, tok.pad_id, self.device, temperature)

    def score(self, rollout: Rollout, is_safety: torch.Tensor) -> Scores:
        assert self.rm_helpful is not None and self.rm_safety is not None
        return score_rollout(
            self.rm_helpful,
            self.rm_safety,
            rollout,
            is_safety,
            self.batch_layout().generation_rows,
            self.cfg.safety_threshold,
        )

    @torch.no_grad()
    def experience(
        self, rollout: Rollout, scores: Scores, is_safety: torch.Tensor
    ) -> tuple[Experience, dict[str, float]]:
        """The actor's, reference's and critic's readings of a rollout, turned into PPO targets
        by :func:`llamalab.rlhf.experience.make_experience`; plus what to log."""
        actor, reference, critic = self.actor, self.reference, self.critic
        assert actor is not None and reference is not None and critic is not None
        assert self.kl_ctl is not None
        cfg, chunk = self.cfg, self.batch_layout().generation_rows  # rows per no-grad forward
        # Both at the rollout's temperature (response_logits): the sampling distribution, and the
        # reference scaled alike so the KL compares like with like (issue #18).
        old_logprobs = in_chunks(lambda r: response_logprobs(actor, r), rollout, chunk)
        ref_logprobs = in_chunks(lambda r: response_logprobs(reference, r), rollout, chunk)
        old_values = in_chunks(lambda r: response_values(critic, r), rollout, chunk)
        # The running reward moments (saved in checkpoints) change here and nowhere else, once
        # per iteration: each RM's for the logs, the chosen raw score's in paper_reward (whitening).
        moments = self.reward_moments
        moments["helpful"].update(scores.helpful_raw)
        moments["safety"].update(scores.safety_raw)
        running = moments["combined"] if cfg.reward_whitening == "running" else None
        experience, terms = make_experience(
            rollout,
            scores,
            is_safety,
            old_logprobs,
            ref_logprobs,
            old_values,
            kl_coef=self.kl_ctl.value,
            whiten_stats=running,
            **cfg.reward_settings(),
        )
        stats = experience_stats(rollout, scores, terms, experience, self.kl_ctl.value, moments)
        return experience, stats

    def batch_layout(self) -> BatchLayout:
        """This run's rows per rank (:meth:`PPOConfig.layout`)."""
        return self.cfg.layout(self.trainer.world_size if self._trainer is not None else 1)

    def ppo_update(self, rollout: Rollout, experience: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled mini-batches, one optimizer step each. Each
        mini-batch's loss is the token mean over all its rows on every rank (its token count
        summed once over the ranks), so the gradient does not depend on the micro-batch."""
        actor, critic, cfg = self.actor, self.critic, self.cfg
        assert actor is not None and critic is not None
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list), "PPO uses one optimizer (actor + critic groups)"
        layout = self.batch_layout()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.iteration) + 1)
        totals: dict[str, list[float]] = {}
        mask = rollout.response_mask
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(rollout), generator=generator).to(mask.device)
            for rows in order.tensor_split(layout.mini_batches):
                tokens = self.global_sum(mask[rows].sum().float()).clamp_min(1)
                parts = mini_batch_backward(
                    actor, critic, rollout, experience, rows, layout.micro_batch,
                    tokens / layout.world,  # the ranks' gradients are averaged
                    self.manual_backward, lambda loss: self.check_finite(loss, "PPO loss"),
                    **cfg.loss_settings(),
                )  # fmt: skip
                for stats in parts:
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
                self.check_engine_grad_norm()  # DeepSpeed: its norm of this step
        return {k: sum(v) / len(v) for k, v in totals.items()}

    # ------------------------------------------------------------------ held-out evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.actor is not None and self.rm_helpful is not None
        assert self.rm_safety is not None
        with eval_policy(self, how=self.cfg.eval_gather) as (actor, sampler):  # the TP engine's
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
                sample=sampler,
            )
        for sample, index, prompt in zip(samples, batch["index"].tolist(), batch["prompt_ids"]):
            self._eval_samples.append({**sample, "index": index, "prompt_ids": prompt})

    def on_validation_epoch_end(self) -> None:
        samples, self._eval_samples = self._eval_samples, []
        if not samples:
            return
        metrics, records = finish_evaluation(self, samples)
        if self.table_loggers():
            rows = eval_table(
                self.iteration, self.tokenizer, samples, records, self.cfg.log_samples
            )
            self.log_table("eval/samples", EVAL_COLUMNS, rows)
        self.track_early_stopping(metrics["reward"])

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

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The actor under ``actor.`` (docs/interfaces.md), the critic, the PPO state; the frozen
        models are reloaded from their paths on resume (:attr:`LlamaStage.frozen`)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["llamalab"]["prefix"] = "actor."
        assert self.kl_ctl is not None
        checkpoint["ppo"] = {
            "iteration": self.iteration,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_moments": {k: m.state_dict() for k, m in self.reward_moments.items()},
            "eval_state": dict(self.eval_state),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("ppo")
        if saved is None:
            return
        self.iteration = int(saved["iteration"])
        if self.kl_ctl is not None:
            self.kl_ctl.load_state_dict(saved["kl_controller"])
        for key, moments in self.reward_moments.items():
            moments.load_state_dict(saved["reward_moments"][key])
        self.eval_state = dict(saved["eval_state"])
