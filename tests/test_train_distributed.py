"""DDP (owner-sharded orthogonal updates) and FSDP: 2 and 3 processes on CPU (gloo, launched by
torchrun) give the result of 1 process on the same global batch; only rank 0 writes;
checkpoints hold the unsharded layout and resume exactly under any strategy."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lipnext.config import load_config
from lipnext.engine import read_metrics, train
from lipnext.models import create_model
from lipnext.optim import ShardedManifoldAdam

ARGS = ["data.name=digits", "model.name=lipnext_l4w64",
        "model.kwargs={depth: 2, width: 32, patch_size: 2}", "augment.crop_padding=1",
        "train.batch_size=120", "train.epochs=1", "optim.warmup_epochs=0.5", "optim.lookahead_k=3",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.eval_every=0",
        "certify.radii=[36]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "lipnext.cli", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"])


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The single-process reference run, with a checkpoint at step 5 of 10."""
    run = tmp_path_factory.mktemp("one") / "run"
    train(load_config(None, ARGS + [f"run_dir={run}", "dist.strategy=none",
                                    "train.checkpoint_every_steps=5"]))
    return run


def _assert_matches(one: Path, two: Path, proc: subprocess.CompletedProcess) -> None:
    assert len([r for r in read_metrics(two / "metrics.jsonl") if r["kind"] == "final"]) == 1
    assert proc.stdout.count("certified on the test split") == 1          # one writer
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 10
    torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-5)
    _assert_same_tensors(load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors")))
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())


@pytest.mark.distributed
def test_ddp_two_processes_match_one(one, tmp_path):
    two = tmp_path / "two"
    proc = _torchrun(*ARGS, f"run_dir={two}", "dist.strategy=ddp", "train.checkpoint_every_steps=5")
    _assert_matches(one, two, proc)


@pytest.mark.distributed
def test_fsdp_two_processes_match_one_and_resume_exactly(one, tmp_path):
    two = tmp_path / "two"
    _torchrun(*ARGS, f"run_dir={two}", "dist.strategy=fsdp", "train.checkpoint_every_steps=5",
              "train.stop_at_step=5")
    # the sharded optimizer writes the unsharded ManifoldAdam layout: the checkpoints agree
    a, b = one / "checkpoints" / "step_00000005", two / "checkpoints" / "step_00000005"
    _assert_same_tensors(load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors")))
    opt_a, opt_b = ({k: v for k, v in load_file(str(c / "optimizer.safetensors")).items()
                     if not k.startswith("rng.")} for c in (a, b))     # the RNG is per process
    assert any(k.endswith(".lookahead_sum") for k in opt_a)
    _assert_same_tensors(opt_a, opt_b)
    meta_a, meta_b = (json.loads((c / "state.json").read_text())["optimizer"] for c in (a, b))
    assert meta_a["param_groups"] == meta_b["param_groups"]
    proc = _torchrun("--config", str(two / "config.yaml"), "train.stop_at_step=null", "--resume")
    _assert_matches(one, two, proc)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(("ddp", 3), ("fsdp", 2)), (("fsdp", 3), ("ddp", 2))])
def test_three_processes_match_one_and_resume_under_another_strategy(one, tmp_path, first, second):
    """Half the run under one strategy with 3 processes, the rest under another with 2 (and,
    from the same checkpoint, in one process): every continuation is the one-process run."""
    (strategy, nproc), (strategy2, nproc2) = first, second
    run = tmp_path / "run"
    _torchrun(*ARGS, f"run_dir={run}", f"dist.strategy={strategy}", "train.checkpoint_every_steps=5",
              "train.stop_at_step=5", nproc=nproc)
    a, b = one / "checkpoints" / "step_00000005", run / "checkpoints" / "step_00000005"
    _assert_same_tensors(load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors")))
    opt_a, opt_b = ({k: v for k, v in load_file(str(c / "optimizer.safetensors")).items()
                     if not k.startswith("rng.")} for c in (a, b))
    _assert_same_tensors(opt_a, opt_b)
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    train(load_config(str(alone / "config.yaml"), [f"run_dir={alone}", "train.stop_at_step=null",
                                                  "dist.strategy=none", "resume=true"]))
    _assert_same_tensors(load_file(str(one / "model.safetensors")),
                         load_file(str(alone / "model.safetensors")))
    torch.testing.assert_close(_losses(alone), _losses(one), rtol=1e-4, atol=1e-5)
    proc = _torchrun("--config", str(run / "config.yaml"), "train.stop_at_step=null",
                     f"dist.strategy={strategy2}", "--resume", nproc=nproc2)
    _assert_matches(one, run, proc)


def test_sharded_optimizer_needs_sharded_parameters():
    model = create_model("lipnext_l4w64", num_classes=10, in_chans=1, image_size=8)
    with pytest.raises(ValueError, match="fully_shard"):
        ShardedManifoldAdam([dict(params=list(model.parameters()), orthogonal=False)])
