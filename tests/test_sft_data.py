"""SFT encoding (answer-only labels, GAtt), packing, padding and the SFT datamodule with resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.data import assistant, system, user, write_jsonl

from llamalab.data.errors import DataError
from llamalab.data.labels import IGNORE_INDEX
from llamalab.data.sampling import ResumableRandomSampler, holdout_split
from llamalab.data.sft import (
    EncodeStats,
    SFTDataModule,
    build_gatt_dialog,
    encode_sft_example,
    pack_examples,
    pad_batch,
)
from llamalab.tokenizer import Tokenizer

SYSTEM = "Answer briefly."
DIALOG = [
    system(SYSTEM),
    user("What does math.prod do?"),
    assistant("Calculate the product of all the elements."),
    user("And sorted?"),
    assistant("Return a new sorted list."),
]


@pytest.fixture(scope="session")
def tokenizer(small_tok: Tokenizer) -> Tokenizer:
    return small_tok


def _labelled(example: dict) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def _answers(tok: Tokenizer, example: dict) -> list[str]:
    """Decoded labelled spans, one per EOS (each answer is learned with its trailing space)."""
    spans: list[list[int]] = [[]]
    for token in _labelled(example):
        spans[-1].append(token)
        if token == tok.eos_id:
            spans.append([])
    assert spans[-1] == []  # every labelled span ends with EOS
    return [tok.decode(span[:-1]).strip() for span in spans[:-1]]


def test_masking_labels_exactly_the_answers(tokenizer: Tokenizer):
    """Hand-built from Meta's format: each pair is BOS "[INST] user [/INST] answer " EOS; the
    prompt part "[INST] user [/INST]" (with the system block in the first) carries no label."""
    tok = tokenizer
    first_user = f"<<SYS>>\n{SYSTEM}\n<</SYS>>\n\nWhat does math.prod do?"
    expected_ids: list[int] = []
    expected_labels: list[int] = []
    for user_text, answer in [
        (first_user, "Calculate the product of all the elements."),
        ("And sorted?", "Return a new sorted list."),
    ]:
        prompt = tok.encode(f"[INST] {user_text} [/INST]", bos=True)
        pair = tok.encode(f"[INST] {user_text} [/INST] {answer} ", bos=True, eos=True)
        assert pair[: len(prompt)] == prompt
        expected_ids += pair
        expected_labels += [IGNORE_INDEX] * len(prompt) + pair[len(prompt) :]
    example = encode_sft_example(tok, DIALOG, max_len=1000)
    assert example == {"input_ids": expected_ids, "labels": expected_labels}
    assert example["labels"][0] == IGNORE_INDEX  # BOS: what makes packing safe
    answers = _labelled(example)
    assert answers.count(tok.eos_id) == 2 and answers[-1] == tok.eos_id
    assert _answers(tok, example) == [DIALOG[2]["content"], DIALOG[4]["content"]]


def test_learn_only_last_answer(tokenizer: Tokenizer):
    full = encode_sft_example(tokenizer, DIALOG, max_len=1000)
    last = encode_sft_example(tokenizer, DIALOG, max_len=1000, learn_only_last=True)
    assert last["input_ids"] == full["input_ids"]
    assert _answers(tokenizer, last) == ["Return a new sorted list."]
    # Same labels as the full mask from the second answer on, none before it.
    cut = len(full["labels"]) - len(_labelled(last)) - 1
    assert last["labels"][cut + 1 :] == full["labels"][cut + 1 :]
    assert set(last["labels"][: cut + 1]) == {IGNORE_INDEX}


def test_build_gatt_dialog_keeps_instruction_in_first_turn_only():
    instruction = "Answer in uppercase."
    sampled = [
        user(f"{instruction} q1"),
        assistant("A1"),
        user(f"{instruction} q2"),
        assistant("A2"),
    ]
    messages, learn_only_last = build_gatt_dialog(instruction, sampled)
    assert learn_only_last is True
    assert messages == [user(f"{instruction} q1"), assistant("A1"), user("q2"), assistant("A2")]
    bare = [system("s"), user("q1"), assistant("A1"), user("q2"), assistant("A2")]
    assert build_gatt_dialog(instruction, bare)[0][1] == user(f"{instruction} q1")


def test_truncation_and_drop_are_counted(tokenizer: Tokenizer):
    full = encode_sft_example(tokenizer, DIALOG, max_len=1000)
    n = len(full["input_ids"])
    stats = EncodeStats()
    cut = encode_sft_example(tokenizer, DIALOG, max_len=n - 3, stats=stats)
    assert cut == {"input_ids": full["input_ids"][: n - 3], "labels": full["labels"][: n - 3]}
    assert (
        encode_sft_example(tokenizer, DIALOG, max_len=n - 3, truncation="drop", stats=stats) is None
    )
    # Cut before the first answer: nothing left to learn, dropped.
    assert encode_sft_example(tokenizer, DIALOG, max_len=5, stats=stats) is None
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 2, 2)
    with pytest.raises(DataError, match="roles must alternate"):
        encode_sft_example(tokenizer, [user("a"), user("b")], max_len=100)


def _examples() -> list[dict]:
    # Hand-made samples; labels[0] is the BOS (-100) as encode_sft_example guarantees.
    return [
        {"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2]},
        {"input_ids": [1, 8, 9], "labels": [-100, 9, -100]},
        {"input_ids": [1, 10, 11, 12], "labels": [-100, -100, 11, 12]},
        {"input_ids": [1, 13], "labels": [-100, 13]},
    ]


def test_pack_examples_keeps_each_sample():
    rows = pack_examples(_examples(), seq_len=8, pad_id=0)
    assert len(rows) == 2  # [5 + 3] then [4 + 2 + 2 pad]
    assert rows[0]["input_ids"].tolist() == [1, 5, 6, 7, 2, 1, 8, 9]
    assert rows[0]["labels"].tolist() == [-100, -100, 6, 7, 2, -100, 9, -100]
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1]["input_ids"].tolist() == [1, 10, 11, 12, 1, 13, 0, 0]
    assert rows[1]["labels"].tolist() == [-100, -100, 11, 12, -100, 13, -100, -100]
    assert rows[1]["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 0, 0]
    assert rows[1]["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    # Every sample's tokens/labels come back from its segment.
    samples = [
        (
            row["input_ids"][row["segment_ids"] == s].tolist(),
            row["labels"][row["segment_ids"] == s].tolist(),
        )
        for row in rows
        for s in range(1, int(row["segment_ids"].max()) + 1)
    ]
    assert samples == [(e["input_ids"], e["labels"]) for e in _examples()]


def test_packing_never_predicts_across_samples(tokenizer: Tokenizer):
    """With the shift, labels[t] is predicted from position t-1: at each sample start the
    label must be ignored, so no loss flows from one sample into the next."""
    dialogs = [DIALOG, [user("Hi"), assistant("Hello.")], [user("Bye"), assistant("Goodbye.")]]
    examples = [encode_sft_example(tokenizer, d, max_len=200) for d in dialogs]
    rows = pack_examples(examples, seq_len=200, pad_id=tokenizer.pad_id)
    for row in rows:
        starts = (row["position_ids"] == 0) & (row["segment_ids"] > 0)
        assert set(row["labels"][starts].tolist()) == {IGNORE_INDEX}
        assert set(row["input_ids"][starts].tolist()) == {tokenizer.bos_id}
    bad = {"input_ids": [5, 6], "labels": [5, 6]}
    with pytest.raises(ValueError, match="unlabelled token"):
        pack_examples([bad], seq_len=8)
    with pytest.raises(ValueError, match="cannot pack"):
        pack_examples(_examples(), seq_len=4)


def test_pad_batch():
    batch = pad_batch(_examples()[:2], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, 9, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert all(v.dtype == torch.long for v in batch.values())


# ------------------------------------------------------------------------------ sampler


def test_sampler_resume_and_shards():
    sampler = ResumableRandomSampler(10, seed=3)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    sampler.set_epoch(2)
    assert list(sampler) != order  # a new epoch reshuffles
    resumed = ResumableRandomSampler(10, seed=3)
    resumed.load_state_dict({"seed": 3, "epoch": 1, "consumed": 4})
    resumed.set_epoch(1)  # Lightning calls this before the (resumed) epoch
    assert list(resumed) == order[4:]
    resumed.set_epoch(1)
    assert list(resumed) == order  # the skip applies once
    shards = [list(ResumableRandomSampler(10, 3, True, 3, r)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert set().union(*shards) == set(range(10))
    assert list(ResumableRandomSampler(5, 0, shuffle=False)) == [0, 1, 2, 3, 4]
    train, val = holdout_split(20, 0.1, seed=0)
    assert len(val) == 2 and sorted(train + val) == list(range(20))
    assert holdout_split(3, 0.01, 0)[1] != [] and holdout_split(5, 0.0, 0)[1] == []


# --------------------------------------------------------------------------- datamodule


def _datamodule(tokenizer: Tokenizer, **kwargs) -> SFTDataModule:
    args = {"seq_len": 128, "batch_size": 4, "builtin_size": 60, "tokenizer": tokenizer}
    return SFTDataModule(**{**args, **kwargs})


def test_datamodule_builtin_packed_and_padded(tokenizer: Tokenizer):
    dm = _datamodule(tokenizer, gatt=True, gatt_size=8, gatt_sampler="rules", val_fraction=0.1)
    summary = dm.validate()
    assert summary["records"] == {"train": 61, "val": 7}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "segment_ids", "position_ids"}
    assert batch["input_ids"].shape == (4, 128)
    prompts = dm.val_prompts()
    assert len(prompts) == 7 and all(p[-1]["role"] == "user" for p in prompts)
    assert sum(len(b["input_ids"]) for b in dm.val_dataloader()) == len(dm.val_data)

    padded = _datamodule(tokenizer, packing=False)
    padded.setup()
    batch = next(iter(padded.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.max()) == batch["input_ids"].shape[1]
    for row, n in zip(batch["input_ids"], lengths):
        assert set(row[int(n) :].tolist()) <= {tokenizer.pad_id}


def test_datamodule_reads_user_file_and_reports_errors_before_training(
    tokenizer: Tokenizer, tmp_path: Path
):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(12)]
    dm = _datamodule(
        tokenizer, path=str(write_jsonl(tmp_path / "sft.jsonl", rows)), val_fraction=0.25
    )
    assert dm.validate()["records"] == {"train": 9, "val": 3}
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows, {"prompt": "q", "response": 7}])
    with pytest.raises(DataError, match=r"bad\.jsonl:13: field 'response'"):
        _datamodule(tokenizer, path=str(bad)).validate()
    with pytest.raises(ValueError, match="max_len"):
        SFTDataModule(seq_len=64, max_len=128, tokenizer=tokenizer)


def test_datamodule_resumes_mid_epoch(tokenizer: Tokenizer):
    def batches(dm: SFTDataModule) -> list[list[list[int]]]:
        return [b["input_ids"].tolist() for b in dm.train_dataloader()]

    dm = _datamodule(tokenizer)
    dm.setup()
    full = batches(dm)
    loader = iter(dm.train_dataloader())
    for _ in range(3):
        next(loader)
    state = dm.state_dict()
    assert state["train_order"]["consumed"] == 12
    resumed = _datamodule(tokenizer)
    resumed.load_state_dict(state)
    assert batches(resumed) == full[3:]
    assert batches(resumed) == full  # the next pass is a whole epoch again


def test_lightning_checkpoint_resumes_with_the_unseen_batches(tokenizer: Tokenizer, tmp_path: Path):
    """A run stopped after 3 steps and resumed from its checkpoint sees exactly the batches an
    uninterrupted run sees from step 4 on (Lightning keeps the datamodule's state_dict)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[list[int]]] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.seen.append(batch["input_ids"].tolist())
            return (self.weight**2).sum()

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            return None

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt_path: str | None = None, callbacks: list | None = None) -> list:
        model = Recorder()
        trainer = pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(callbacks),
            callbacks=callbacks,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=_datamodule(tokenizer, seed=7), ckpt_path=ckpt_path)
        return model.seen

    full = fit(max_steps=8)
    assert len({str(batch) for batch in full}) == 8  # distinct batches: order is observable
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    assert fit(max_steps=3, callbacks=[checkpoint]) == full[:3]
    resumed = fit(max_steps=8, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert len(full) == 8 and resumed == full[3:], (len(full), len(resumed))
