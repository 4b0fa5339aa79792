"""Win-rate suite (``eval=winrate``): outcome counting, bootstrap intervals, the reward-model and
chat-model judges, and the checks on judge paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.rlhf import make_policy
from omegaconf import OmegaConf

from llamalab.checkpoint import CheckpointError
from llamalab.evaluation import winrate
from llamalab.evaluation.common import load_policy
from llamalab.evaluation.winrate_judges import (
    bootstrap_ci,
    fractions,
    model_judge_margins,
    outcomes,
    preference_logits,
    reply_logprobs,
)

REPO = Path(__file__).resolve().parents[1]


def test_outcomes_and_fractions_by_hand() -> None:
    margins = [0.5, 0.05, -0.05, -0.3, 0.1, -0.1, 0.0, 2.0]
    assert outcomes(margins, tie_margin=0.1) == [1, 0, 0, -1, 1, -1, 0, 1]
    assert fractions(outcomes(margins, 0.1)) == {"win": 3 / 8, "tie": 3 / 8, "loss": 2 / 8}
    assert outcomes(margins, 0.0) == [1, 1, -1, -1, 1, -1, 0, 1]
    with pytest.raises(ValueError, match="tie_margin"):
        outcomes(margins, -1.0)


def test_bootstrap_ci_contains_the_estimate_and_is_seeded() -> None:
    values = [1] * 12 + [0] * 5 + [-1] * 3
    point = fractions(values)
    ci = bootstrap_ci(values, n_resamples=1000, seed=3)
    for name, (lo, hi) in ci.items():
        assert lo <= point[name] <= hi and lo < hi
    assert ci == bootstrap_ci(values, n_resamples=1000, seed=3)
    assert ci != bootstrap_ci(values, n_resamples=1000, seed=4)
    # a fraction of 0.6 over 20 prompts: the 95% interval is about +-0.2 wide
    assert 0.3 < ci["win"][1] - ci["win"][0] < 0.6
    assert bootstrap_ci([0, 0, 0], 50, 0)["tie"] == [1.0, 1.0]


def _cfg(policy: Path, baseline: Path, **eval_options: object):
    cfg = OmegaConf.create(
        {"ckpt": str(policy), "seed": 0, "eval": OmegaConf.load(REPO / "configs/eval/winrate.yaml")}
    )
    cfg.eval.baseline = str(baseline)
    cfg.eval.n_prompts = 6
    cfg.eval.max_new_tokens = 6
    for key, value in eval_options.items():
        cfg.eval[key] = value
    return cfg


def test_policy_equal_to_baseline_ties_under_the_rm_judge(
    tiny_checkpoints: dict, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sft, rm = tiny_checkpoints["sft"], tiny_checkpoints["rm"]
    judges = {"judge_helpful": str(rm), "judge_safety": str(rm), "tie_margin": 1e-6}
    # sampled answers: equal only because both models answer with the same seed
    same = winrate.run(_cfg(sft, sft, temperature=1.0, **judges), tmp_path / "same")
    assert (same["win"], same["tie"], same["loss"]) == (0.0, 1.0, 0.0)
    assert same["ci95"]["tie"] == [1.0, 1.0] and same["n"] == 6
    rows = (tmp_path / "same" / "winrate_samples.jsonl").read_text().splitlines()
    assert all(json.loads(r)["policy"] == json.loads(r)["baseline"] for r in rows)
    assert (tmp_path / "same" / "winrate.png").stat().st_size > 0
    other = make_policy(
        tmp_path_factory.mktemp("other") / "other", tiny_checkpoints["tokenizer"], 1
    )
    diff = winrate.run(_cfg(sft, other, temperature=1.0, **judges), tmp_path / "diff")
    assert diff["tie"] < 1.0  # the judge does tell different answers apart
    assert diff["win"] + diff["tie"] + diff["loss"] == pytest.approx(1.0)
    assert sum(v["n"] for v in diff["by_kind"].values()) == 6


def test_model_judge_is_position_debiased(tiny_checkpoints: dict) -> None:
    judge = load_policy(tiny_checkpoints["sft"], what="eval.judge_model")
    prompts = [[{"role": "user", "content": "What is the purpose of os.remove?"}]] * 3
    a = ["Remove a file.", "I can't help with that.", "Sure."]
    b = ["Return the size.", "Remove a file.", "Sure."]
    forward = model_judge_margins(judge, prompts, a, b)
    backward = model_judge_margins(judge, prompts, b, a)
    assert torch.allclose(torch.tensor(forward["margins"]), -torch.tensor(backward["margins"]))
    assert forward["margins"][2] == 0.0  # equal answers: no preference whatever the position
    # ... although the random judge does favour one position: its A-vs-B log-odds are not 0
    raw = preference_logits(judge, prompts, a, a)
    assert raw.abs().min() > 0 and forward["position_bias"] != 0.0


def test_reply_logprob_by_hand(tiny_checkpoints: dict) -> None:
    model, tok = load_policy(tiny_checkpoints["sft"], what="eval.judge_model")
    prompts = [
        [{"role": "user", "content": "Short?"}],
        [{"role": "user", "content": "A longer one?"}],
    ]
    batched = reply_logprobs(model, tok, prompts, "B")
    for k, prompt in enumerate(prompts):
        ids = tok.encode_dialog([*prompt, {"role": "assistant", "content": "B"}])
        head = tok.encode_dialog([*prompt, {"role": "assistant", "content": "x"}])
        start = len(ids) - 4  # "▁", "B", the format's trailing "▁", EOS (small tokenizer)
        assert tok.decode(ids[start : start + 2]).strip() == "B" and ids[:start] == head[:start]
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
        want = sum(logp[t - 1, ids[t]] for t in (start, start + 1))  # the space and "B" only
        assert batched[k].item() == pytest.approx(want.item(), abs=1e-4)


def test_judges_of_the_wrong_kind_stop_before_any_answer(
    tiny_checkpoints: dict, tmp_path: Path
) -> None:
    sft, rm = tiny_checkpoints["sft"], tiny_checkpoints["rm"]
    cases = [
        ({"judge_helpful": str(sft), "judge_safety": str(rm)}, r"judge_helpful=.*language model"),
        ({"judge": "model", "judge_model": str(rm)}, r"judge_model=.*reward model"),
        ({"judge": "model"}, "needs eval.judge_model"),
        (
            {"judge_helpful": str(rm), "judge_safety": str(tmp_path / "nope")},
            r"judge_safety=.*nope",
        ),
        ({"judge": "gpt"}, "eval.judge must be one of"),
    ]
    for options, message in cases:
        with pytest.raises(CheckpointError, match=message):
            winrate.run(_cfg(sft, sft, **options), tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"eval.baseline=.*reward model"):
        winrate.run(_cfg(sft, rm, judge_helpful=str(rm), judge_safety=str(rm)), tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"needs eval\.baseline"):
        no_baseline = _cfg(sft, sft)
        no_baseline.eval.baseline = None
        winrate.run(no_baseline, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())
