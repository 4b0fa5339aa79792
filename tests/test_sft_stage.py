"""SFT stage: packing leaks nothing between samples, the stage trains and shows its samples, and
`src/train.py stage=sft` runs end to end (export loads in transformers, GAtt, bad data)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_train
from helpers.data import small_tokenizer

from llamalab.checkpoint.hf import LLAMA2_CHAT_TEMPLATE
from llamalab.data.labels import IGNORE_INDEX
from llamalab.data.sft import SFTDataModule, pack_examples, pad_batch
from llamalab.model import Llama, LlamaConfig
from llamalab.rlhf.losses import lm_loss_per_sample

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "multiple_of": 16,
    "max_seq_len": 64,
}


def _examples() -> list[dict[str, list[int]]]:
    """Three SFT-shaped samples (first label -100 like a BOS) of different lengths."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 11, 5):
        ids = torch.randint(3, 50, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * 3 + ids[3:]  # a 3-token "prompt", then the "answer"
        out.append({"input_ids": ids, "labels": labels})
    return out


def _model(vocab: int = 50) -> Llama:
    torch.manual_seed(0)
    return Llama.from_config(LlamaConfig(vocab_size=vocab, **TINY)).eval()


def _alone(model: Llama, examples: list[dict[str, list[int]]]) -> torch.Tensor:
    """Each sample's answer-token loss, run on its own (batch of one)."""
    losses = []
    for e in examples:
        logits = model(torch.tensor([e["input_ids"]]))
        losses.append(lm_loss_per_sample(logits, torch.tensor([e["labels"]]))[0])
    return torch.stack(losses)


def _packed_per_sample(
    model: Llama, row: dict[str, torch.Tensor], use_fields: bool
) -> torch.Tensor:
    """Per-sample losses read from one packed row: sample k keeps only its own labels."""
    kwargs = {"segment_ids": row["segment_ids"][None], "position_ids": row["position_ids"][None]}
    logits = model(row["input_ids"][None], **(kwargs if use_fields else {}))
    n = int(row["segment_ids"].max())
    labels = torch.stack(
        [torch.where(row["segment_ids"] == k, row["labels"], IGNORE_INDEX) for k in range(1, n + 1)]
    )
    return lm_loss_per_sample(logits.expand(n, -1, -1), labels)


@torch.no_grad()
def test_packed_sample_losses_equal_their_unpacked_values() -> None:
    model, examples = _model(), _examples()
    rows = pack_examples(examples, seq_len=32, pad_id=0)
    assert len(rows) == 1 and int(rows[0]["segment_ids"].max()) == 3
    packed = _packed_per_sample(model, rows[0], use_fields=True)
    torch.testing.assert_close(packed, _alone(model, examples), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_packing_without_segments_would_leak() -> None:
    """The check above has teeth: without block-diagonal attention and per-sample positions,
    the later samples' losses change."""
    model, examples = _model(), _examples()
    leaky = _packed_per_sample(model, pack_examples(examples, 32)[0], use_fields=False)
    alone = _alone(model, examples)
    torch.testing.assert_close(leaky[0], alone[0], rtol=1e-5, atol=1e-5)  # first sample: same
    assert not torch.allclose(leaky[1:], alone[1:], atol=1e-4)


@torch.no_grad()
def test_padded_sample_losses_equal_their_unpacked_values() -> None:
    model, examples = _model(), _examples()
    batch = pad_batch(examples, pad_id=0)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    padded = lm_loss_per_sample(logits, batch["labels"])
    torch.testing.assert_close(padded, _alone(model, examples), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- the stage in-process
def _stage(tok, tmp_path: Path, **kwargs):  # type: ignore[no-untyped-def]
    from llamalab.stages.sft import SFTStage

    arch = {"vocab_size": tok.vocab_size, **TINY}
    optim = {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 0}
    return SFTStage(arch=arch, optim=optim, tokenizer_path=str(tok.model_path), **kwargs)


def test_sft_stage_trains_and_writes_samples(tmp_path_factory, tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    tok = small_tokenizer(tmp_path_factory)
    data = SFTDataModule(
        tokenizer=tok, builtin_size=40, seq_len=64, batch_size=4, val_fraction=0.1, n_val_prompts=3
    )
    stage = _stage(tok, tmp_path, sample_generations=2, max_new_tokens=6)
    wandb = WandbLogger(project="llamalab-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(
        max_steps=2,
        logger=[CSVLogger(str(tmp_path), name="csv", version=""), wandb],
        default_root_dir=str(tmp_path),
        limit_val_batches=1,
        val_check_interval=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(stage, datamodule=data)
    wandb.experiment.finish()

    rows = [
        json.loads(x) for x in (tmp_path / "samples" / "epoch_0.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2
    assert set(rows[0]) == {"step", "prompt", "response", "ends_with_eos"}
    assert rows[0]["prompt"].startswith(("user: ", "system: "))
    eos_rate = sum(r["ends_with_eos"] for r in rows) / 2
    assert float(trainer.callback_metrics["val/eos_rate"]) == pytest.approx(eos_rate)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    tables = list(tmp_path.glob("wandb/*/files/media/table/val/samples_*.table.json"))
    assert tables, "the W&B samples table was not logged"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "response", "ends_with_eos"]
    assert len(table["data"]) == 2


def test_generate_samples_flag_answers_that_end_with_eos(tmp_path_factory) -> None:
    """`ends_with_eos` follows the model: a head that always picks EOS stops at once, one that
    never does runs to `max_new_tokens`."""
    tok = small_tokenizer(tmp_path_factory)
    stage = _stage(tok, Path("."), max_new_tokens=5)
    stage.configure_model()
    prompt = [[{"role": "user", "content": "hi"}]]
    stage.model.output = _ConstantHead(tok.vocab_size, tok.eos_id)
    rows = stage.generate_samples(prompt, tok)
    assert rows == [{"step": 0, "prompt": "user: hi", "response": "", "ends_with_eos": True}]
    stage.model.output = _ConstantHead(tok.vocab_size, tok.encode("hello")[-1])
    (row,) = stage.generate_samples(prompt, tok)
    assert not row["ends_with_eos"] and row["response"]


class _ConstantHead(torch.nn.Module):
    """An LM head that always puts all mass on one token."""

    def __init__(self, vocab: int, token: int) -> None:
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        logits[..., self.token] = 10.0
        return logits


def test_sft_stage_rejects_bad_sampling_settings(tmp_path_factory) -> None:
    tok = small_tokenizer(tmp_path_factory)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _stage(tok, Path("."), max_new_tokens=0)


# ------------------------------------------------------------------------- through src/train.py
def _train(args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_train(args, cache, timeout=timeout)


QUICK = ["logger=none", "callbacks=none", "plan.check=false", "++trainer.limit_val_batches=1"]


@pytest.fixture(scope="session")
def pretrained_root(tmp_path_factory, cache_dir: Path) -> Path:
    """outputs root holding pretrain/latest from a 2-step default pretraining run."""
    root = tmp_path_factory.mktemp("outs")
    args = [*QUICK, f"paths.outputs_root={root}", "trainer.max_steps=2", "stage.batch_tokens=1024"]
    result = _train([*args, "data.batch_size=4"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def sft_root(pretrained_root: Path, cache_dir: Path) -> Path:
    """The same root after a 3-step SFT run on a small slice of the built-in dialogs."""
    args = [*QUICK, "stage=sft", f"paths.outputs_root={pretrained_root}", "trainer.max_steps=3"]
    args += ["data.builtin_size=120", "data.batch_size=2", "stage.batch_size=2"]
    args += ["stage.sample_generations=2", "stage.max_new_tokens=8"]
    result = _train(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return pretrained_root


@pytest.mark.integration
@pytest.mark.slow
def test_sft_run_exports_a_transformers_model(sft_root: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = (sft_root / "sft" / "latest").resolve()
    samples = sorted((run / "samples").glob("epoch_*.jsonl"))
    assert samples and all(json.loads(x)["response"] is not None for x in samples[0].open())
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "val/loss" in metrics and "val/eos_rate" in metrics
    hf = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    tokenizer_config = json.loads((run / "export" / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == LLAMA2_CHAT_TEMPLATE  # a chat model's export
    prompt = torch.tensor([[1, 5, 6, 7]])
    out = hf.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 4 and (out[:, :4] == prompt).all()


@pytest.mark.integration
@pytest.mark.slow
def test_sft_with_gatt_trains_end_to_end(sft_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """GAtt answers sampled from the default sampler, the newest SFT run (outputs/sft/latest)."""
    args = [*QUICK, "stage=sft", f"paths.outputs_root={sft_root}", f"paths.output_dir={tmp_path}"]
    args += ["trainer.max_steps=2", "data.gatt=true", "data.gatt_sampling.max_new_tokens=4"]
    args += ["data.builtin_size=60", "data.gatt_size=8", "data.batch_size=2", "stage.batch_size=2"]
    args += ["stage.sample_generations=1", "stage.max_new_tokens=4"]
    result = _train(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "export" / "config.json").is_file()
    sampler = f"{sft_root}/sft/latest"
    assert f"GAtt: sampled 8 dialogs with {sampler}" in result.stdout + result.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_malformed_sft_line_stops_with_file_and_line(
    pretrained_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = tmp_path / "dialogs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"messages": [\n')
    args = ["stage=sft", f"stage.init={pretrained_root}/pretrain/latest", f"data.path={path}"]
    result = _train([*QUICK, *args, f"paths.output_dir={tmp_path}/run"], cache_dir, timeout=300)
    assert result.returncode != 0
    assert f"{path}:3" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "export").exists()
