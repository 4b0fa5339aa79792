"""lm-eval on our model: the chat template of chat exports, parity with lm-eval's `hf` backend, the
built-in tasks, task-name checks and the offline refusal of hub tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import lazy_import
from helpers.rlhf import tiny_config

from llamalab.checkpoint import save_hf
from llamalab.evaluation.benchmarks import check_tasks, task_plan
from llamalab.evaluation.builtin_tasks import (
    ANSWER_TASK,
    MC_TASK,
    judge_answer,
    mc_documents,
    write_builtin_tasks,
)
from llamalab.evaluation.common import EvalError, load_policy, load_reward_model
from llamalab.evaluation.harness import LlamalabLM
from llamalab.evaluation.runner import suite_module
from llamalab.model import Llama

transformers = lazy_import("transformers")
lm_eval_api = lazy_import("lm_eval.api.instance")
lm_eval_hf = lazy_import("lm_eval.models.huggingface")
lm_eval_tasks = lazy_import("lm_eval.tasks")
lm_eval = lazy_import("lm_eval")

DIALOGS = [
    [{"role": "user", "content": "What does os.kill do?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What does os.kill do?"},
        {"role": "assistant", "content": " Send a signal to the process. "},
        {"role": "user", "content": "And  shutil.rmtree?\nPlease answer briefly."},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "How do I kill a child process?"},
        {"role": "assistant", "content": "Use subprocess.Popen.kill."},
        {"role": "user", "content": "thanks"},
    ],
]


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory, small_tok) -> Path:
    """A random tiny chat model exported the way SFT / RS / PPO / DPO export theirs."""
    torch.manual_seed(0)
    model = Llama(tiny_config(small_tok.vocab_size))
    model.init_weights()
    return save_hf(model, small_tok, tmp_path_factory.mktemp("chat") / "export", chat=True)


def test_chat_template_formats_dialogs_like_encode_dialog(chat_export, small_tok, tmp_path):
    hf_tok = transformers.AutoTokenizer.from_pretrained(chat_export)
    lm = LlamalabLM(pretrained=str(chat_export))
    for dialog in DIALOGS:
        ours = small_tok.encode_dialog(dialog)
        text = hf_tok.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours
        assert lm.apply_chat_template(dialog) == text  # what lm-eval feeds our LM
        assert lm.tok_encode(text) == ours
    finished = [*DIALOGS[1][:3]]
    text = hf_tok.apply_chat_template(finished, tokenize=False)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == small_tok.encode_dialog(finished)
    with pytest.raises(Exception, match="special tag"):
        hf_tok.apply_chat_template([{"role": "user", "content": "[INST] hi"}], tokenize=False)
    model = Llama(tiny_config(small_tok.vocab_size))
    plain = save_hf(model, small_tok, tmp_path / "pretrained")  # a pretrained model: no template
    assert "chat_template" not in json.loads((plain / "tokenizer_config.json").read_text())


def _instances(kind: str, args_list: list[tuple]) -> list:
    return [lm_eval_api.Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


def test_requests_match_the_hf_backend(chat_export):
    ours = LlamalabLM(pretrained=str(chat_export), batch_size=3)
    theirs = lm_eval_hf.HFLM(pretrained=str(chat_export), batch_size=3, device="cpu")
    docs = mc_documents()[:4]
    pairs = [
        (f"Which object does this docstring describe?\n{d['docstring']}\nAnswer:", f" {c}")
        for d in docs
        for c in d["choices"]
    ]
    pairs += [
        ("", "hello world"),
        ("a b c ", "d e"),
        (ours.apply_chat_template(DIALOGS[1]), " Use shutil.rmtree."),
    ]
    a = ours.loglikelihood(_instances("loglikelihood", pairs))
    b = theirs.loglikelihood(_instances("loglikelihood", pairs))
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)) <= 1e-4
    assert [x[1] for x in a] == [y[1] for y in b]
    ours.bos_in_rolling = True  # the hf backend's convention (scores its extra BOS too)
    text = [("some text to score, long enough for two windows. " * 12,)]
    rolling_a = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", text))
    rolling_b = theirs.loglikelihood_rolling(_instances("loglikelihood_rolling", text))
    assert abs(rolling_a[0] - rolling_b[0]) <= 1e-3

    # Greedy generations: the same token ids (a random model emits lone UTF-8 byte pieces, which
    # SentencePiece and transformers decode to different runs of U+FFFD, so ids are compared;
    # the stop string never occurs, the stop on text is the same code, lm-eval's).
    def ids_text(tokens, **kwargs):
        if isinstance(tokens, int):  # the hf backend's EOS stop string
            return "</s>"
        return " ".join(str(t) for t in tokens if t > 2)

    for lm in (ours, theirs):
        lm.tok_decode = ids_text
    gen = [("What does os.kill do?", {"until": ["@@@"], "max_gen_toks": 10, "do_sample": False})]
    gen += [("Tell me about shutil.rmtree.", {"until": ["@@@"], "max_gen_toks": 6})]
    got = ours.generate_until(_instances("generate_until", gen))
    assert got == theirs.generate_until(_instances("generate_until", gen))
    assert all(len(text.split()) >= 5 for text in got)


def test_builtin_mc_accuracy_matches_the_hf_backend(chat_export, tmp_path):
    folder = write_builtin_tasks(tmp_path / "tasks")
    manager = lm_eval_tasks.TaskManager(include_path=str(folder), include_defaults=False)
    accuracy = []
    for lm in (
        LlamalabLM(pretrained=str(chat_export), batch_size=8),
        lm_eval_hf.HFLM(pretrained=str(chat_export), batch_size=8, device="cpu"),
    ):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[MC_TASK], limit=24, task_manager=manager, log_samples=False
        )
        accuracy.append(out["results"][MC_TASK]["acc,none"])
    assert accuracy[0] == accuracy[1]
    assert set(manager.all_tasks) >= {MC_TASK, ANSWER_TASK}


def test_answer_task_is_scored_by_the_builtin_judge():
    doc = {"kind": "safe", "reference": "Send a signal to the process."}
    assert judge_answer(doc, "Send a signal to the process.") == {
        "helpful": 1.0,
        "f1": 1.0,
        "exact_match": 1.0,
    }
    assert judge_answer(doc, "I can't help with that.")["helpful"] == 0.0  # a false refusal
    docs = mc_documents()
    assert all(d["choices"][d["answer"]] != d["choices"][d["answer"] - 1] for d in docs)


def test_unknown_task_names_the_closest_matches():
    with pytest.raises(EvalError, match=r"'arc_easyy'; closest: arc_easy"):
        check_tasks(["arc_easy", "arc_easyy"], ["arc_easy", "arc_challenge", "hellaswag"])


def test_unknown_suite_names_the_closest():
    with pytest.raises(EvalError, match=r"eval.suite='safty' is not a suite \(closest: safety\)"):
        suite_module("safty")


def test_judge_and_policy_checks(tiny_checkpoints, tmp_path):
    with pytest.raises(EvalError, match="is a language model, not a reward model"):
        load_reward_model(tiny_checkpoints["sft"], what="eval.judge_safety")
    with pytest.raises(EvalError, match=r"is a reward model .* not a language model"):
        load_policy(tiny_checkpoints["rm"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    with pytest.raises(EvalError, match=r"ckpt=.*notes is not a model"):
        load_policy(tmp_path / "notes")


@pytest.mark.slow
@pytest.mark.experiment  # builds lm-eval's whole task index: make test-experiments
def test_llama2_benchmark_tasks_are_registry_names():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "eval" / "llama2_benchmarks.yaml")
    names = [n for tasks in task_plan(cfg).values() for n in tasks]
    assert len(names) == 19
    check_tasks(names, lm_eval_tasks.TaskManager().all_tasks)  # the full index: about 20 s
