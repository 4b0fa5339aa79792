"""The stage graph: each stage, the runs it writes, the inputs it loads, the models it holds.

The one place that says which stage feeds which (torch-free: read by the entry point's input
checks, the memory plan, chat's default model and PPO's checkpoint contents):

```
pretrain ──> sft ──┬──> reward rm=helpful ──┬──> ppo
                   ├──> reward rm=safety  ──┤
                   ├────────────────────────┴──> rejection_sampling
                   └──> dpo                       (beyond the paper)
```

The paper's chain, SFT -> rejection sampling -> PPO, is ``stage=ppo
stage.init=<outputs_root>/rejection_sampling/latest``: PPO's ``reference`` (the KL anchor) stays
the SFT run whatever ``init`` is (PAPER.md §3.2.3: the KL is to pi_0, the initial SFT
policy).

A stage writes ``<outputs_root>/<run name>/<timestamp>/`` and links
``<outputs_root>/<run name>/latest`` to its newest finished run; a later stage loads that link by
default (``configs/stage/<stage>.yaml``, checked against this module by ``tests/test_pipeline.py``).
Three kinds of name meet here:

- an **input** is a stage config key (``stage.init``, ``stage.critic_init``, ...): a path;
- a **model** is one network the stage holds, named by its **role** in the memory plan
  (``actor``, ``reference``, ...) and by the stage's **attribute** that holds it (PPO keeps its
  frozen reward models in ``rm_helpful`` / ``rm_safety``); each model loads one input;
- a **run name** is the folder under ``outputs_root`` (the reward stage has two).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_OUTPUTS_ROOT = "outputs"  # configs/paths/default.yaml: ${oc.env:LLAMALAB_OUTPUTS,outputs}
OUTPUTS_ROOT_ENV = "LLAMALAB_OUTPUTS"


class MissingInputError(FileNotFoundError):
    """A stage started without the output of the stage it builds on."""


@dataclass(frozen=True)
class Input:
    """A checkpoint a stage loads: ``stage.<key>``, by default ``<root>/<producer>/latest``.

    ``producer`` is the run name that writes it (None: no default, e.g. pretraining's optional
    ``init``); ``required`` inputs must be set and exist before the stage starts.
    """

    key: str
    producer: str | None
    required: bool = True


@dataclass(frozen=True)
class Model:
    """One network a stage holds: ``head`` is ``"lm"`` (vocabulary logits) or ``"scalar"`` (one
    score, a reward or value model); ``input`` is the config key it loads (None: random init);
    ``attribute`` is the stage's submodule that holds it (None: not a submodule)."""

    role: str
    head: str
    trainable: bool
    input: str | None
    attribute: str | None = "model"


@dataclass(frozen=True)
class Stage:
    """A stage: ``runs`` maps each run name it writes to the command that writes it.

    ``lightning_accumulates``: its ``stage.batch_size`` is reached by Lightning's gradient
    accumulation (PPO makes its optimizer steps itself, from ``rollout_batch`` / ``mini_batch``).
    """

    name: str
    runs: dict[str, str]
    inputs: tuple[Input, ...]
    models: tuple[Model, ...]
    lightning_accumulates: bool = True

    @property
    def run_names(self) -> tuple[str, ...]:
        return tuple(self.runs)

    def input(self, key: str) -> Input:
        for item in self.inputs:
            if item.key == key:
                return item
        raise KeyError(f"stage {self.name!r} has no input {key!r}")

    @property
    def frozen_attributes(self) -> tuple[str, ...]:
        """Attributes holding frozen models (left out of checkpoints, reloaded from inputs)."""
        return tuple(m.attribute for m in self.models if not m.trainable and m.attribute)


_SFT_INIT = Input("init", "sft")
_REWARD_INPUTS = (
    Input("reward_helpful", "reward_helpful"),
    Input("reward_safety", "reward_safety"),
)

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "pretrain",
            {"pretrain": "python src/train.py  (pretraining)"},
            (Input("init", None, required=False),),  # null: random initialisation
            (Model("model", "lm", True, "init"),),
        ),
        Stage(
            "sft",
            {"sft": "python src/train.py stage=sft"},
            (Input("init", "pretrain"),),
            (Model("model", "lm", True, "init"),),
        ),
        Stage(
            "reward",  # `rm=helpful|safety` picks the run (configs/stage/reward.yaml)
            {
                "reward_helpful": "python src/train.py stage=reward rm=helpful",
                "reward_safety": "python src/train.py stage=reward rm=safety",
            },
            (_SFT_INIT,),
            (Model("reward", "scalar", True, "init"),),
        ),
        # PAPER.md §3.2.3: the policy and its value model train; the SFT reference (KL term) and
        # both reward models are frozen. The reference is its own input, so the actor may start
        # from a later policy (rejection sampling's) while the KL stays anchored at SFT. The
        # critic starts from the helpfulness RM (peers' practice, PAPER.md "Common practice").
        Stage(
            "ppo",
            {"ppo": "python src/train.py stage=ppo"},
            (
                _SFT_INIT,
                Input("reference", "sft"),
                Input("critic_init", "reward_helpful"),
                *_REWARD_INPUTS,
            ),
            (
                Model("actor", "lm", True, "init", "actor"),
                Model("critic", "scalar", True, "critic_init", "critic"),
                Model("reference", "lm", False, "reference", "reference"),
                Model("reward_helpful", "scalar", False, "reward_helpful", "rm_helpful"),
                Model("reward_safety", "scalar", False, "reward_safety", "rm_safety"),
            ),
            lightning_accumulates=False,
        ),
        # Samples with a frozen copy of `init` and fine-tunes the policy (the SFT step) on the
        # best-scored samples; the sampler (also the held-out KL reference) and the reward
        # models sit in `RejectionSamplingStage.frozen` (a dict, not submodules).
        Stage(
            "rejection_sampling",
            {"rejection_sampling": "python src/train.py stage=rejection_sampling"},
            (_SFT_INIT, *_REWARD_INPUTS),
            (
                Model("policy", "lm", True, "init"),
                Model("sampler", "lm", False, "init", None),
                Model("reward_helpful", "scalar", False, "reward_helpful", None),
                Model("reward_safety", "scalar", False, "reward_safety", None),
            ),
        ),
        # Beyond the paper: DPO (Rafailov et al. 2023) on the reward stage's preference pairs; the
        # policy and its frozen reference both start from SFT.
        Stage(
            "dpo",
            {"dpo": "python src/train.py stage=dpo"},
            (_SFT_INIT,),
            (
                Model("policy", "lm", True, "init"),
                Model("reference", "lm", False, "init", "reference"),
            ),
        ),
    )
}
# What `src/chat.py` loads without --model, in this order.
CHAT_DEFAULT_RUNS = ("sft", "pretrain")


def stage(name: str) -> Stage | None:
    """The declared stage, or None for a stage this graph does not know (a user's own)."""
    return STAGES.get(name)


def inputs_of(name: str) -> tuple[Input, ...]:
    spec = STAGES.get(name)
    return spec.inputs if spec is not None else ()


def producing_command(run_name: str) -> str:
    """The command that writes ``<outputs_root>/<run_name>/``."""
    for spec in STAGES.values():
        if run_name in spec.runs:
            return spec.runs[run_name]
    raise KeyError(f"no stage writes run {run_name!r}")


def input_command(stage_name: str, key: str) -> str | None:
    """The command that produces the default of ``stage.<key>`` (None: nothing does)."""
    item = STAGES[stage_name].input(key)
    return producing_command(item.producer) if item.producer is not None else None


def outputs_root(root: str | os.PathLike[str] | None = None) -> str:
    """``root`` when given, else ``$LLAMALAB_OUTPUTS``, else ``outputs`` (as ``paths.outputs_root``)."""
    if root not in (None, ""):
        return str(root)
    return os.environ.get(OUTPUTS_ROOT_ENV, DEFAULT_OUTPUTS_ROOT)


def latest(run_name: str, root: str | os.PathLike[str] | None = None) -> str:
    """``<outputs_root>/<run_name>/latest``: the newest finished run of that name."""
    return f"{outputs_root(root)}/{run_name}/latest"


def default_input(
    stage_name: str, key: str, root: str | os.PathLike[str] | None = None
) -> str | None:
    """The default path of ``stage.<key>`` (the producing run's ``latest``), or None."""
    item = STAGES[stage_name].input(key)
    return latest(item.producer, root) if item.producer is not None else None
