"""The CUDA precision context of ``ops.precision`` leaves PyTorch's legacy and new TF32 switches
in agreement, so code inside that reads either API works, in a fresh process (the state that
``torch.compile``'s tracing meets); both are restored exactly. The switches are plain flags,
so this runs without a GPU."""
import subprocess
import sys
import textwrap

import pytest

_READ = textwrap.dedent("""
    import torch
    from lipnext.ops.precision import _cuda_fp32_precision
    m = torch.backends.cuda.matmul
    def flags():
        return (torch._C._get_fp32_precision_getter("cuda", "matmul"),
                torch._C._get_fp32_precision_getter("mkldnn", "matmul"))
    {setup}
    before = flags()
    for mode in ("tf32", "ieee", "tf32"):
        with _cuda_fp32_precision(torch.device("cuda"), mode):
            assert m.allow_tf32 == (mode == "tf32"), mode          # the legacy reader
            assert m.fp32_precision == mode, mode                   # the new one
            legacy = torch.get_float32_matmul_precision()
            assert (legacy != "highest") == (mode == "tf32"), (mode, legacy)
    assert flags() == before, (flags(), before)
    print("after", {after})
""")


@pytest.mark.parametrize("setup, after, expected", [
    ("", "m.allow_tf32, torch.get_float32_matmul_precision()", "after False highest"),
    ("m.fp32_precision = 'tf32'", "m.fp32_precision", "after tf32"),           # new API only
    ("torch.set_float32_matmul_precision('medium')", "torch.get_float32_matmul_precision()",
     "after medium"),                                                          # legacy only
    ("m.allow_tf32 = True", "m.allow_tf32", "after True"),
])
def test_both_tf32_apis_readable_inside_and_restored_after(setup, after, expected):
    code = _READ.format(setup=setup, after=after)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == expected
