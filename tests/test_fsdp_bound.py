"""The Lipschitz bound under FSDP (issue 23, item 5): each block's bound on its owner rank from
its fp32 shards, the rest on rank 0; never the whole model on every rank, and the value of the
unsharded model exactly, also under bf16 mixed precision (2 processes, gloo, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lipnext.bench.ranks import run_ranks

DEPTH = 3


def _worker(rank: int, world: int, port: int, bf16: bool, queue) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lipnext.engine.distributed import DistInfo, lipschitz_bound, shard_model
    from lipnext.models import create_model
    from lipnext.models.lipnext import LipNeXtBlock

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = create_model("lipnext_l4w64", depth=DEPTH, width=32, image_size=8)
        whole = float(model.lipschitz_bound())          # every rank builds the same weights
        rs = [b.R.detach().clone() for b in model.blocks]
        shard_model(model, torch.device("cpu"), bf16=bf16)
        events = {"unshard": 0, "blocks": [], "model_whole": False}
        real_unshard, real_bound = FSDPModule.unshard, LipNeXtBlock.lipschitz_bound

        def unshard(self, *args, **kwargs):
            events["unshard"] += 1
            return real_unshard(self, *args, **kwargs)

        def block_bound(self):
            assert not isinstance(self.R, DTensor) and self.R.dtype == torch.float32
            events["blocks"].append(next(i for i, r in enumerate(rs) if torch.equal(r, self.R)))
            events["model_whole"] |= any(not isinstance(p, DTensor) for p in model.parameters())
            return real_bound(self)

        FSDPModule.unshard, LipNeXtBlock.lipschitz_bound = unshard, block_bound
        try:
            bound = lipschitz_bound(model, DistInfo(rank, world, rank, "fsdp"), torch.device("cpu"))
        finally:
            FSDPModule.unshard, LipNeXtBlock.lipschitz_bound = real_unshard, real_bound
        sharded = all(isinstance(p, DTensor) for p in model.parameters())   # restored after
        queue.put((rank, dict(whole=whole, bound=bound, sharded=sharded, **events)))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("bf16", [False, True])
def test_fsdp_bound_is_computed_on_the_owners_and_equals_the_unsharded_one(bf16):
    res = run_ranks(2, _worker, bf16)
    for r in res.values():
        assert r["bound"] == r["whole"]                  # exactly: fp32 shards, the same arithmetic
        assert r["unshard"] == 0 and not r["model_whole"] and r["sharded"]
    assert sorted(res[0]["blocks"] + res[1]["blocks"]) == list(range(DEPTH))   # each block once
    assert res[0]["blocks"] == [0, 2] and res[1]["blocks"] == [1]             # block k on rank k mod 2
