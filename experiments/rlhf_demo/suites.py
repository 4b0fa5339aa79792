"""The evaluation package's own suites on the demo's policies: what ``python src/eval.py
eval=safety`` and ``eval=winrate`` report, with the demo's models as policies, baseline and judges.

- **safety** (:mod:`llamalab.evaluation.safety`): every policy answers the suite's prompts (the
  built-in held-out harmful, borderline and helpful prompts); ``violation_rate`` is the rule
  judge's share of non-refusals of harmful prompts, ``rm_violation_rate`` the share the demo's
  safety reward model scores under the suite's ``rm_threshold``, ``false_refusal_rate`` the
  refused borderline prompts and ``false_refusal_rate_helpful`` the refused helpful ones.
- **winrate** (:mod:`llamalab.evaluation.winrate`): each policy against the SFT policy on the
  held-out prompts, judged by the demo's helpfulness reward model (its safety reward model on
  safety prompts): ``win`` / ``tie`` / ``loss`` fractions and their bootstrap ``ci95``. The SFT
  policy's answers are generated once and shared by every comparison.

The settings are the suites' defaults (``configs/eval/safety.yaml``, ``winrate.yaml``), composed as
``src/eval.py`` composes them; ``quick`` shortens both (a smoke test). Each suite's files
(answers, samples, plots) go to ``<out>/suites/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from steps import REPO

from llamalab.evaluation import safety, winrate

# The policies the suites judge (results.json keys): round 1's SFT, rejection sampling and the
# two PPO policies, the rows the paper's safety tables compare.
SUITE_POLICIES = ("sft", "rejection_sampling", "ppo", "ppo_from_rs")
QUICK_SAFETY = ("eval.n_per_kind=4", "eval.n_helpful=4", "eval.max_new_tokens=8")
QUICK_WINRATE = ("eval.n_prompts=16", "eval.max_new_tokens=8", "eval.bootstrap=200")
# The per-policy numbers kept in results.json (the suites' own keys).
SAFETY_KEYS = ("violation_rate", "rm_violation_rate", "false_refusal_rate",
               "false_refusal_rate_helpful", "rm_safety_score", "n", "by_category")  # fmt: skip
WINRATE_KEYS = ("win", "tie", "loss", "ci95", "n", "by_kind")


def suite_config(suite: str, overrides: list[str]) -> DictConfig:
    """``configs/eval.yaml`` with ``eval=<suite>`` and ``overrides``, as ``src/eval.py`` sees it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("eval", overrides=[f"eval={suite}", "device=cpu", *overrides])


def suite_metrics(
    policies: dict[str, Path],
    sft: Path,
    reward: dict[str, Path],
    out: Path,
    *,
    seed: int,
    quick: bool,
) -> dict[str, dict[str, Any]]:
    """``{name: {"safety": {...}, "winrate": {...} or None}}`` for every policy (module
    docstring); ``winrate`` is None for the SFT policy itself (its baseline)."""
    judges = [f"eval.judge_safety={reward['safety']}", f"eval.judge_helpful={reward['helpful']}"]
    cfg = suite_config("safety", [*judges, f"seed={seed}", *(QUICK_SAFETY if quick else ())])
    with open_dict(cfg):
        cfg.eval.policies = {name: str(path) for name, path in policies.items()}
    (out / "safety").mkdir(parents=True, exist_ok=True)
    judged = safety.run(cfg, out / "safety")["policies"]
    results = {
        name: {"safety": {k: judged[name][k] for k in SAFETY_KEYS if k in judged[name]}}
        for name in policies
    }

    cfg = suite_config(
        "winrate",
        [*judges, f"eval.baseline={sft}", f"seed={seed}", *(QUICK_WINRATE if quick else ())],
    )
    opts = cfg.eval
    judge_paths = winrate.judge_paths(opts, None)
    records = winrate.held_out_prompts(opts, seed)
    prompts = [r["prompt"] for r in records]
    baseline = winrate.answers_of(str(sft), "eval.baseline", prompts, opts, seed)
    for name, path in policies.items():
        if Path(path).resolve() == Path(sft).resolve():
            results[name]["winrate"] = None
            continue
        answers = winrate.answers_of(str(path), name, prompts, opts, seed)
        folder = out / "winrate" / name
        folder.mkdir(parents=True, exist_ok=True)
        title = f"{name} vs SFT (reward models)"
        scored = winrate.judge_answers(
            opts, judge_paths, records, answers, baseline, seed, folder, title
        )
        results[name]["winrate"] = {k: scored[k] for k in WINRATE_KEYS}
    return results
