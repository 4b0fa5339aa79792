"""Reward-model stage (PAPER.md §3.2.2): scoring at the last real token, loss, metrics, the wrong-
pairs table, the Hugging Face export, `src/score.py`, and whole runs through `src/train.py`."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO, run_train

from llamalab.checkpoint import load_model, save_hf
from llamalab.data.builtin import builtin_preferences
from llamalab.data.corpus import load_builtin_tokenizer
from llamalab.data.labels import RATINGS
from llamalab.data.preference import PreferenceCollator, encode_preference_records, pad_rows
from llamalab.model import Llama, LlamaConfig, LlamaScalar
from llamalab.stages.reward import (
    PreferenceMetrics,
    RewardStage,
    WrongPairs,
    score_token_rows,
    unsafe_targets,
)
from llamalab.tokenizer import Tokenizer

OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "warmup_ratio": 0.03, "min_warmup_steps": 5}


def small_arch(vocab_size: int) -> LlamaConfig:
    """A 2-layer GQA model: quick, and it exercises the KV-head sharing."""
    return LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
        max_seq_len=256,
    )  # fmt: skip


def make_stage(vocab_size: int = 300, seed: int = 0, **kwargs) -> RewardStage:
    stage = RewardStage(arch=small_arch(vocab_size).to_dict(), optim=OPTIM, **kwargs)
    torch.manual_seed(seed)
    stage.configure_model()
    stage.eval()
    return stage


@pytest.fixture(scope="module")
def tokenizer(cache_dir: Path) -> Tokenizer:
    return load_builtin_tokenizer(4096, cache_dir)


@pytest.fixture(scope="module")
def safety_batch(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Eight built-in safety pairs, encoded and collated as the datamodule does."""
    records = builtin_preferences("safety", "validation", seed=0, n=8)
    items, _ = encode_preference_records(tokenizer, records, max_len=256)
    return PreferenceCollator(tokenizer.pad_id, "right")(items)


# ---------------------------------------------------------------------------- scoring
def test_rewards_ignore_padding_side_and_batch_mates():
    stage = make_stage()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    with torch.no_grad():
        alone = torch.cat([stage.rewards(torch.tensor([r]), torch.ones(1, len(r))) for r in rows])
        right = stage.rewards(*pad_rows(rows, 0, "right"))
        left = stage.rewards(*pad_rows(rows, 0, "left"))
        # Other batch mates (a much longer row changes the padding of every row).
        mates = stage.rewards(*pad_rows([rows[1], list(range(3, 200)), rows[0]], 0, "left"))
    # Equal up to float rounding (different padding changes the order of some reductions).
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mates[[2, 0]], alone[:2], atol=1e-5, rtol=0)
    # The reward is the value at the last real token: changing a padded position changes nothing.
    ids, mask = pad_rows(rows, 0, "right")
    with torch.no_grad():
        assert torch.equal(stage.rewards(ids.masked_fill(mask == 0, 7), mask), right)


def test_pair_rewards_are_chosen_rows_first(safety_batch):
    stage = make_stage(vocab_size=4096)
    with torch.no_grad():
        r_chosen, r_rejected = stage.pair_rewards(safety_batch)
        every = stage.rewards(safety_batch["input_ids"], safety_batch["attention_mask"])
    B = safety_batch["rating"].shape[0]
    assert torch.equal(r_chosen, every[:B]) and torch.equal(r_rejected, every[B:])


def test_loss_is_the_ranking_loss_with_margin_and_centering():
    r_chosen, r_rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    rating = torch.tensor([0, -1])  # significantly better (large margin 3), unrated (0)
    plain = make_stage(margin="none").loss(r_chosen, r_rejected, rating)
    large = make_stage(margin="large").loss(r_chosen, r_rejected, rating)
    centred = make_stage(margin="large", centering_coef=0.1).loss(r_chosen, r_rejected, rating)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigmoid(d) = softplus(-d)
    assert plain.item() == pytest.approx((sp(-2.0) + sp(0.0)) / 2, abs=1e-6)
    assert large.item() == pytest.approx((sp(1.0) + sp(0.0)) / 2, abs=1e-6)
    assert centred.item() == pytest.approx(large.item() + 0.1 * (4 + 0) / 2, abs=1e-6)


def test_stage_refuses_unknown_settings():
    with pytest.raises(ValueError, match="margin"):
        make_stage(margin="huge")
    with pytest.raises(ValueError, match="rm="):
        make_stage(kind="honest")


# ---------------------------------------------------------------------------- metrics
def test_unsafe_targets_are_rejected_responses_of_safety_pairs():
    rating = torch.tensor([0, 3, 1, -1])  # significantly, negligibly, better, unrated
    is_safety = torch.tensor([True, True, False, True])
    expected = [False] * 4 + [True, False, False, True]
    assert unsafe_targets(rating, is_safety).tolist() == expected


def test_preference_metrics_hand_computed():
    metrics = PreferenceMetrics(safety=True, unsafe_threshold=0.5)
    r_chosen = torch.tensor([1.0, 0.0, 2.0, -1.0])
    r_rejected = torch.tensor([0.0, 1.0, 3.0, -2.0])
    rating = torch.tensor([0, 0, 1, -1])
    is_safety = torch.tensor([True, True, False, True])
    metrics.update(r_chosen, r_rejected, rating, is_safety, loss=torch.tensor(0.7))
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["accuracy"] == 0.5
    assert out["accuracy/significantly_better"] == 0.5
    assert out["accuracy/better"] == 0.0
    assert out["accuracy/unrated"] == 1.0
    assert "accuracy/slightly_better" not in out  # absent levels are not reported as NaN
    assert out["reward_chosen"] == 0.5 and out["reward_rejected"] == 0.5
    assert out["reward_margin"] == 0.0
    assert out["loss"] == pytest.approx(0.7)
    # Predicted unsafe (reward < 0): chosen #3, rejected #3; unsafe: rejected #0, #1, #3.
    assert out["unsafe_precision"] == 0.5
    assert out["unsafe_recall"] == pytest.approx(1 / 3)
    # A second batch with a new level accumulates; reset forgets everything.
    metrics.update(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2]),
                   torch.tensor([False]), loss=torch.tensor(0.2))  # fmt: skip
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["accuracy/slightly_better"] == 1.0
    assert out["loss"] == pytest.approx((0.7 * 4 + 0.2) / 5)
    metrics.reset()
    assert metrics.compute() == {}


def test_helpful_metrics_have_no_safety_scores():
    metrics = PreferenceMetrics(safety=False)
    metrics.update(torch.ones(2), torch.zeros(2), torch.tensor([3, 3]), torch.ones(2, dtype=torch.bool),
                   torch.tensor(0.1))  # fmt: skip
    out = metrics.compute()
    assert "unsafe_precision" not in out and float(out["accuracy/negligibly_better"]) == 1.0


def test_wrong_pairs_keeps_the_most_confidently_wrong(tokenizer, safety_batch):
    wrong = WrongPairs(k=2)
    B = safety_batch["rating"].shape[0]
    r_chosen = torch.zeros(B)
    r_rejected = torch.tensor([-1.0, 0.5, 3.0, 0.0, 2.0, -2.0, 1.0, -0.5])  # right: 0, 5, 7
    wrong.update(safety_batch, r_chosen, r_rejected)
    rows = wrong.rows(tokenizer.decode)
    assert [row["reward_difference"] for row in rows] == [-3.0, -2.0]
    records = builtin_preferences("safety", "validation", seed=0, n=8)
    assert rows[0]["rating"] == records[2]["rating"]
    assert rows[0]["chosen"].strip() == records[2]["chosen"].strip()
    assert rows[0]["rejected"].strip() == records[2]["rejected"].strip()
    assert records[2]["prompt"][-1]["content"] in rows[0]["prompt"]


def test_validation_logs_wrong_pairs_table_and_jsonl(tmp_path, tokenizer):
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from llamalab.data.preference import PreferenceDataModule

    stage = RewardStage(
        arch=small_arch(tokenizer.vocab_size).to_dict(), optim=OPTIM, kind="safety",
        tokenizer_path=str(tokenizer.model_path), wrong_pairs=4,
    )  # fmt: skip
    data = PreferenceDataModule("safety", tokenizer=tokenizer, batch_size=8, builtin_size=16)
    logger = WandbLogger(project="llamalab-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(
        accelerator="cpu", logger=logger, limit_val_batches=2, default_root_dir=str(tmp_path),
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    (metrics,) = trainer.validate(stage, datamodule=data, verbose=False)
    logger.experiment.finish()
    assert 0.0 <= metrics["val/accuracy"] <= 1.0 and "val/unsafe_recall" in metrics
    lines = (tmp_path / "samples" / "wrong_pairs_epoch_0.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert 1 <= len(rows) <= 4
    assert all(row["reward_difference"] <= 0 and row["rating"] in RATINGS for row in rows)
    assert [r["reward_difference"] for r in rows] == sorted(r["reward_difference"] for r in rows)
    tables = list(
        tmp_path.glob("wandb/offline-run-*/files/media/table/val/wrong_pairs*.table.json")
    )
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "chosen", "rejected", "rating", "reward_difference"]
    assert len(table["data"]) == len(rows)


# ---------------------------------------------------------------------------- export and score.py
@pytest.fixture(scope="module")
def exported_rm(tmp_path_factory, tokenizer) -> tuple[Path, RewardStage]:
    """A reward stage (random weights) exported the way a run ends."""
    stage = make_stage(
        vocab_size=tokenizer.vocab_size, seed=1, tokenizer_path=str(tokenizer.model_path)
    )
    with torch.no_grad():  # a non-trivial head, so the scores differ between sequences
        stage.model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    path = stage.export(tmp_path_factory.mktemp("rm") / "export")
    return path, stage


def test_export_scores_equal_transformers(exported_rm, safety_batch):
    path, stage = exported_rm
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert len(config["id2label"]) == 1
    assert config["pad_token_id"] not in (None, config["eos_token_id"])
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids, mask = safety_batch["input_ids"], safety_batch["attention_mask"]  # right padded, pad id
    assert ids[mask == 0].eq(config["pad_token_id"]).all()
    with torch.no_grad():
        ours = stage.rewards(ids, mask)
        hf = theirs(ids, attention_mask=mask).logits.squeeze(-1)
        assert (hf - ours).abs().max() <= 1e-4
        one = ids[:1, : int(mask[0].sum())]  # unpadded
        assert (
            theirs(one).logits.squeeze(-1) - stage.rewards(one, torch.ones_like(one))
        ).abs().max() <= 1e-4
    assert ours.std() > 0.1  # the comparison is not between constants


def _load_score_cli():
    spec = importlib.util.spec_from_file_location("score_cli", REPO / "src" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_cli_scores_responses_and_pairs(tmp_path, exported_rm, tokenizer, capsys):
    path, stage = exported_rm
    records = builtin_preferences("safety", "validation", seed=0, n=3)
    rows = [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records
    ]
    rows.append({"prompt": "How do I sort a list?", "response": "Use sorted()."})
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "scores.jsonl"
    _load_score_cli().main(["--model", str(path.parent), "--data", str(data), "--out", str(out)])
    printed = capsys.readouterr().out
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 4
    # Same encoding as training: the preference datamodule's ids, scored by the stage.
    items, _ = encode_preference_records(tokenizer, records, max_len=256)
    seqs = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    single = tokenizer.encode_dialog([{"role": "user", "content": "How do I sort a list?"},
                                      {"role": "assistant", "content": "Use sorted()."}])  # fmt: skip
    expected = score_token_rows(stage.model, [*seqs, single], tokenizer.pad_id).tolist()
    got = [s["score_chosen"] for s in scored[:3]] + [s["score_rejected"] for s in scored[:3]]
    assert [*got, scored[3]["score"]] == pytest.approx(expected, abs=1e-5)
    assert scored[3]["probability"] == pytest.approx(1 / (1 + math.exp(-scored[3]["score"])))
    accuracy = sum(s["score_chosen"] > s["score_rejected"] for s in scored[:3]) / 3
    assert f"pairwise accuracy {accuracy:.4f} over 3 pairs" in printed
    assert "mean score" in printed


def test_score_cli_bad_record_names_line_and_field(tmp_path, exported_rm, capsys):
    path, _ = exported_rm
    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        _load_score_cli().main(["--model", str(path), "--data", str(data)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "response" in err


# ---------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A small language model with the built-in tokenizer: what `stage.init` points at."""
    torch.manual_seed(0)
    model = Llama(small_arch(tokenizer.vocab_size))
    model.init_weights()
    return save_hf(model, tokenizer, tmp_path_factory.mktemp("lm") / "export")


def reward_overrides(tmp: Path, init: Path, rm: str) -> list[str]:
    return [
        "stage=reward", f"rm={rm}", f"stage.init={init}", f"paths.output_dir={tmp / 'run'}",
        f"paths.outputs_root={tmp / 'outputs'}", "logger=none", "callbacks=none",
    ]  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_reward_run_through_train_py(tmp_path, lm_checkpoint, cache_dir, tokenizer):
    overrides = [
        *reward_overrides(tmp_path, lm_checkpoint, "safety"),
        "trainer.max_steps=3", "stage.batch_size=8", "data.batch_size=4", "data.builtin_size=48",
        "trainer.val_check_interval=null", "+trainer.limit_val_batches=2",
    ]  # fmt: skip
    result = run_train(overrides, cache_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss", "val/accuracy", "val/reward_margin", "val/unsafe_precision"):
        assert name in header
    assert list((run / "samples").glob("wrong_pairs_epoch_*.jsonl"))
    # The export: a sequence classifier whose transformers scores equal ours.
    model = load_model(run / "export")
    assert isinstance(model, LlamaScalar)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(run / "export").eval()
    records = builtin_preferences("safety", "validation", seed=3, n=6)
    items, _ = encode_preference_records(tokenizer, records, max_len=256)
    batch = PreferenceCollator(tokenizer.pad_id)(items)
    with torch.no_grad():
        ours = model.score_sequences(batch["input_ids"], batch["attention_mask"])
        hf = theirs(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    assert (hf - ours).abs().max() <= 1e-4


@pytest.mark.integration
@pytest.mark.slow
def test_missing_rejected_field_stops_before_the_model(tmp_path, lm_checkpoint, cache_dir):
    good = {"prompt": "How do I sort a list?", "chosen": "Use sorted().", "rejected": "No."}
    bad = {"prompt": "How do I reverse a list?", "chosen": "Use reversed()."}
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    result = run_train(
        [*reward_overrides(tmp_path, lm_checkpoint, "helpful"), f"data.path={data}"], cache_dir
    )
    assert result.returncode != 0
    assert f"{data}:2" in result.stderr and "rejected" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "export").exists()
