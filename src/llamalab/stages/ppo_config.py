"""The PPO stage's settings (``configs/stage/ppo.yaml``) and its sampling seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from llamalab.model.config import ConfigError
from llamalab.rlhf import AdaptiveKLController, FixedKLController, default_kl_coef
from llamalab.scale.batches import BatchLayout, ppo_layout
from llamalab.scale.build import full_numel
from llamalab.scale.plan_gen import engine_settings
from llamalab.scale.rollout_engine import generation_how


@dataclass
class PPOConfig:
    """PPO settings (defaults: PAPER.md §3.2.3 and the common practice it notes)."""

    iterations: int = 400
    rollout_batch: int = 512  # prompts per iteration, all ranks together
    mini_batch: int = 64  # rows per optimizer step, all ranks together
    micro_batch: int | None = None  # rows per GPU per forward/backward (None = its whole share)
    ppo_epochs: int = 1
    generation_batch: int = 64  # most prompts per GPU per generate() call (bounds the KV cache)
    max_new_tokens: int = 512
    temperature: float = 1.0  # > 0; log-probs and KL read logits / temperature (issue #18)
    top_p: float = 1.0  # must stay 1.0: nucleus sampling would make PPO off-policy (issue #18)
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
    rollout_engine: str = (
        "auto"  # auto | gather | layerwise | tensor_parallel (scale.rollout_engine)
    )
    rollout_tp_size: int | None = None  # tensor_parallel's group size (None = devices per node)
    gather_for_generation: str | None = None  # old spelling of rollout_engine (always|never|auto)

    def __post_init__(self) -> None:
        if self.reward_whitening not in ("running", "batch"):
            raise ValueError(
                f"reward_whitening must be running or batch, got {self.reward_whitening!r}"
            )
        if self.mini_batch < 1 or self.rollout_batch < 1 or self.ppo_epochs < 1:
            raise ValueError("rollout_batch, mini_batch and ppo_epochs must be >= 1")
        self.check_sampling(self.temperature, self.top_p)
        self.rollout_engine, self.rollout_tp_size = engine_settings(
            self.rollout_engine, self.rollout_tp_size, self.gather_for_generation
        )
        self.gather_for_generation = None

    @property
    def eval_gather(self) -> str:
        """How held-out evaluation samples a sharded actor (:func:`generation_model`'s ``how``):
        a whole copy under ``gather``, per layer under ``layerwise``, else by free memory."""
        return generation_how(self.rollout_engine)

    @staticmethod
    def check_sampling(temperature: float, top_p: float | None) -> None:
        """Refuse PPO sampling settings the ratio and the KL cannot follow (issue #18).

        Log-probs are read under ``logits / temperature``, the distribution the tokens were
        drawn from, so any temperature > 0 stays on-policy. Top-p is refused rather than
        followed: the nuclei of the old policy, the updated one and the reference differ, a
        token outside one of them has log-prob -inf, and the ratio and the KL would be
        undefined exactly there (OpenRLHF samples with top-p but scores the untruncated
        distribution, which is off-policy).
        """
        if not temperature > 0:
            raise ConfigError(
                f"stage.temperature={temperature}: PPO samples its rollouts, so the temperature "
                "must be > 0 (the ratio and the KL read logits / temperature)"
            )
        if top_p is not None and top_p != 1.0:
            raise ConfigError(
                f"stage.top_p={top_p}: PPO supports top_p=1.0 only (nucleus sampling would make "
                "the rollouts off-policy: the ratio and the KL are taken under the full "
                "logits / temperature distribution); lower stage.temperature instead"
            )

    def reward_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`llamalab.rlhf.experience.make_experience` set here."""
        keys = ("kl_estimator", "gamma", "lam", "truncation_penalty", "safety_threshold")
        return {k: getattr(self, k) for k in keys}

    def loss_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`llamalab.rlhf.experience.ppo_objective` set here."""
        return {k: getattr(self, k) for k in ("clip", "value_clip", "vf_coef", "entropy_coef")}

    def layout(self, world: int) -> BatchLayout:
        """Rows per rank on ``world`` ranks (:func:`llamalab.scale.batches.ppo_layout`: rollout
        and mini-batch sizes are global, the micro-batch is per GPU); ConfigError when the
        sizes do not divide."""
        return ppo_layout(
            self.rollout_batch, self.mini_batch, self.micro_batch, world, self.generation_batch
        )

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per iteration: one per mini-batch, per PPO epoch."""
        return self.ppo_epochs * math.ceil(self.rollout_batch / self.mini_batch)


def derive_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """A sampling seed for (run seed, iteration, rank): a resumed run draws the same tokens."""
    return (seed * 1_000_003 + iteration * 7_919 * 64 + rank * 104_729) % (2**31 - 1)


def actor_parameters(model: nn.Module) -> int:
    """The model's true parameter count, also when ZeRO-3 has partitioned it (``ds_numel``;
    a partitioned tensor's own ``numel()`` is 0) or FSDP2 sharded it (a DTensor counts whole)."""
    return sum(full_numel(p) for p in model.parameters())


def kl_controller(cfg: PPOConfig, n_params: int) -> FixedKLController | AdaptiveKLController:
    """beta's controller; ``kl_coef=None`` takes the paper's beta for ``n_params`` (the actor)."""
    beta = cfg.kl_coef
    if beta is None:
        beta = default_kl_coef(n_params)
    if cfg.adaptive_kl:
        return AdaptiveKLController(beta, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(beta)


def trainer_overrides(cfg: PPOConfig, trainer_cfg: Any) -> dict[str, Any]:
    """Trainer settings the PPO loop needs.

    ``max_steps`` counts optimizer steps, so ``iterations * steps_per_iteration`` unless the
    user set it; epochs are unbounded (the prompt set is cycled); held-out evaluation every
    ``eval_every`` iterations (= training batches), over ``eval_prompts`` prompts.
    """
    out: dict[str, Any] = {"max_epochs": -1}
    if trainer_cfg.get("max_steps", -1) in (-1, None):
        out["max_steps"] = cfg.iterations * cfg.steps_per_iteration
    if cfg.eval_every:
        out.update(val_check_interval=int(cfg.eval_every), check_val_every_n_epoch=None)
        if cfg.eval_prompts:
            out["limit_val_batches"] = math.ceil(cfg.eval_prompts / cfg.rollout_batch)
    else:
        out["limit_val_batches"] = 0
    return out
