"""DDP: 2 processes on CPU (gloo, launched by torchrun) give the result of 1 process on the
same global batch; only rank 0 writes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lipnext.config import load_config
from lipnext.engine import read_metrics, train

ARGS = ["data.name=digits", "model.name=lipnext_l4w64",
        "model.kwargs={depth: 2, width: 32, patch_size: 2}", "augment.crop_padding=1",
        "train.batch_size=128", "train.epochs=1", "optim.warmup_epochs=0.5", "optim.lookahead_k=3",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.eval_every=0",
        "certify.radii=[36]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(None, ARGS + [f"run_dir={one}", "dist.strategy=none"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "lipnext.cli", "train", *ARGS, f"run_dir={two}", "dist.strategy=ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = [r for r in read_metrics(two / "metrics.jsonl") if r["kind"] == "final"]
    assert len(res) == 1                                       # one writer
    assert proc.stdout.count("certified on the test split") == 1
    l1 = [r["loss"] for r in read_metrics(one / "metrics.jsonl") if r["kind"] == "train"]
    l2 = [r["loss"] for r in read_metrics(two / "metrics.jsonl") if r["kind"] == "train"]
    assert len(l1) == len(l2) == 10
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
