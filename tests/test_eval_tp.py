"""lm-eval on a tensor-parallel copy (`eval.tp_size`): on 2 CPU processes (gloo) at TP 2 our LM
gives the single-process model's per-request log-likelihoods (within 1e-5) and greedy answers,
both ranks form one lm-eval rank, and the copy read slice by slice from the export equals the
one split from the whole loaded model; a TP size that does not split the model or the world
stops before any weight is read."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lm_eval.api.instance import Instance

from llamalab.checkpoint import save_hf
from llamalab.evaluation.builtin_tasks import mc_documents
from llamalab.evaluation.common import load_policy
from llamalab.evaluation.harness import LlamalabLM
from llamalab.model import Llama, LlamaConfig
from llamalab.scale.tensor_parallel import TPError, build_tp_copy, load_tp_copy

pytestmark = [pytest.mark.distributed]

GEN = [
    ("What does os.kill do?", {"until": ["@@@"], "max_gen_toks": 8, "do_sample": False}),
    ("Tell me about shutil.rmtree.", {"until": ["@@@"], "max_gen_toks": 8}),
    ("hi", {"until": ["@@@"], "max_gen_toks": 8}),
]


def _pairs() -> list[tuple[str, str]]:
    """Built-in multiple-choice requests (every choice of 2 documents) and two edge cases."""
    pairs = [
        (f"Which object does this docstring describe?\n{d['docstring']}\nAnswer:", f" {c}")
        for d in mc_documents()[:2]
        for c in d["choices"]
    ]
    return [*pairs, ("", "hello world"), ("a b c ", "d e")]


def _instances(kind: str, args_list: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


def _requests(lm: LlamalabLM) -> dict:
    return {
        "loglik": lm.loglikelihood(_instances("loglikelihood", _pairs())),
        "generated": lm.generate_until(_instances("generate_until", GEN)),
        "lm_rank": (lm.rank, lm.world_size),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, export: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    lm = LlamalabLM(pretrained=export, batch_size=3, device="cpu", tp_size=2)
    result = _requests(lm)
    # the slice loader's copy equals the copy split from the whole loaded model
    whole, _ = load_policy(export, "cpu")
    split = build_tp_copy(whole, "none", 2, rank, None).state_dict()
    read = load_tp_copy(export, 2, rank, None).state_dict()
    result["same_keys"] = split.keys() == read.keys() == lm.model.state_dict().keys()
    result["equal"] = all(torch.equal(split[k], read[k]) for k in split)
    result["sliced"] = (
        read["layers.0.attention.wk.weight"].shape[0] * 2
        == (whole.layers[0].attention.wk.weight.shape[0])
    )
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, small_tok) -> Path:
    """A random GQA model (4 query heads on 2 KV heads) exported as SFT exports its model."""
    torch.manual_seed(0)
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         vocab_size=small_tok.vocab_size, multiple_of=32, max_seq_len=256)  # fmt: skip
    model = Llama(config)
    model.init_weights()
    return save_hf(model, small_tok, tmp_path_factory.mktemp("tp_eval") / "export", chat=True)


def test_tp2_requests_equal_the_single_process_model(export: Path, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(export), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = _requests(LlamalabLM(pretrained=str(export), batch_size=3, device="cpu"))
    for got in results:
        assert got["lm_rank"] == (0, 1)  # the group is one lm-eval rank of a world of one
        # within 1e-5 plus 4 fp32 ulps of the summed values (about -80: one ulp is 7.6e-6;
        # the row-parallel partial sums round differently from the whole matmul)
        torch.testing.assert_close(
            torch.tensor([a[0] for a in got["loglik"]], dtype=torch.float64),
            torch.tensor([b[0] for b in ref["loglik"]], dtype=torch.float64),
            rtol=5e-7,
            atol=1e-5,
        )
        assert [a[1] for a in got["loglik"]] == [b[1] for b in ref["loglik"]]
        assert got["generated"] == ref["generated"]
        assert got["same_keys"] and got["equal"] and got["sliced"]
    assert any(text.strip() for text in ref["generated"])


def test_a_tp_size_that_does_not_split_stops_before_loading(export: Path, tmp_path: Path) -> None:
    with pytest.raises(TPError) as err:
        LlamalabLM(pretrained=str(export), tp_size=3)
    message = str(err.value)
    assert message.startswith("eval.tp_size: n_heads (4) is not divisible by the TP size 3")
    assert "the world size (1) is not divisible by the TP size 3" in message
    assert "torchrun --nproc-per-node=N" in message
