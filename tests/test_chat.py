"""Chat and batch generation: streaming matches `generate`, dialogs follow Meta's format, and the
`src/chat.py` / `src/generate.py` commands work on a saved model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from helpers import run_train

from llamalab.chat import (
    ChatError,
    ChatSession,
    IncrementalDecoder,
    Sampling,
    answer_prompts,
    default_model_path,
    find_tokenizer,
    fit_dialog,
    load_chat_model,
    read_prompts,
    run_chat,
    stream_tokens,
)
from llamalab.checkpoint import save_hf
from llamalab.data.errors import DataError
from llamalab.generation import generate
from llamalab.model import Llama, LlamaConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(small_tok):  # type: ignore[no-untyped-def]
    return small_tok


@pytest.fixture(scope="module")
def model(tok) -> Llama:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = LlamaConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
        max_seq_len=96,
    )  # fmt: skip
    return Llama.from_config(config).eval()


@pytest.fixture(scope="module")
def export(model, tok, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A run directory (`<run>/export/` with weights + tokenizer), as a stage leaves it."""
    run = tmp_path_factory.mktemp("outs") / "sft" / "run1"
    save_hf(model, tok, run / "export")
    (run.parent / "latest").symlink_to("run1")
    return run / "export"


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class _ConstantHead(torch.nn.Module):
    def __init__(self, vocab: int, token: int) -> None:
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        logits[..., self.token] = 10.0
        return logits


# ------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stream_matches_generate(model, tok, temperature: float) -> None:
    prompt = tok.encode_dialog(_user("What does json.dumps do?"))
    batch = generate(model, [prompt], 12, temperature=temperature, top_p=0.9, seed=7)
    generator = torch.Generator().manual_seed(7)
    streamed = list(stream_tokens(model, prompt, 12, temperature, 0.9, None, generator))
    assert streamed == batch.tokens[0]


def test_stream_stops_after_eos(model, tok) -> None:
    head, model.output = model.output, _ConstantHead(tok.vocab_size, tok.eos_id)
    try:
        assert list(stream_tokens(model, [tok.bos_id, 5], 10, eos_id=tok.eos_id)) == [tok.eos_id]
    finally:
        model.output = head


def test_incremental_decoder_rebuilds_the_text(tok) -> None:
    text = "Naïve café: json.dumps(obj) → str, 42 times — ok"
    ids = [*tok.encode(text), tok.eos_id]
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids[:-1]) == decoder.text
    decoder = IncrementalDecoder(tok)
    shown = [decoder.push(t) for t in tok.encode("Done. ")]  # the answer's trailing space
    assert "".join(shown) == "Done." and decoder.text == tok.decode(tok.encode("Done. "))
    assert all("\ufffd" not in p for p in pieces)  # split multi-byte characters were held back


# ------------------------------------------------------------------------------ dialogs
def test_session_keeps_the_dialog_in_meta_format(model, tok) -> None:
    session = ChatSession(model, tok, system="Be brief.", sampling=Sampling(0.0, 0.9, 6))
    first = session.reply("Hello")
    ids, _ = session.prompt_ids("And json?")
    expected = tok.encode_dialog(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And json?"},
        ]
    )
    assert ids == expected
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_fit_dialog_drops_oldest_turns_keeps_system(tok) -> None:
    messages = [{"role": "system", "content": "S"}]
    for i in range(4):
        messages += [
            {"role": "user", "content": f"question number {i}"},
            {"role": "assistant", "content": f"answer number {i}"},
        ]
    messages.append({"role": "user", "content": "last"})
    keep = [messages[0], *messages[-3:]]  # system + last pair + final user turn
    budget = len(tok.encode_dialog(keep))
    assert fit_dialog(tok, messages, budget) == tok.encode_dialog(keep)
    assert fit_dialog(tok, messages, 10_000) == tok.encode_dialog(messages)
    assert len(fit_dialog(tok, _user("word " * 200), 16)) == 16


def test_run_chat_piped_answers_each_line(model, tok) -> None:
    session = ChatSession(model, tok, sampling=Sampling(0.0, 0.9, 5))
    out = io.StringIO()
    assert run_chat(session, ["first\n", "\n", "second\n"], out, interactive=False) == 0
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert out.getvalue().endswith("\n")


def test_run_chat_reports_refused_turn(model, tok, capsys) -> None:
    session = ChatSession(model, tok, sampling=Sampling(0.0, 0.9, 3))
    status = run_chat(session, ["[INST] sneaky\n", "fine\n"], io.StringIO(), interactive=False)
    assert status == 1 and "[INST]" in capsys.readouterr().err
    assert [m["content"] for m in session.messages][:1] == ["fine"]


def test_run_chat_interactive_commands(model, tok) -> None:
    session = ChatSession(model, tok, sampling=Sampling(0.0, 0.9, 3))
    out = io.StringIO()
    run_chat(session, ["hi", "/reset", "/exit", "never read"], out, interactive=True)
    assert session.messages == [] and "dialog cleared" in out.getvalue()


# ------------------------------------------------------------------------------ loading
def test_default_model_prefers_sft_then_pretrain(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--model"):
        default_model_path(tmp_path)
    (tmp_path / "pretrain" / "latest").mkdir(parents=True)
    assert default_model_path(tmp_path) == tmp_path / "pretrain" / "latest"
    (tmp_path / "sft" / "latest").mkdir(parents=True)
    assert default_model_path(tmp_path) == tmp_path / "sft" / "latest"


def test_find_tokenizer_next_to_any_checkpoint(export: Path, tmp_path: Path) -> None:
    run = export.parent
    assert find_tokenizer(export) == export / "tokenizer.model"
    assert find_tokenizer(run) == export / "tokenizer.model"
    (run / "checkpoints").mkdir(exist_ok=True)
    assert find_tokenizer(run / "checkpoints" / "last.ckpt") == export / "tokenizer.model"
    with pytest.raises(ChatError, match="--tokenizer"):
        find_tokenizer(tmp_path)


def test_load_chat_model_refuses_a_foreign_tokenizer(export: Path, tmp_path: Path) -> None:
    from llamalab.tokenizer import Tokenizer

    other = Tokenizer.train(["some other text to learn from"] * 50, tmp_path / "o.model", 300)
    with pytest.raises(ChatError, match="300 pieces"):
        load_chat_model(export, other.model_path)
    model, tokenizer = load_chat_model(export.parent.parent / "latest")
    assert not model.training and tokenizer.vocab_size == model.config.vocab_size


# ------------------------------------------------------------------------------ prompt files
def test_read_prompts_formats(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    rows = [{"prompt": "one"}, {"prompt": [*_user("two"), {"role": "assistant", "content": "a"},
            *_user("three")]}]  # fmt: skip
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = read_prompts(jsonl, system="Be brief.")
    assert prompts[0] == ("one", [{"role": "system", "content": "Be brief."}, *_user("one")])
    assert prompts[1][0] == rows[1]["prompt"] and prompts[1][1][0]["role"] == "system"
    text = tmp_path / "p.txt"
    text.write_text("alpha\n\nbeta\n")
    assert read_prompts(text) == [("alpha", _user("alpha")), ("beta", _user("beta"))]
    jsonl.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=f"{jsonl}:2"):
        read_prompts(jsonl)


def test_answer_prompts_batches_like_single_streams(model, tok) -> None:
    prompts = [_user("a short one"), _user("a somewhat longer question here"), _user("x")]
    sampling = Sampling(0.0, 0.9, 6)
    answers = list(answer_prompts(model, tok, prompts, sampling, batch_size=2))
    for messages, answer in zip(prompts, answers):
        streamed = list(
            stream_tokens(model, tok.encode_dialog(messages), 6, 0.0, eos_id=tok.eos_id)
        )
        assert answer["tokens"] == streamed
        assert answer["finished"] == (streamed[-1] == tok.eos_id)
    with pytest.raises(ChatError, match="--raw"):
        list(
            answer_prompts(
                model, tok, [[{"role": "system", "content": "s"}, *_user("u")]], sampling, raw=True
            )
        )


# ------------------------------------------------------------------------------ commands
def _run(script: str, args: list[str], stdin: str = "", env: dict | None = None):  # type: ignore[no-untyped-def]
    return run_train(args, None, timeout=300, env=env, script=REPO / "src" / script, stdin=stdin)


@pytest.mark.integration
def test_chat_command_with_piped_stdin(export: Path) -> None:
    root = export.parent.parent.parent  # outputs root: <root>/sft/latest -> run1
    result = _run(
        "chat.py",
        ["--max-new-tokens", "8", "--seed", "0"],
        "What does json.dumps do?\n",
        {"LLAMALAB_OUTPUTS": str(root)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.integration
def test_chat_command_missing_model(tmp_path: Path) -> None:
    result = _run("chat.py", ["--model", str(tmp_path / "nope")], "hi\n")
    assert result.returncode == 1 and "error:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_generate_command_writes_one_record_per_prompt(export: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "three"}\n')
    out = tmp_path / "out" / "answers.jsonl"
    args = ["--prompts", str(prompts), "--out", str(out), "--model", str(export)]
    result = _run("generate.py", [*args, "--batch-size", "2", "--max-new-tokens", "5"])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["one", "two", "three"]
    for r in records:
        assert set(r) == {"prompt", "response", "tokens", "finished"}
        assert 1 <= len(r["tokens"]) <= 5 and isinstance(r["finished"], bool)


@pytest.mark.integration
@pytest.mark.slow
def test_generate_command_compiled_gives_the_eager_greedy_answers(
    export: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What does json.dumps do?"}\n{"prompt": "Explain os.abort."}\n')
    answers = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / f"{mode}.jsonl"
        args = ["--prompts", str(prompts), "--out", str(out), "--model", str(export)]
        args += ["--temperature", "0", "--max-new-tokens", "6"]
        result = _run("generate.py", [*args, *(["--compile"] if mode == "compiled" else [])])
        assert result.returncode == 0, result.stderr
        answers[mode] = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]
    assert answers["compiled"] == answers["eager"]
