"""Bad input through ``src/train.py``: one clear message, exit 1, no traceback (unless
HYDRA_FULL_ERROR=1), before any training step. Complements test_train_pretrain.py (missing /
empty data, vocabulary mismatch, typo, impossible architecture), test_formats*.py (JSONL/JSON/
Parquet errors) and test_checkpoint.py (wrong shapes at the API level)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import run_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamalab.checkpoint import CheckpointError, save_hf
from llamalab.data.corpus import read_text_documents
from llamalab.data.errors import DataError
from llamalab.model import Llama, LlamaConfig
from llamalab.stages.pretrain import PretrainStage

QUICK = ["logger=none", "callbacks=none", "plan.check=false", "++trainer.limit_val_batches=1"]


def train(
    args: list[str], cache_dir: Path, full_error: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {"HYDRA_FULL_ERROR": "1"} if full_error else None
    return run_train([*QUICK, *args], cache_dir, timeout=600, env=env)


def assert_clean_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1, the message on the last stderr line, every fragment in it, no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr[result.stderr.rfind("error: ") :]
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def policy(tiny_checkpoints: dict) -> Path:
    """A random tiny LM with the 512-piece tokenizer, as an SFT/reward ``stage.init``."""
    return tiny_checkpoints["sft"]


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.integration
def test_init_weights_of_another_architecture_name_tensor_and_shapes(
    policy: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """config.json says dim 32; the weights beside it are of a dim-48 model."""
    franken = tmp_path / "franken"
    shutil.copytree(policy, franken)
    other = Llama(
        LlamaConfig(dim=48, n_layers=1, n_heads=2, vocab_size=512, multiple_of=16, max_seq_len=256)
    )
    save_hf(other, None, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", franken / "model.safetensors")
    result = train(
        ["stage=sft", f"stage.init={franken}", f"paths.output_dir={tmp_path / 'run'}"], cache_dir
    )
    assert_clean_error(
        result, f"checkpoint {franken}", "has shape (512, 48), model expects (512, 32)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_checkpoint_tensor_shapes_are_checked_by_name() -> None:
    arch = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)
    module = PretrainStage(arch=arch.to_dict(), optim={"lr": 1e-3, "weight_decay": 0.1})
    module.configure_model()
    state = dict(module.state_dict())
    state["model.output.weight"] = torch.zeros(65, 32)
    with pytest.raises(
        CheckpointError,
        match=r"tensor model.output.weight has shape \(65, 32\), model expects \(64, 32\)",
    ):
        module.on_load_checkpoint({"state_dict": state})


@pytest.mark.integration
def test_resume_from_another_stage_and_missing_ckpt_path(
    policy: Path, tmp_path: Path, cache_dir: Path
) -> None:
    from llamalab.runner.checkpoints import atomic_write
    from llamalab.runner.run import checkpoint_architecture

    meta = {"model_config": checkpoint_architecture(policy).to_dict(), "stage": "reward"}
    ckpt = atomic_write(tmp_path / "reward.ckpt", lambda f: torch.save({"llamalab": meta}, f))
    base = ["stage=sft", f"stage.init={policy}", f"paths.output_dir={tmp_path / 'run'}"]
    result = train([*base, f"ckpt_path={ckpt}"], cache_dir)
    assert_clean_error(result, "was written by stage 'reward', this is stage 'sft'")
    result = train([*base, f"ckpt_path={tmp_path / 'nope.ckpt'}"], cache_dir)
    assert_clean_error(result, f"ckpt_path={tmp_path / 'nope.ckpt'} does not exist")


@pytest.mark.integration
def test_stage_without_its_inputs_names_the_command_to_run_first(
    tmp_path: Path, cache_dir: Path
) -> None:
    result = train(
        ["stage=reward", f"paths.outputs_root={tmp_path}", f"paths.output_dir={tmp_path / 'r'}"],
        cache_dir,
    )
    assert_clean_error(
        result, "stage=reward cannot start, inputs missing", f"stage.init={tmp_path}/sft/latest does not exist",
        "python src/train.py stage=sft",
    )  # fmt: skip


@pytest.mark.integration
def test_gatt_without_its_sampler_names_the_key_and_the_stage(
    policy: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """data.gatt=true samples from outputs/sft/latest by default: missing before any SFT run."""
    args = ["stage=sft", f"stage.init={policy}", "data.gatt=true", f"paths.outputs_root={tmp_path}"]
    result = train([*args, f"paths.output_dir={tmp_path / 'r'}"], cache_dir)
    assert_clean_error(
        result, f"data.gatt_sampler={tmp_path}/sft/latest does not exist",
        "python src/train.py stage=sft", "data.gatt_sampler=rules",
    )  # fmt: skip


# ---------------------------------------------------------------------------- config and data
@pytest.mark.integration
def test_impossible_setting_is_refused_before_the_data_is_read(
    tmp_path: Path, cache_dir: Path
) -> None:
    result = train(
        ["stage.nonfinite=ignore", "data.path=/no/such/file.txt", f"paths.output_dir={tmp_path}"],
        cache_dir,
    )
    assert_clean_error(
        result, "PretrainStage", "stage.nonfinite must be 'stop' or 'skip', got 'ignore'"
    )


@pytest.mark.integration
def test_hydra_full_error_shows_the_traceback(tmp_path: Path, cache_dir: Path) -> None:
    result = train(
        ["stage.nonfinite=ignore", f"paths.output_dir={tmp_path}"], cache_dir, full_error=True
    )
    assert result.returncode == 1 and "Traceback" in result.stderr


@pytest.mark.integration
def test_wrongly_typed_preference_field_names_file_line_and_field(
    policy: Path, tmp_path: Path, cache_dir: Path
) -> None:
    pair = {"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "chosen": 3}) + "\n")
    base = ["stage=reward", f"stage.init={policy}", f"paths.output_dir={tmp_path / 'run'}"]
    assert_clean_error(train([*base, f"data.path={bad}"], cache_dir), f"{bad}:2", "chosen")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("truncation", "counted"), [("drop", "'dropped': 3"), ("truncate", "'truncated': 3")]
)
def test_over_long_sft_samples_are_dropped_or_cut_and_counted(
    policy: Path, tmp_path: Path, cache_dir: Path, truncation: str, counted: str
) -> None:
    user = {"role": "user", "content": "What does len do?"}
    short = {"messages": [user, {"role": "assistant", "content": "It counts items."}]}
    long = {"messages": [user, {"role": "assistant", "content": "It counts items. " * 60}]}
    path = tmp_path / "dialogs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [short] * 20 + [long] * 3))
    args = [
        "stage=sft", f"stage.init={policy}", f"data.path={path}", "data.max_len=64",
        "data.val_fraction=0", f"data.truncation={truncation}", "stage.sample_generations=0",
        "debug=fast_dev_run", f"paths.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = train(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert counted in result.stdout + result.stderr


# ---------------------------------------------------------------------------- pretraining text fuzz
DOCS = ["The len() function returns the number of items.", "Lists are mutable sequences.\nYes."]


def _write_text(path: Path) -> None:
    if path.suffix == ".txt":
        path.write_text("\n\n".join(DOCS) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCS}), path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suffix=st.sampled_from([".txt", ".jsonl", ".parquet"]),
    corruption=st.sampled_from(["truncate", "garbage", "empty"]),
    offset=st.floats(0, 1),
    garbage=st.binary(min_size=1, max_size=8),
)
def test_corrupted_pretraining_text_loads_or_names_the_file(
    suffix: str, corruption: str, offset: float, garbage: bytes
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"corpus{suffix}"
        _write_text(path)
        data = path.read_bytes()
        cut = int(len(data) * offset)
        if corruption == "truncate":
            data = data[:cut]
        elif corruption == "garbage":
            data = data[:cut] + garbage + data[cut:]
        else:
            data = b""
        path.write_bytes(data)
        try:
            documents = read_text_documents(path)
        except DataError as err:
            assert str(err).startswith(str(path)), str(err)
        else:
            assert documents and all(isinstance(d, str) and d.strip() for d in documents)
