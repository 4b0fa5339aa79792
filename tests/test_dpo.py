"""DPO stage (beyond the paper): the DPO / IPO losses against hand-computed values and the papers'
formulas, the answer labels of the preference batch, the stage's models and checkpoints, and
whole runs through ``src/train.py``: the chosen log-ratio rises on the training pairs, the export
loads in transformers, ZeRO-3 on 2 processes (preempted and resumed) trains what one process
does, bad settings stop with one message."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from helpers import compose_config, run_train
from helpers.rlhf import tiny_config

from llamalab.checkpoint import load_model
from llamalab.data.builtin import builtin_preferences
from llamalab.data.labels import IGNORE_INDEX
from llamalab.data.preference import (
    PreferenceCollator,
    encode_preference_records,
    pad_rows,
)
from llamalab.pipeline import MissingInputError
from llamalab.rlhf.losses import dpo_loss, sequence_logprobs
from llamalab.runner.callbacks import PREEMPT_AT_STEP_ENV
from llamalab.runner.run import check_inputs
from llamalab.stages.dpo import DPOStage
from llamalab.tokenizer import Tokenizer

QUIET = ["logger=none", "callbacks=none", "plan.check=false"]


# ---------------------------------------------------------------------------- the loss
def test_dpo_and_ipo_losses_on_a_hand_computed_case() -> None:
    # Pair 0: policy log-probs (chosen, rejected) = (-10, -12), reference (-11, -11):
    #   chosen log-ratio -10 - (-11) = +1, rejected log-ratio -12 - (-11) = -1, h = 1 - (-1) = 2.
    # Pair 1: policy (-5, -3), reference (-4, -4): ratios -1 and +1, h = -2.
    # beta = 0.5, so beta * h = +1 and -1.
    policy_c, policy_r = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -3.0])
    ref_c, ref_r = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    # DPO: -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(-1) = 1 + 0.3132617 = 1.3132617.
    losses, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.3132617, 1.3132617]))
    # Implicit rewards beta * (policy - reference): 0.5 * (+1, -1) and 0.5 * (-1, +1).
    torch.testing.assert_close(chosen, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.5]))
    # Label smoothing 0.1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617, and by symmetry
    # 0.9 * 1.3132617 + 0.1 * 0.3132617 = 1.2132617.
    smoothed, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, torch.tensor([0.4132617, 1.2132617]))
    # IPO: (h - 1 / (2 beta))^2 = (2 - 1)^2 = 1 and (-2 - 1)^2 = 9.
    ipo, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.tensor([1.0, 9.0]))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_equal_the_papers_formulas_on_random_logprobs(beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    # DPO paper eq. 7: -log sigmoid(beta log(pi(yw)/ref(yw)) - beta log(pi(yl)/ref(yl))).
    paper = -torch.log(torch.sigmoid(beta * torch.log(pc.exp() / rc.exp()) - beta * (pr - rr)))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    torch.testing.assert_close(losses.double(), paper, rtol=1e-5, atol=1e-5)
    # Its gradient (DPO paper §4): d/d log pi(yw) = -beta * sigmoid(r_l - r_w), r = beta log-ratio.
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    r_w, r_l = beta * (pc - rc), beta * (pr - rr)
    expected_grad = (-beta * torch.sigmoid(r_l - r_w)).detach()
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    # IPO (Azar et al. 2023, eq. 17), with h the log-likelihood-ratio difference.
    h = torch.log(pc.exp() * rr.exp() / (pr.exp() * rc.exp()))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    torch.testing.assert_close(ipo.double(), (h - 1 / (2 * beta)) ** 2, rtol=1e-5, atol=1e-4)
    # Conservative DPO: the expected DPO loss when each label is flipped with probability eps.
    eps = 0.2
    flipped = -torch.log(torch.sigmoid(-beta * h))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    expected = (1 - eps) * paper + eps * flipped
    torch.testing.assert_close(smoothed.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_loss_settings_are_refused() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_loss(x, x, x, x, 0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, 0.0)


def test_sequence_logprobs_sum_the_labelled_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[2, 5] = IGNORE_INDEX  # padding
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(1, 6):  # the token at t is predicted by the logits at t - 1
            if labels[b, t] != IGNORE_INDEX:
                expected[b] += torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
    torch.testing.assert_close(sequence_logprobs(logits, labels), expected)


# ---------------------------------------------------------------------------- the batch
def test_batch_labels_mark_the_final_answer_on_either_padding_side(small_tok: Tokenizer) -> None:
    record = {
        "prompt": [
            {"role": "user", "content": "What does len do?"},
            {"role": "assistant", "content": "It counts items."},
            {"role": "user", "content": "And sorted?"},
        ],
        "chosen": "It returns a new sorted list.",
        "rejected": "No idea.",
        "rating": "better",
    }
    items, _ = encode_preference_records(small_tok, [record, {**record, "rejected": "?"}], 256)
    answers = {}
    for side in ("right", "left"):
        batch = PreferenceCollator(small_tok.pad_id, side)(items)  # type: ignore[arg-type]
        labels = batch["labels"]
        assert labels.shape == batch["input_ids"].shape
        assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()  # padding
        answers[side] = [[t for t in row.tolist() if t != IGNORE_INDEX] for row in labels]
    assert answers["right"] == answers["left"]
    chosen, rejected = answers["right"][0], answers["right"][2]
    assert small_tok.decode(chosen).strip() == record["chosen"] and chosen[-1] == small_tok.eos_id
    assert small_tok.decode(rejected).strip() == "No idea."
    assert "counts" not in small_tok.decode(chosen)  # earlier answers are prompt, not learned


# ---------------------------------------------------------------------------- the stage
def make_stage(world: dict[str, Path], **kwargs: object) -> DPOStage:
    stage = DPOStage(
        arch=tiny_config(world["tokenizer"].vocab_size).to_dict(),
        optim={"lr": 1e-3, "weight_decay": 0.0},
        init=str(world["sft"]),
        tokenizer_path=str(world["tokenizer"].model_path),
        **kwargs,
    )
    stage.configure_model()
    return stage


def test_stage_starts_at_log2_and_trains_only_the_policy(tiny_checkpoints: dict) -> None:
    stage = make_stage(tiny_checkpoints)
    assert stage.reference is not None and stage.model is not None
    assert not any(p.requires_grad for p in stage.reference.parameters())
    records = builtin_preferences("helpful", "validation", seed=0, n=4)
    items, _ = encode_preference_records(tiny_checkpoints["tokenizer"], records, 256)
    batch = PreferenceCollator(tiny_checkpoints["tokenizer"].pad_id)(items)
    loss, metrics = stage.pair_loss(batch)
    # policy == reference: every log-ratio is 0, so the loss is -log sigmoid(0) = log 2.
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margin"].abs().max() == 0 and metrics["rewards/accuracy"].sum() == 0
    assert (metrics["logps/chosen"] < 0).all()
    loss.backward()
    assert all(p.grad is None for p in stage.reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.model.parameters())
    # Checkpoints hold the policy only; loading puts the reference back as loaded from init.
    checkpoint = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(
        k.startswith("model.") for k in checkpoint["state_dict"]
    )
    stage.on_load_checkpoint(checkpoint)
    assert checkpoint["state_dict"].keys() == stage.state_dict().keys()


def test_stage_refuses_bad_settings_and_a_missing_reference(tiny_checkpoints: dict) -> None:
    with pytest.raises(ValueError, match=r"stage\.loss must be one of \('sigmoid', 'ipo'\)"):
        make_stage(tiny_checkpoints, loss="kto")
    with pytest.raises(ValueError, match=r"stage\.beta must be > 0"):
        make_stage(tiny_checkpoints, beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing applies to loss=sigmoid only"):
        make_stage(tiny_checkpoints, loss="ipo", label_smoothing=0.1)
    stage = DPOStage(arch=tiny_config(512).to_dict(), optim={"lr": 1e-3, "weight_decay": 0.0})
    with pytest.raises(ValueError, match=r"DPO needs stage\.init"):
        stage.configure_model()


def test_missing_reference_names_the_sft_command(tmp_path: Path) -> None:
    cfg = compose_config(["stage=dpo", f"paths.outputs_root={tmp_path}"], tmp_path / "run")
    with pytest.raises(MissingInputError) as err:
        check_inputs(cfg)
    assert f"stage.init={tmp_path}/sft/latest does not exist" in str(err.value)
    assert "`python src/train.py stage=sft`" in str(err.value)


# ---------------------------------------------------------------------------- through train.py
def read_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


@torch.no_grad()
def log_ratio_margins(policy: torch.nn.Module, reference: torch.nn.Module, batch: dict) -> list:
    """(log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl)) per pair, from the logits."""
    out = []
    for model in (policy, reference):
        logp = torch.log_softmax(
            model(batch["input_ids"], attention_mask=batch["attention_mask"]), -1
        )
        labels = batch["labels"][:, 1:]
        taken = logp[:, :-1].gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        out.append((taken * (labels != IGNORE_INDEX)).sum(1))
    ratio = out[0] - out[1]
    chosen, rejected = ratio.chunk(2)
    return (chosen - rejected).tolist()


@pytest.mark.integration
@pytest.mark.slow
def test_dpo_run_raises_the_chosen_log_ratio_and_exports(
    tiny_checkpoints: dict, tmp_path: Path, cache_dir: Path
) -> None:
    """The default DPO config on 32 + 32 built-in pairs (helpful + safety): afterwards the
    policy prefers the chosen answers of those pairs more than the reference does, measured
    here from the two models' logits; the export is a transformers causal LM with our logits."""
    import transformers  # lazy: a dev dependency, needed by this test only

    run = tmp_path / "run"
    args = [
        *QUIET, "stage=dpo", f"stage.init={tiny_checkpoints['sft']}", f"paths.output_dir={run}",
        "data.builtin_size=32", "stage.batch_size=16", "data.batch_size=16", "stage.epochs=4",
        "++trainer.limit_val_batches=2",
    ]  # fmt: skip
    result = run_train(args, cache_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(run)
    train = [r for r in rows if "train/loss" in r]
    assert float(train[0]["train/loss"]) == pytest.approx(math.log(2), abs=1e-5)  # policy == ref
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                 "logps/chosen", "logps/rejected"):  # fmt: skip
        assert f"train/{name}" in train[-1] and any(f"val/{name}" in r for r in rows)

    tokenizer = tiny_checkpoints["tokenizer"]
    records = [p for k in ("helpful", "safety") for p in builtin_preferences(k, "train", 1234, 32)]
    items, _ = encode_preference_records(tokenizer, records, 256)
    batch = PreferenceCollator(tokenizer.pad_id)(items)
    policy, reference = load_model(run / "export").eval(), load_model(tiny_checkpoints["sft"])
    margins = torch.tensor(log_ratio_margins(policy, reference.eval(), batch))
    assert (margins > 0).float().mean() > 0.8, margins
    assert margins.mean() > 0.3, margins  # from exactly 0 for every pair at the start

    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "export").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids, mask = pad_rows([items[0]["chosen_ids"], items[1]["rejected_ids"]], tokenizer.pad_id)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits
        ours = policy(ids, attention_mask=mask)
    real = mask.bool()
    assert (theirs[real] - ours[real]).abs().max() <= 1e-4


@pytest.mark.integration
def test_unknown_loss_variant_stops_with_one_message(
    tiny_checkpoints: dict, tmp_path: Path, cache_dir: Path
) -> None:
    args = [*QUIET, "stage=dpo", f"stage.init={tiny_checkpoints['sft']}", "stage.loss=kto",
            f"paths.output_dir={tmp_path}"]  # fmt: skip
    result = run_train(args, cache_dir, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr[result.stderr.rfind("error: ") :]
    assert "stage.loss must be one of ('sigmoid', 'ipo'), got 'kto'" in message
    assert not (tmp_path / "export").exists()


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_on_two_processes_trains_and_resumes_as_one_process_does(
    tiny_checkpoints: dict, tmp_path: Path, cache_dir: Path
) -> None:
    """Policy and reference partitioned over 2 ranks (ZeRO-3), preempted after step 1 and resumed
    (the reference, left out of the checkpoint, reloaded from init): after step 2 the policy is
    that of one process running 2 micro-batches of 2 pairs per step. The pairs of each step are
    the same (the sampler deals them out in turn) and so is the averaged gradient."""
    base = [
        *QUIET, "stage=dpo", f"stage.init={tiny_checkpoints['sft']}", "data.builtin_size=8",
        "stage.batch_size=4", "data.batch_size=2", "trainer.max_steps=2",
        "++trainer.limit_val_batches=0", f"paths.outputs_root={tmp_path / 'outs'}",
    ]  # fmt: skip
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    result = run_train([*base, f"paths.output_dir={single}"], cache_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = ["strategy=deepspeed_zero3", "trainer.devices=2", "trainer.accelerator=cpu"]
    two.append(f"paths.output_dir={zero3}")
    result = run_train([*base, *two], cache_dir, timeout=600, env={PREEMPT_AT_STEP_ENV: "1"})
    assert result.returncode == 143, result.stderr[-3000:]  # preempted, checkpoint saved
    result = run_train([*base, *two, "ckpt_path=last"], cache_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_model(single / "export").state_dict(), load_model(zero3 / "export").state_dict()
    init = load_model(tiny_checkpoints["sft"]).state_dict()
    assert a.keys() == b.keys()
    for name in a:  # steps change weights by ~6e-5 here; summation order, by ~1e-9
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(a[n], init[n]) for n in a)  # the steps did train the policy
