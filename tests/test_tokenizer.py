"""Tokenizer: LLaMA's training settings, lossless encoding, and Meta's chat format token for token."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from llamalab.data.stdlib_docs import all_documents
from llamalab.tokenizer import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    DialogError,
    Tokenizer,
    training_sentences,
)


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The built-in-size tokenizer (4096 pieces, full stdlib corpus: about 0.3 s to train)."""
    return Tokenizer.train(all_documents(), tmp_path_factory.mktemp("tok") / "t.model", 4096)


def meta_encode(model_path: Path, text: str, bos: bool, eos: bool) -> list[int]:
    """What Meta's llama/tokenizer.py ``Tokenizer.encode`` returns (raw SentencePiece + 1/2)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    return [sp.bos_id()] * bos + sp.encode(text) + [sp.eos_id()] * eos


def test_training_settings_are_llamas(tok: Tokenizer) -> None:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.model_path.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == model_pb2.TrainerSpec.BPE
    assert spec.split_digits and spec.byte_fallback and spec.allow_whitespace_only_pieces
    assert spec.character_coverage == pytest.approx(0.99995)
    assert spec.max_sentencepiece_length == 16
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert norm.name == "identity" and norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert len(proto.pieces) == tok.vocab_size == 4096


def test_special_ids_and_pad_choice(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.pad_id != tok.eos_id
    assert tok.encode("x", bos=True, eos=True) == [1, *tok.encode("x"), 2]
    ids = tok.encode("pad me")
    assert tok.decode([*ids, tok.pad_id, -100, tok.pad_id]) == "pad me"


def test_digits_split_and_byte_fallback(tok: Tokenizer) -> None:
    pieces = [tok.id_to_piece(i) for i in tok.encode("x 2024")]
    assert pieces[-4:] == ["2", "0", "2", "4"]
    llama = "\U0001f999"  # not in the corpus: UTF-8 F0 9F A6 99 as four byte pieces
    pieces = [tok.id_to_piece(i) for i in tok.encode(llama)]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert tok.pad_id not in tok.encode(llama)
    assert tok.decode(tok.encode(f"a {llama} b")) == f"a {llama} b"


def test_whitespace_is_preserved(tok: Tokenizer) -> None:
    for text in ["the answer ", "two  spaces", "tab\tand\nnewline", "  leading", "trailing  \n"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.id_to_piece(tok.encode("the answer ")[-1]) == "▁"  # Meta's trailing space survives


def test_training_is_deterministic_and_atomic(tmp_path: Path) -> None:
    docs = all_documents()[:300]
    a = Tokenizer.train(docs, tmp_path / "a.model", 400)
    b = Tokenizer.train(docs, tmp_path / "b.model", 400)
    assert a.model_path.read_bytes() == b.model_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp left


def test_training_refuses_impossible_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100000"):
        Tokenizer.train(all_documents()[:300], tmp_path / "x.model", 100_000)
    assert not (tmp_path / "x.model").exists()


def test_training_sentences_split_lines_and_chunk_long_ones() -> None:
    sentences = list(training_sentences(["a\n\nb  \n" + "é" * 50], max_sentence_bytes=40))
    assert sentences[:2] == ["a", "b  "]
    assert "".join(sentences[2:]) == "é" * 50
    assert all(len(s.encode()) <= 40 for s in sentences)


# ------------------------------------------------------------------ chat format
def test_single_turn_matches_meta(tok: Tokenizer) -> None:
    dialog = [{"role": "user", "content": "  What does json.dumps do? "}]
    expected = meta_encode(
        tok.model_path, f"{B_INST} What does json.dumps do? {E_INST}", True, False
    )
    assert tok.encode_dialog(dialog) == expected


def test_system_prompt_matches_meta(tok: Tokenizer) -> None:
    dialog = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a module."},
    ]
    user = B_SYS + "Answer briefly." + E_SYS + "Name a module."
    expected = meta_encode(tok.model_path, f"{B_INST} {user.strip()} {E_INST}", True, False)
    assert tok.encode_dialog(dialog) == expected


def test_multi_turn_matches_meta(tok: Tokenizer) -> None:
    dialog = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "What is os.sep?"},
        {"role": "assistant", "content": " The path separator. "},
        {"role": "user", "content": "And os.linesep?"},
        {"role": "assistant", "content": "The line separator."},
        {"role": "user", "content": "Thanks"},
    ]
    first_user = B_SYS + "Be exact." + E_SYS + "What is os.sep?"
    m = tok.model_path
    expected = (
        meta_encode(m, f"{B_INST} {first_user} {E_INST} The path separator. ", True, True)
        + meta_encode(m, f"{B_INST} And os.linesep? {E_INST} The line separator. ", True, True)
        + meta_encode(m, f"{B_INST} Thanks {E_INST}", True, False)
    )
    assert tok.encode_dialog(dialog) == expected


def test_dialog_ending_with_assistant_closes_the_pair(tok: Tokenizer) -> None:
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    expected = meta_encode(tok.model_path, f"{B_INST} Hi {E_INST} Hello. ", True, True)
    assert tok.encode_dialog(dialog) == expected
    assert expected[-1] == tok.eos_id


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_special_tags_are_refused_in_any_role(tok: Tokenizer, tag: str, index: int) -> None:
    dialog = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "answer"},
    ]
    dialog[index]["content"] += f" {tag} sneaky"
    with pytest.raises(DialogError, match=f"message {index} .*{re.escape(repr(tag))}"):
        tok.encode_dialog(dialog)


@pytest.mark.parametrize(
    ("dialog", "message"),
    [
        ([], "empty dialog"),
        ([{"role": "system", "content": "s"}], "no user message"),
        ([{"role": "assistant", "content": "a"}], "message 0 has role 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
        (
            [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
            "message 1 has role 'assistant', expected 'user'",
        ),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "message 1"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"content": "x"}], "message 0 has no 'role' key"),
        ([{"role": "user"}], "message 0 has no 'content' key"),
        ([{"role": "user", "content": 3}], "not a str"),
        ("hello", "list of messages"),
    ],
)
def test_malformed_dialogs_raise(tok: Tokenizer, dialog: object, message: str) -> None:
    with pytest.raises(DialogError, match=message):
        tok.encode_dialog(dialog)  # type: ignore[arg-type]


def test_mask_marks_exactly_answers_and_their_eos(tok: Tokenizer) -> None:
    dialog = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "What is os.sep?"},
        {"role": "assistant", "content": "The path separator."},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4, \U0001f999"},
        {"role": "user", "content": "Bye"},
    ]
    ids, mask = tok.encode_dialog_with_mask(dialog)
    assert ids == tok.encode_dialog(dialog) and len(mask) == len(ids)
    # Expected mask from the pieces of each pair: prompt part False, the rest (answer, trailing
    # space piece, EOS) True, final generation prompt False.
    m = tok.model_path
    expected: list[bool] = []
    for user, answer in [
        (B_SYS + "Be exact." + E_SYS + "What is os.sep?", "The path separator."),
        ("And 2+2?", "4, \U0001f999"),
    ]:
        prompt = meta_encode(m, f"{B_INST} {user} {E_INST}", True, False)
        pair = meta_encode(m, f"{B_INST} {user} {E_INST} {answer} ", True, True)
        assert pair[: len(prompt)] == prompt
        expected += [False] * len(prompt) + [True] * (len(pair) - len(prompt))
    expected += [False] * len(meta_encode(m, f"{B_INST} Bye {E_INST}", True, False))
    assert mask == expected
    # Each run of True decodes to its answer (plus the trailing space) and ends with EOS.
    runs, current = [], []
    for token, keep in zip(ids, mask):
        if keep:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    assert [run[-1] for run in runs] == [tok.eos_id, tok.eos_id]
    assert [tok.decode(run[:-1]) for run in runs] == ["The path separator. ", "4, \U0001f999 "]
    assert sum(token == tok.eos_id for token, keep in zip(ids, mask) if not keep) == 0


@pytest.mark.skipif(
    importlib.util.find_spec("mistral_common") is None, reason="mistral-common is not installed"
)
def test_real_32000_piece_llama_style_model() -> None:
    """A real LLaMA-style 32000-piece model (ENV.md) loads and follows Meta's format."""
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.submodule_search_locations
    model = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not model.is_file():
        pytest.skip("this mistral-common has no tokenizer.model.v1")
    tok = Tokenizer(model)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.encode_dialog(dialog) == meta_encode(model, "[INST] Hi [/INST] Hello! ", True, True)
    assert tok.decode(tok.encode("x 2024 \U0001f999")) == "x 2024 \U0001f999"
