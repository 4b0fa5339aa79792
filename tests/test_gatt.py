"""Ghost Attention (PAPER.md §3.3): answers sampled from a model with the instruction on every user
turn, trained with it in the first turn only and the loss on the last answer; seeded, cached,
refused with one message when the sampler is missing; the instruction checkers; adherence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.data import assistant, user, write_jsonl

import llamalab.data.gatt as G
from llamalab.checkpoint import load_model
from llamalab.data import builtin as B
from llamalab.data.errors import DataError
from llamalab.data.labels import IGNORE_INDEX
from llamalab.data.sft import SFTDataModule
from llamalab.generation import Answer, answer_prompts, answer_turns
from llamalab.pipeline import MissingInputError

SAMPLING = {"max_new_tokens": 6, "batch_size": 4}


def _datamodule(tiny_checkpoints: dict, cache: Path, **kwargs) -> SFTDataModule:
    args = {
        "tokenizer": tiny_checkpoints["tokenizer"],
        "seq_len": 256,
        "builtin_size": 4,
        "gatt": True,
        "gatt_size": 6,
        "gatt_sampler": str(tiny_checkpoints["sft"]),
        "gatt_sampling": SAMPLING,
        "cache_dir": str(cache),
        "val_fraction": 0.0,
        "packing": False,
    }
    return SFTDataModule(**{**args, **kwargs})


def _gatt(records: list[dict]) -> list[dict]:
    return [r for r in records if "instruction" in r]


def test_sampler_sees_the_instruction_on_every_turn_training_in_the_first_only(
    tiny_checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[dict]] = []

    def spy(model, tokenizer, dialogs, **kwargs):
        seen.extend(dialogs)
        return answer_turns(model, tokenizer, dialogs, **kwargs)

    monkeypatch.setattr(G, "answer_turns", spy)
    dm = _datamodule(tiny_checkpoints, tmp_path)
    records = _gatt(dm.load_records())
    assert len(seen) == len(records) == 6
    rules = B.builtin_gatt(0, n=6)
    for prompt, record, rule in zip(seen, records, rules, strict=True):
        instruction = record["instruction"]
        assert [m["role"] for m in prompt] == ["user"] * (len(record["messages"]) // 2)
        assert all(m["content"].startswith(f"{instruction} ") for m in prompt)
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert users[0].startswith(f"{instruction} ")
        assert not any(instruction in u for u in users[1:])
        assert [f"{instruction} {u}" for u in users[1:]] == [m["content"] for m in prompt[1:]]
        # The answers are the model's, not the rule-written ones.
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert answers != [m["content"] for m in rule["messages"] if m["role"] == "assistant"]


def test_loss_covers_only_the_last_sampled_answer(tiny_checkpoints: dict, tmp_path: Path) -> None:
    dm = _datamodule(tiny_checkpoints, tmp_path)
    dm.setup()
    tokenizer = tiny_checkpoints["tokenizer"]
    gatt = [(r, e) for r, e in zip(dm.train_records, dm.train_data) if "instruction" in r]
    assert len(gatt) == 6
    for record, example in gatt:
        last = record["messages"][-1]["content"]
        labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
        assert labelled[-1] == tokenizer.eos_id
        assert tokenizer.decode(labelled[:-1]).strip() == last
        start = next(i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX)
        assert all(t != IGNORE_INDEX for t in example["labels"][start:])  # one run: the last answer


def test_sampling_is_seeded_and_cached(
    tiny_checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _gatt(_datamodule(tiny_checkpoints, tmp_path / "a").load_records())
    again = _gatt(_datamodule(tiny_checkpoints, tmp_path / "b").load_records())
    assert first == again  # same seed, fresh caches: the same samples
    other = _gatt(_datamodule(tiny_checkpoints, tmp_path / "a", seed=1).load_records())
    assert [r["messages"] for r in other] != [r["messages"] for r in first]
    assert len(list((tmp_path / "a" / "gatt").glob("*.json"))) == 2  # one file per seed

    def no_model(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(G, "load_model", no_model)
    assert _gatt(_datamodule(tiny_checkpoints, tmp_path / "a").load_records()) == first
    monkeypatch.setenv("LOCAL_RANK", "1")  # another rank reads rank 0's file
    assert _gatt(_datamodule(tiny_checkpoints, tmp_path / "a").load_records()) == first
    with pytest.raises(DataError, match="local rank 1 waited 0 s for the GAtt samples"):
        _datamodule(
            tiny_checkpoints, tmp_path / "empty", gatt_sampling={**SAMPLING, "wait_s": 0}
        ).load_records()


def test_user_file_gatt_records_are_resampled_and_rules_keep_them(
    tiny_checkpoints: dict, tmp_path: Path
) -> None:
    plain = {"messages": [user("Hello?"), assistant("Hi.")]}
    gatt = {"instruction": "Answer in uppercase.", "messages": [user("Answer in uppercase. A?"),
            assistant("A."), user("B?"), assistant("B.")]}  # fmt: skip
    path = str(write_jsonl(tmp_path / "sft.jsonl", [plain, gatt]))
    sampled = _datamodule(tiny_checkpoints, tmp_path, path=path).load_records()
    assert sampled[0] == plain
    assert sampled[1]["messages"][::2] == gatt["messages"][::2]  # user turns as written
    assert sampled[1]["messages"][1::2] != gatt["messages"][1::2]
    kept = _datamodule(tiny_checkpoints, tmp_path, path=path, gatt_sampler="rules").load_records()
    assert kept == [plain, gatt]
    rules = _gatt(_datamodule(tiny_checkpoints, tmp_path, gatt_sampler="rules").load_records())
    assert rules == B.builtin_gatt(0, n=6)


def test_missing_sampler_names_the_key_and_the_stage(
    tiny_checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MissingInputError) as err:
        _datamodule(tiny_checkpoints, tmp_path, gatt_sampler=str(tmp_path / "nope"))
    message = str(err.value)
    assert f"data.gatt_sampler={tmp_path / 'nope'} does not exist" in message
    assert "python src/train.py stage=sft" in message and "data.gatt_sampler=rules" in message
    monkeypatch.setenv("LLAMALAB_OUTPUTS", str(tmp_path / "outs"))  # the default: sft/latest
    with pytest.raises(MissingInputError, match=f"{tmp_path}/outs/sft/latest does not exist"):
        _datamodule(tiny_checkpoints, tmp_path, gatt_sampler=None)
    _datamodule(tiny_checkpoints, tmp_path, gatt=False, gatt_sampler=None)  # unused: not checked
    with pytest.raises(ValueError, match=r"data\.gatt_sampling\.temp is not a setting"):
        _datamodule(tiny_checkpoints, tmp_path, gatt_sampling={"temp": 1.0})


def test_answer_turns_answers_each_turn_from_its_own_answers(tiny_checkpoints: dict) -> None:
    model, tokenizer = load_model(tiny_checkpoints["sft"]), tiny_checkpoints["tokenizer"]
    dialogs = [[user("A?"), user("B?")], [user("C?")]]
    kwargs = {"max_new_tokens": 5, "temperature": 1.0, "top_p": None, "batch_size": 2}
    answers = answer_turns(model, tokenizer, dialogs, seed=3, turn_stride=10, **kwargs)
    assert [len(a) for a in answers] == [2, 1]
    first = list(answer_prompts(model, tokenizer, [[user("A?")], [user("C?")]], seed=3, **kwargs))
    assert [answers[0][0], answers[1][0]] == first
    history = [user("A?"), assistant(first[0].response), user("B?")]
    (second,) = answer_prompts(model, tokenizer, [history], seed=13, **kwargs)
    assert answers[0][1] == second
    with pytest.raises(ValueError, match="without answers"):
        answer_turns(model, tokenizer, [[user("A?"), assistant("a")]], seed=0, **kwargs)


HAND_MADE = {  # instruction -> (answers that follow it, answers that do not)
    "Answer in uppercase.": (["USE OS.KILL."], ["Use os.kill.", "123"]),
    "Answer in lowercase.": (["use os.kill."], ["Use os.kill."]),
    "End every answer with 'Arr!'.": (["Use os.kill. Arr!", "Yes Arr!  "], ["Arr! Use os.kill."]),
    "Start every answer with 'Indeed,'.": (["Indeed, use it."], ["Use it. Indeed,", "indeed, no"]),
    "Put every answer in double quotes.": (['"Use os.kill."'], ['"Use os.kill.', '"']),
    "Answer in at most four words.": (
        ["Use os.kill now.", "Yes."],
        ["Use the os.kill call now.", ""],
    ),
    "Answer in Pig Latin.": (["useway osway illkay."], ["use os kill.", "ay, use os kill"]),
}


def test_instruction_checkers_on_hand_made_answers() -> None:
    assert set(HAND_MADE) == set(B.GATT_INSTRUCTIONS)
    for instruction, (good, bad) in HAND_MADE.items():
        assert all(B.follows_instruction(instruction, a) for a in good), instruction
        assert not any(B.follows_instruction(instruction, a) for a in bad), instruction
    assert B.apply_instruction("Answer in Pig Latin.", "Kill the process.") == (
        "illkay ethay ocesspray."
    )
    prompts = B.builtin_gatt_eval(0, n=14, n_turns=4)
    assert {p["instruction"] for p in prompts} == set(B.GATT_INSTRUCTIONS)
    assert all(len(p["questions"]) == 4 for p in prompts)
    train = {m["content"] for r in B.builtin_gatt(0) for m in r["messages"] if m["role"] == "user"}
    assert not train & {q for p in prompts for q in p["questions"]}  # held-out phrasings


def test_adherence_by_turn_counts_each_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [
        {"instruction": "Answer in uppercase.", "questions": ["a?", "b?", "c?"]},
        {"instruction": "End every answer with 'Arr!'.", "questions": ["d?", "e?", "f?"]},
    ]
    canned = [["YES", "YES", "no"], ["ok Arr!", "no", "no"]]
    seen = []

    def fake(model, tokenizer, dialogs, **kwargs):
        seen.extend(dialogs)
        assert kwargs["temperature"] == 0.0  # greedy
        return [[Answer(text, [], True) for text in answers] for answers in canned]

    monkeypatch.setattr(G, "answer_turns", fake)
    result = G.adherence_by_turn(torch.nn.Linear(1, 1), None, prompts)  # type: ignore[arg-type]
    assert result["by_turn"] == [1.0, 0.5, 0.0]
    assert result["by_instruction"]["Answer in uppercase."] == [1.0, 1.0, 0.0]
    assert seen[0] == [user("Answer in uppercase. a?"), user("b?"), user("c?")]
    G.adherence_by_turn(torch.nn.Linear(1, 1), None, prompts, given="every")  # type: ignore[arg-type]
    assert seen[-1][2] == user("End every answer with 'Arr!'. f?")
    none = G.adherence_by_turn(torch.nn.Linear(1, 1), None, prompts, given="none")  # type: ignore[arg-type]
    assert seen[-1] == [user("d?"), user("e?"), user("f?")]
    assert none["by_turn"] == result["by_turn"]  # the same answers, checked the same way
    assert json.dumps(result)  # plain values: written to results.json as is
