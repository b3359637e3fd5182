"""What the GPU check (``lipnext bench gpu``) relies on, proven on the CPU: the benchmarks build
models as the trainer does (no host QR), and ``--smoke`` runs every stage at tiny sizes."""
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
