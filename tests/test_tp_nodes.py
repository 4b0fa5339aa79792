"""The tensor-parallel rollout engine on 4 CPU processes as 2 "nodes" of 2 (gloo), the copy
built from FSDP2 shards: each TP group (ranks 0-1, ranks 2-3) builds its own copy from the
model sharded over all 4 ranks, shares its ranks' prompts inside the group only, and every rank
gets back exactly what the whole model generates greedily for its own prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_tensor_parallel import CONFIG, NEW, _free_port, _model
from torch.distributed.device_mesh import init_device_mesh

from llamalab.generation import sample_responses
from llamalab.scale.build import shard_fsdp
from llamalab.scale.rollout_engine import RolloutEngine
from llamalab.scale.tensor_parallel import resident_bytes

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD, TP = 4, 2
# each rank's own prompts: ragged, so every group left-pads rows of different lengths
MINE = [[[1, 5, 9, 11, 3]], [[1, 7], [1, 2]], [[1, 4, 4, 8]], [[1, 6, 2], [1, 3, 3, 3, 9]]]
COMMON = dict(max_new_tokens=NEW, temperature=0.0, top_p=None, eos_id=None, pad_id=0, chunk_size=4)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    model = shard_fsdp(_model(), init_device_mesh("cpu", (WORLD,)))
    engine = RolloutEngine("tensor_parallel", tp_size=TP)
    got = engine.sample(model, None, MINE[rank], seed_of=lambda r: 7 + r, version=0,
                        keep=True, mode="fsdp", **COMMON)  # fmt: skip
    result = {"got": got, "bytes": resident_bytes(engine.copy), "tp_rank": engine.copy.tp_rank}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_nodes_of_two_generate_what_the_whole_model_does(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    whole = _model()
    for rank, result in enumerate(results):
        ref = sample_responses(whole, MINE[rank], seed=0, **COMMON)
        assert result["got"].tokens == ref.tokens, f"rank {rank}"
        for a, b in zip(result["got"].logprobs, ref.logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    assert [r["tp_rank"] for r in results] == [0, 1, 0, 1]  # two groups of two
    assert {r["bytes"] for r in results} == {results[0]["bytes"]}
    assert results[0]["bytes"] < CONFIG.num_params("lm") * 4  # each holds a split copy
