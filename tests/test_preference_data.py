"""Preference pairs (encoding, the chosen/rejected batch, datamodule) and PPO prompt data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.data import assistant, system, user, write_jsonl

from llamalab.data.errors import DataError
from llamalab.data.labels import RATINGS
from llamalab.data.preference import (
    PreferenceCollator,
    PreferenceDataModule,
    encode_preference,
    encode_preference_records,
)
from llamalab.data.prompts import PromptDataModule, PromptDataset, collate_prompts
from llamalab.tokenizer import Tokenizer

RECORD = {
    "prompt": [system("Be brief."), user("What does math.prod do?")],
    "chosen": "Calculate the product of all the elements.",
    "rejected": "I don't know.",
    "rating": "better",
    "is_safety": False,
}


@pytest.fixture(scope="session")
def tokenizer(small_tok: Tokenizer) -> Tokenizer:
    return small_tok


def test_encode_preference_is_the_full_dialog_ending_with_eos(tokenizer: Tokenizer):
    chosen, rejected = encode_preference(tokenizer, RECORD, max_len=500)
    assert chosen == tokenizer.encode_dialog([*RECORD["prompt"], assistant(RECORD["chosen"])])
    assert rejected == tokenizer.encode_dialog([*RECORD["prompt"], assistant(RECORD["rejected"])])
    assert chosen[-1] == rejected[-1] == tokenizer.eos_id
    prompt = tokenizer.encode_dialog(RECORD["prompt"])
    assert chosen[: len(prompt)] == prompt == rejected[: len(prompt)]
    assert encode_preference(tokenizer, RECORD, max_len=len(chosen) - 1) is None
    assert encode_preference(tokenizer, RECORD, max_len=len(chosen)) == (chosen, rejected)
    items, dropped = encode_preference_records(tokenizer, [RECORD, {**RECORD, "rating": None}], 500)
    assert dropped == 0 and [i["rating"] for i in items] == [RATINGS.index("better"), -1]


def _items() -> list[dict]:
    return [
        {"chosen_ids": [1, 5, 6, 2], "rejected_ids": [1, 5, 2], "rating": 0, "is_safety": True},
        {
            "chosen_ids": [1, 7, 2],
            "rejected_ids": [1, 7, 8, 9, 10, 2],
            "rating": -1,
            "is_safety": False,
        },
    ]


def test_preference_collator_right_padding():
    batch = PreferenceCollator(pad_id=0)(_items())
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 2, 0, 0],  # chosen rows first
        [1, 7, 2, 0, 0, 0],
        [1, 5, 2, 0, 0, 0],  # then rejected rows, same order
        [1, 7, 8, 9, 10, 2],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3, 3, 6]
    assert batch["rating"].tolist() == [0, -1] and batch["rating"].dtype == torch.long
    assert batch["is_safety"].tolist() == [True, False] and batch["is_safety"].dtype == torch.bool


def test_preference_collator_left_padding():
    batch = PreferenceCollator(pad_id=0, padding_side="left")(_items())
    assert batch["input_ids"][:, -1].tolist() == [2, 2, 2, 2]  # every row ends at column T-1
    assert batch["input_ids"][1].tolist() == [0, 0, 0, 1, 7, 2]
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="padding_side"):
        PreferenceCollator(0, padding_side="middle")


def test_preference_datamodule_builtin(tokenizer: Tokenizer):
    dm = PreferenceDataModule(
        "safety", tokenizer=tokenizer, batch_size=4, builtin_size=40, max_len=256
    )
    summary = dm.validate()
    assert summary["pairs"]["train"] + summary["dropped"]["train"] == 40
    assert summary["pairs"]["val"] > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["rating"].shape == (4,)
    assert bool(batch["is_safety"].any())  # the safety mix is mostly safety prompts
    assert set(batch["rating"].tolist()) <= set(range(len(RATINGS)))
    with pytest.raises(ValueError, match="kind"):
        PreferenceDataModule("harmless", tokenizer=tokenizer)


def test_preference_datamodule_from_file(tokenizer: Tokenizer, tmp_path: Path):
    rows = [
        {
            "prompt": f"Q{i}?",
            "chosen": f"Answer {i}.",
            "rejected": "No.",
            "rating": "slightly better",
        }
        for i in range(10)
    ]
    dm = PreferenceDataModule(
        path=str(write_jsonl(tmp_path / "p.jsonl", rows)),
        tokenizer=tokenizer,
        val_fraction=0.2,
        batch_size=3,
    )
    assert dm.validate()["pairs"] == {"train": 8, "val": 2}
    assert len(dm.records("val")) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["rating"].tolist() == [RATINGS.index("slightly_better")] * 3
    too_short = PreferenceDataModule(path=str(tmp_path / "p.jsonl"), tokenizer=tokenizer, max_len=4)
    with pytest.raises(DataError, match="no training pair fits"):
        too_short.validate()


# -------------------------------------------------------------------------------- prompts


def test_prompt_dataset_and_collate(tokenizer: Tokenizer):
    records = [
        {"prompt": [user("Hi")], "is_safety": False},
        {"prompt": [user("word " * 200)], "is_safety": False},  # too long: left out
        {"prompt": [system("s"), user("How do I pick a lock?")], "is_safety": True},
    ]
    dataset = PromptDataset(records, tokenizer, max_prompt_len=64)
    assert (len(dataset), dataset.dropped) == (2, 1)
    batch = collate_prompts([dataset[0], dataset[1]])
    assert batch["prompt_ids"] == [
        tokenizer.encode_dialog(records[0]["prompt"]),
        tokenizer.encode_dialog(records[2]["prompt"]),
    ]
    assert batch["index"].tolist() == [0, 2]  # positions in `records`, dropped ones included
    assert batch["is_safety"].tolist() == [False, True] and batch["is_safety"].dtype == torch.bool
    ends = tokenizer.encode("[INST] Hi [/INST]", bos=True)
    assert batch["prompt_ids"][0] == ends  # a generation prompt: no answer, no EOS


def test_prompt_datamodule_builtin_indices_point_at_records(tokenizer: Tokenizer):
    dm = PromptDataModule(tokenizer=tokenizer, batch_size=5, builtin_size=30, builtin_val_size=10)
    assert dm.validate()["prompts"] == {"train": 30, "val": 10}
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        records = dm.records(split)
        for batch in loader:
            for ids, index, safety in zip(batch["prompt_ids"], batch["index"], batch["is_safety"]):
                record = records[int(index)]
                assert ids == tokenizer.encode_dialog(record["prompt"])
                assert bool(safety) == record["is_safety"]
    assert {"kind", "reference", "object"} <= set(dm.records("val")[0])
    train_text = {r["prompt"][-1]["content"] for r in dm.records("train")}
    assert not train_text & {r["prompt"][-1]["content"] for r in dm.records("val")}


def test_prompt_datamodule_from_file_resumes(tokenizer: Tokenizer, tmp_path: Path):
    path = str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question {i}?"} for i in range(20)]))

    def indices(dm: PromptDataModule) -> list[int]:
        return [i for b in dm.train_dataloader() for i in b["index"].tolist()]

    dm = PromptDataModule(path=path, tokenizer=tokenizer, batch_size=4, val_fraction=0.2)
    full = indices(dm)
    assert sorted(full) == list(range(16))
    loader = iter(dm.train_dataloader())
    next(loader)
    resumed = PromptDataModule(path=path, tokenizer=tokenizer, batch_size=4, val_fraction=0.2)
    resumed.load_state_dict(dm.state_dict())
    assert indices(resumed) == full[4:]
