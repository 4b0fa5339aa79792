"""Rejection-sampling fine-tuning: choosing the best of K, pooling iterations, the SFT batches of
the chosen answers, and a short run through ``src/train.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_train
from helpers.rlhf import read_metrics, series

from llamalab.checkpoint import load_model
from llamalab.rlhf import IGNORE_INDEX
from llamalab.stages.rejection_sampling import (
    SAMPLES_FILE,
    best_of_k,
    pad_share,
    pick_best,
    pool_best,
    read_pool,
)
from llamalab.stages.rejection_sampling_data import RejectionSamplingDataModule


@pytest.fixture(scope="module")
def world(tiny_checkpoints: dict) -> dict[str, object]:
    return tiny_checkpoints


def dialog(user: str, answer: str, reward: float) -> dict[str, object]:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "reward": reward}


def test_pick_best_prefers_finished_then_highest_reward() -> None:
    rewards = torch.tensor([[0.2, 0.9, 0.5], [0.9, 0.1, 0.3], [0.4, 0.4, 0.1]])
    finished = torch.tensor([[True, True, True], [False, True, True], [False, False, False]])
    assert pick_best(rewards, finished).tolist() == [1, 2, 0]  # first of equals on a tie


def test_shares_are_padded_to_equal_chunk_counts_and_cover_every_prompt_once() -> None:
    """Sharded sampling and scoring are collectives: every rank gets a share of one length
    (padded with copies of the first prompt), and the real parts cover every prompt once."""
    items = [{"index": i} for i in range(7)]
    for world in (1, 2, 3, 4, 8):
        shares = [pad_share(items, rank, world) for rank in range(world)]
        assert len({len(share) for share, _ in shares}) == 1  # the same chunks on every rank
        real = sorted(item["index"] for share, n in shares for item in share[:n])
        assert real == list(range(7))
        assert all(item == items[0] for share, n in shares for item in share[n:])
    assert pad_share(items, 7, 8) == ([items[0]], 0)  # a rank with no prompt still runs one


def test_pool_keeps_the_best_answer_per_prompt_over_iterations(tmp_path: Path) -> None:
    earlier = [dialog("q1", "old good", 0.9), dialog("q2", "old bad", 0.1)]
    (tmp_path / SAMPLES_FILE).write_text("".join(json.dumps(d) + "\n" for d in earlier))
    now = [dialog("q1", "new", 0.5), dialog("q2", "new better", 0.6), dialog("q3", "only", 0.2)]
    pooled = pool_best(now + read_pool([str(tmp_path)]))
    answers = {d["messages"][0]["content"]: d["messages"][1]["content"] for d in pooled}
    assert answers == {"q1": "old good", "q2": "new better", "q3": "only"}


def test_pool_from_a_run_without_samples_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pool_from.*best_samples.jsonl"):
        read_pool([str(tmp_path)])


def test_best_of_k_returns_the_highest_scored_answer(world: dict[str, object]) -> None:
    tokenizer = world["tokenizer"]
    policy, rm = load_model(world["sft"]), load_model(world["rm"])
    items = [
        {
            "prompt_ids": tokenizer.encode_dialog([{"role": "user", "content": q}]),
            "is_safety": False,
            "index": i,
        }
        for i, q in enumerate(["What does len do?", "Tell me about os.path.join."])
    ]
    common = dict(
        temperature=1.2,
        top_p=None,
        max_new_tokens=6,
        generation_batch=8,
        seed=0,
        safety_threshold=0.15,
    )
    chosen = best_of_k(policy, rm, rm, items, tokenizer, num_samples=4, **common)
    single = best_of_k(policy, rm, rm, items, tokenizer, num_samples=1, **common)
    assert [c["index"] for c in chosen] == [0, 1]
    for c in chosen:
        assert c["reward"] >= c["mean_reward"] - 1e-6
        assert c["reward"] == pytest.approx(c["helpful"])  # safe prompts: Rc = helpfulness
    for c in single:
        assert c["reward"] == pytest.approx(c["mean_reward"])  # K = 1: nothing to choose


def test_chosen_dialogs_become_sft_batches(world: dict[str, object]) -> None:
    tokenizer = world["tokenizer"]
    data = RejectionSamplingDataModule(
        tokenizer=tokenizer, seq_len=128, batch_size=2, seed=0, builtin_size=8, builtin_val_size=4
    )
    with pytest.raises(RuntimeError, match="choose its answers"):
        data.train_dataloader()
    dialogs = [
        dialog(f"What does function number {i} do?", f"It returns {i}.", 0.5) for i in range(5)
    ]
    summary = data.set_dialogs(dialogs)
    assert summary["dialogs"] == 5 and summary["dropped"] == 0
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[1] == 128 and "segment_ids" in batch
    labelled = batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()
    text = tokenizer.decode([t for t in labelled if t != tokenizer.eos_id])
    assert "It returns" in text and "function number" not in text  # answers only
    assert len(data.prompt_items("train")) == 8


@pytest.mark.integration
@pytest.mark.slow
def test_a_short_run_samples_chooses_and_fine_tunes(
    world: dict[str, object], tmp_path: Path, cache_dir: Path
) -> None:
    out = tmp_path / "run"
    result = run_train(
        [
            "stage=rejection_sampling",
            "logger=none",
            "callbacks=none",
            "plan.check=false",
            f"paths.output_dir={out}",
            f"paths.outputs_root={tmp_path / 'outs'}",
            f"stage.init={world['sft']}",
            f"stage.reward_helpful={world['rm']}",
            f"stage.reward_safety={world['rm']}",
            "stage.num_samples=3",
            "stage.max_prompts=12",
            "stage.max_new_tokens=8",
            "stage.batch_size=4",
            "data.batch_size=4",
            "stage.epochs=1",
            "trainer.limit_val_batches=2",
        ],
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / SAMPLES_FILE).read_text().splitlines()
    assert len(lines) == 12
    first = json.loads(lines[0])
    assert first["messages"][-1]["role"] == "assistant" and 0.0 < first["reward"] < 1.0
    rows = read_metrics(out)
    assert series(rows, "rs/best_reward")[0] >= series(rows, "rs/mean_reward")[0]
    assert series(rows, "train/loss") and series(rows, "eval/ground_truth")
    assert (out / "export" / "config.json").is_file()
