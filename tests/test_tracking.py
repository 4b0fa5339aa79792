"""W&B tracking: tags and mode from the config, the offline-run reader, and an offline multirun
read back (one group, names/tags/config, metrics against tokens seen, the samples table)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import compose_config, run_train
from omegaconf import OmegaConf

from llamalab.runner.callbacks import default_callbacks
from llamalab.runner.tracking import (
    TOKENS_AXIS,
    WandbTracking,
    finish_previous_run,
    read_offline_run,
    run_tags,
    sweep_group,
    wandb_kwargs,
    wandb_offline,
    wandb_records,
)


def test_tags_name_stage_model_attention_strategy_and_seed(tmp_path: Path) -> None:
    cfg = compose_config(["attention=gqa", "seed=7"], output_dir=tmp_path)
    assert run_tags(cfg, cfg.logger.wandb) == ["pretrain", "tiny", "gqa", "strategy:auto", "seed:7"]
    kwargs = wandb_kwargs(cfg, cfg.logger.wandb)
    assert kwargs["offline"] is True and kwargs["tags"][-1] == "seed:7"
    assert "config" not in kwargs  # instantiate() would take it for its own argument
    assert (
        "group" not in kwargs and sweep_group(cfg) is None
    )  # a single run keeps the config's group


def test_offline_unless_logged_in_or_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_offline(OmegaConf.create({"offline": None}))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline(OmegaConf.create({"offline": None}))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline(OmegaConf.create({"offline": None}))
    assert not wandb_offline(OmegaConf.create({"offline": False}))  # the config has the last word


def test_tracking_callback_only_with_the_wandb_logger(tmp_path: Path) -> None:
    callbacks = default_callbacks(compose_config(["seed=3"], output_dir=tmp_path))
    (callback,) = [c for c in callbacks if isinstance(c, WandbTracking)]
    assert callback.config["seed"] == 3
    assert callback.config["model"]["n_kv_heads"] is None  # resolved, not "${...}"
    callbacks = default_callbacks(compose_config(["logger=none"], output_dir=tmp_path))
    assert not any(isinstance(c, WandbTracking) for c in callbacks)


def test_finish_previous_run_without_wandb_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    finish_previous_run()  # must not import wandb (a run that never used it stays light)
    assert "wandb" not in sys.modules


def write_wandb_file(path: Path, records: list[bytes]) -> None:
    """The LevelDB-style log, written by hand: 32 KiB blocks, chunk headers, FIRST/MIDDLE/LAST."""
    out = bytearray(b":W&B\xe1\xbe\x00")
    for payload in records:
        first = True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out += b"\x00" * left
                continue
            chunk, payload = payload[: left - 7], payload[left - 7 :]
            kind = (1 if first else 4) if not payload else (2 if first else 3)
            out += b"\x00\x00\x00\x00" + len(chunk).to_bytes(2, "little") + bytes([kind]) + chunk
            first = False
            if not payload:
                break
    path.write_bytes(bytes(out))


def test_reader_reassembles_records_across_blocks(tmp_path: Path) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for step in range(3):  # each history record ~50 KB: spans two or three blocks
        rec = pb.Record()
        item = rec.history.item.add()
        item.key, item.value_json = "val/loss", json.dumps(float(step))
        note = rec.history.item.add()
        note.key, note.value_json = "note", json.dumps("x" * 50_000)
        records.append(rec.SerializeToString())
    path = tmp_path / "run-test.wandb"
    write_wandb_file(path, records)
    losses = [r.history.item[0].value_json for r in wandb_records(path)]
    assert losses == ["0.0", "1.0", "2.0"]
    path.write_bytes(b"not a run")
    with pytest.raises(ValueError, match="not a W&B run file"):
        list(wandb_records(path))


@pytest.mark.integration
@pytest.mark.slow
def test_offline_multirun_is_one_group_with_metrics_config_and_tables(
    tmp_path: Path, cache_dir: Path
) -> None:
    outputs = tmp_path / "outputs"
    result = run_train(
        [
            "-m",
            "attention=mha,mqa",
            "seed=5",
            "model.n_layers=1",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "data.batch_size=2",
            "stage.batch_tokens=512",
            "callbacks=none",
            f"paths.outputs_root={outputs}",
        ],
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (outputs / "pretrain").glob("20*")
    runs = [read_offline_run(sweep / job) for job in ("0", "1")]
    assert [r.name for r in runs] == ["pretrain-tiny-mha-s5", "pretrain-tiny-mqa-s5"]
    assert runs[0].group == runs[1].group == f"sweep-{sweep.name}-pretrain"
    assert runs[1].tags == ["pretrain", "tiny", "mqa", "strategy:auto", "seed:5"]
    # The full resolved config (not only the module's hyperparameters).
    assert runs[1].config["model"]["n_kv_heads"] == 1 and runs[1].config["seed"] == 5
    assert runs[1].config["data"]["seq_len"] == 256
    # Step metrics against tokens seen: defined as the x-axis, and present in validation rows.
    assert runs[0].step_metrics["val/loss"] == TOKENS_AXIS
    assert runs[0].step_metrics["train/loss"] == TOKENS_AXIS
    val_rows = [h for h in runs[0].history if "val/loss" in h]
    assert val_rows and all(h[TOKENS_AXIS] == 2 * 512 for h in val_rows)
    train_rows = [h for h in runs[0].history if "train/loss" in h]
    assert [h[TOKENS_AXIS] for h in train_rows] == [512, 1024]
    assert runs[0].summary["val/loss"] == val_rows[-1]["val/loss"]
    # The pretraining samples table: 4 greedy continuations of validation windows.
    (table_file, *_) = sorted(
        (sweep / "0").glob("wandb/offline-run-*/files/media/table/val/samples_*.table.json")
    )
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "tokens_seen", "prompt", "continuation"]
    assert len(table["data"]) == 4 and all(row[3] for row in table["data"])
    assert runs[0].summary["val/samples/_type"] == "table-file"  # nested keys flattened with /
