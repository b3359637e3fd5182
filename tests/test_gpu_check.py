"""What the GPU check (``lipnext bench gpu``) relies on, proven on the CPU: the benchmarks build
models as the trainer does (no host QR), and ``--smoke`` runs every stage at tiny sizes."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lipnext.engine.distributed as distributed
from lipnext.bench.models import bench_model
from lipnext.nn.orthogonal import is_orthogonal

_QR = (torch.ops.aten.linalg_qr, torch.ops.aten.geqrf)


def test_bench_models_draw_orthogonal_weights_on_the_device_not_the_host(monkeypatch):
    """`lipnext bench --device cuda` at 1B/2B ran 65 float64 QRs of 4096^2 / 5792^2 on the CPU
    before moving the model: every QR must happen in ``init_orthogonal_``, on the target device."""
    where = {"init": 0, "elsewhere": 0}
    inside, devices = [False], []
    real = distributed.init_orthogonal_

    def recording(module, seed, device, select=lambda k: True):
        inside[0] = True
        devices.append(torch.device(device))
        try:
            return real(module, seed, device, select)
        finally:
            inside[0] = False

    class CountQR(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in _QR and args[0].shape[-1] >= 1024:
                where["init" if inside[0] else "elsewhere"] += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(distributed, "init_orthogonal_", recording)
    with CountQR():
        model = bench_model("lipnext_l32w1024", torch.device("cpu"), depth=1, image_size=32)
    assert where == {"init": 3, "elsewhere": 0}          # R and M of one block, the stem
    assert devices == [torch.device("cpu")]
    weights = [p for p in model.parameters() if is_orthogonal(p)]
    assert len(weights) == 3 and not any(p.is_meta for p in model.parameters())


def test_a_stage_past_the_deadline_is_stopped_and_one_without_time_skipped(tmp_path):
    """The deadline: a stage killed at its timeout (with the processes it started) reports
    "timed out" and what it wrote; with under 10 s of the budget left a stage is not started;
    gpu.json and gpu.md are written either way."""
    import json
    import time

    from lipnext.bench.gpu import _run_stage, _stage, run_gpu_check
    t0 = time.monotonic()
    row = _run_stage(_stage("train"), tmp_path, smoke=True, timeout=5)
    assert row["status"] == "timed out" and time.monotonic() - t0 < 30
    assert run_gpu_check(tmp_path, budget=5, smoke=True, stages=["env", "numerics"], log=lambda s: None) == 1
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [("env", "skipped"), ("numerics", "skipped")]
    assert "| env | skipped |" in (tmp_path / "gpu.md").read_text()


def test_the_gpu_check_refuses_to_run_without_a_gpu_unless_smoke(tmp_path, capsys):
    from lipnext.cli import main
    if torch.cuda.is_available():
        return
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert main(["bench", "gpu", "--smoke", "--stages", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    """`lipnext bench gpu --smoke`: every stage, each in its own process, at tiny sizes on the
    CPU, passes; the report names every stage (CI runs this, so the check cannot rot)."""
    import json
    import subprocess
    import sys

    from lipnext.bench.gpu import STAGES
    proc = subprocess.run([sys.executable, "-m", "lipnext.cli", "bench", "gpu", "--smoke", "--budget", "1200",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500)
    report = json.loads((tmp_path / "gpu.json").read_text())
    statuses = {s["stage"]: (s["status"], s.get("detail"), s.get("stderr", "")[-800:]) for s in report["stages"]}
    assert list(statuses) == [s.name for s in STAGES]
    assert all(status == "passed" for status, *_ in statuses.values()), statuses
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "gpu.md").read_text()
    assert all(f"## {s.name}: passed" in md for s in STAGES)
