"""The demo's training steps: each one ``python src/train.py ...`` as a user types it.

A step writes ``<DIR>/outputs/<run>/<step name>/`` (``paths.output_dir``) under
``paths.outputs_root=<DIR>/outputs``, so ``outputs/<run>/latest`` moves to it as it would for a
user and the next stage finds it there. A step with a ``row`` label writes a policy that the demo
judges (one row of the results table): adding a row to the demo is one entry in :data:`STEPS`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# --quick: every stage a few steps (a smoke test of the pipeline and of the outputs).
QUICK_TRAIN = ("trainer.max_steps=3", "++trainer.limit_val_batches=1")
QUICK_REWARD = (*QUICK_TRAIN, "data.builtin_size=96")  # 3 steps of 32 pairs (a round's: data.path)
QUICK_RS = (
    "stage.max_prompts=8",
    "stage.num_samples=2",
    "stage.max_new_tokens=8",
    "stage.eval_max_new_tokens=8",
    "trainer.max_steps=2",
    "++trainer.limit_val_batches=1",
)
QUICK_PPO = (
    "stage.iterations=2",
    "stage.rollout_batch=8",
    "stage.mini_batch=4",
    "stage.max_new_tokens=8",
    "stage.eval_max_new_tokens=8",
    "stage.eval_every=2",
    "stage.eval_prompts=8",
)


@dataclass(frozen=True)
class Step:
    """One ``src/train.py`` run: its name (``results.json`` key, log file), the run name it writes
    (``outputs/<run>/``), the user's overrides, those ``--quick`` adds, and the results-table
    label when its export is a policy to judge."""

    name: str
    run: str
    overrides: tuple[str, ...]
    quick: tuple[str, ...] = QUICK_TRAIN
    row: str | None = None

    def output_dir(self, outputs: Path) -> Path:
        return outputs / self.run / self.name

    def export(self, outputs: Path) -> Path:
        return self.output_dir(outputs) / "export"


# Round 1, in order. PPO from SFT is the plain `stage=ppo`; "PPO from rejection sampling" is the
# paper's chain, `stage.init=outputs/rejection_sampling/latest`, its KL still to SFT (the
# default `stage.reference`). DPO (not in the paper; the baseline users compare PPO with) trains
# from SFT on the same built-in preferences the two reward models learn (`data.kind=both`).
STEPS: tuple[Step, ...] = (
    Step("pretrain", "pretrain", (), ("trainer.val_check_interval=3", *QUICK_TRAIN)),
    Step("sft", "sft", ("stage=sft",), (*QUICK_TRAIN, "stage.sample_generations=0"), row="SFT"),
    Step("reward_helpful", "reward_helpful", ("stage=reward", "rm=helpful"), QUICK_REWARD),
    Step("reward_safety", "reward_safety", ("stage=reward", "rm=safety"), QUICK_REWARD),
    Step(
        "rejection_sampling",
        "rejection_sampling",
        ("stage=rejection_sampling",),
        QUICK_RS,
        row="rejection sampling",
    ),
    Step("ppo", "ppo", ("stage=ppo",), QUICK_PPO, row="PPO (from SFT)"),
    Step(
        "ppo_from_rs",
        "ppo",
        ("stage=ppo", "stage.init=${paths.outputs_root}/rejection_sampling/latest"),
        QUICK_PPO,
        row="PPO (from rejection sampling)",
    ),
    Step("dpo", "dpo", ("stage=dpo",), (*QUICK_TRAIN, "data.builtin_size=48"), row="DPO"),
)
STEP = {step.name: step for step in STEPS}
REWARD_KINDS = ("helpful", "safety")
# What a round trains, by part (each part is also its run name), and round 1's step of each
# part: round 1's final policy is PPO from rejection sampling.
ROUND1 = {"reward_helpful": "reward_helpful", "reward_safety": "reward_safety",
          "rejection_sampling": "rejection_sampling", "ppo": "ppo_from_rs"}  # fmt: skip


def round_export(part: str, r: int, outputs: Path) -> Path:
    """The export of round ``r``'s ``part`` (a key of :data:`ROUND1`)."""
    name = ROUND1[part] if r == 1 else f"{part}_round{r}"
    return outputs / part / name / "export"


def round_steps(r: int, outputs: Path, prefs: Path) -> list[Step]:
    """Round ``r`` >= 2 (the paper's RLHF-V<r>): both reward models retrained from round
    ``r - 1``'s on every preference so far (``prefs/<kind>_train_round<r>.jsonl``; held out:
    ``prefs/<kind>_validation.jsonl``, round 1's), then rejection sampling from round ``r - 1``'s
    final policy and PPO from that; the KL stays to SFT (the default ``stage.reference``)."""
    rms = {k: round_export(f"reward_{k}", r, outputs) for k in REWARD_KINDS}
    with_rms = tuple(f"stage.reward_{k}={rms[k]}" for k in REWARD_KINDS)
    reward = [
        Step(
            f"reward_{kind}_round{r}",
            f"reward_{kind}",
            (
                "stage=reward",
                f"rm={kind}",
                f"stage.init={round_export(f'reward_{kind}', r - 1, outputs)}",
                f"data.path={prefs / f'{kind}_train_round{r}.jsonl'}",
                f"data.val_path={prefs / f'{kind}_validation.jsonl'}",
            ),
        )
        for kind in REWARD_KINDS
    ]
    rs = Step(
        f"rejection_sampling_round{r}",
        "rejection_sampling",
        (
            "stage=rejection_sampling",
            f"stage.init={round_export('ppo', r - 1, outputs)}",
            *with_rms,
        ),
        QUICK_RS,
        row=f"rejection sampling, round {r}",
    )
    ppo = Step(
        f"ppo_round{r}",
        "ppo",
        ("stage=ppo", f"stage.init={rs.export(outputs)}", f"stage.critic_init={rms['helpful']}",
         *with_rms),
        QUICK_PPO,
        row=f"PPO (from rejection sampling), round {r}",
    )  # fmt: skip
    return [*reward, rs, ppo]


def finished(step: Step, outputs: Path) -> bool:
    return (step.export(outputs) / "config.json").is_file()


def run_step(step: Step, outputs: Path, seed: int, quick: bool, wandb: bool) -> float:
    """Run one step as a user would (a fresh run directory); returns its wall time in seconds."""
    out = step.output_dir(outputs)
    if out.exists():
        shutil.rmtree(out)  # an unfinished or older run of this step
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *step.overrides,
        f"paths.outputs_root={outputs}",
        f"paths.output_dir={out}",
        f"seed={seed}",
        "plan.check=false",
        *([] if wandb else ["logger=none"]),
        *(step.quick if quick else []),
    ]
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    log_file = outputs.parent / "logs" / f"{step.name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"[rlhf_demo] {step.name}: {' '.join(command[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"[rlhf_demo] step {step.name} failed (log: {log_file}):\n{tail}")
    print(f"[rlhf_demo] {step.name}: done in {seconds:.0f} s", flush=True)
    return seconds
