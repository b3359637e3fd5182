"""Adding an activation is one file (examples/groupsort/groupsort.py): its forward, its bound and
its float64 step; LipNeXt then trains, certifies and verifies with it, through the API and the
command line. A layer that leaves out its bound or its step is refused."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lipnext
from lipnext.program import NotCertifiable

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES / "groupsort"))
import groupsort  # noqa: E402  (registers the activation group_sort)


def test_groupsort_is_exact_norm_preserving_and_one_lipschitz():
    gs = groupsort.GroupSort(8, 2)
    x = torch.randn(5, 3, 3, 8, dtype=torch.float64)
    y = gs(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-14)
    assert (y[..., 0::2] >= y[..., 1::2]).all()
    z = x + 1e-3 * torch.randn_like(x)
    assert ((gs(z) - y).norm() <= (z - x).norm() * (1 + 1e-12))


def test_a_lipnext_with_groupsort_trains_certifies_and_verifies(tmp_path, monkeypatch):
    from lipnext.data import get_dataset
    from lipnext.train import load_config, train
    from lipnext.verify import Budget, verify_model
    monkeypatch.chdir(tmp_path)
    res = train(load_config(None, [
        "model.name=lipnext_l4w64", "model.kwargs={activation: group_sort, depth: 2, width: 32}",
        "data.holdout=300", "train.epochs=6", "train.batch_size=64", "optim.lr=1e-2", "augment.crop_padding=0",
        "augment.flip=false", "train.progress=false",
        "train.tensorboard=false", "train.eval_every=0", "certify.radii=[0.25]", "certify.radius_unit=1",
        "run_dir=runs/gs"]))
    model = lipnext.load_model("runs/gs")
    assert isinstance(model.blocks[0].act, groupsort.GroupSort) and res["clean_accuracy"] > 0.5
    x, y = (t[:48] for t in get_dataset("digits", "test", holdout=300).tensors())
    cert = lipnext.certify(model, x, y)
    assert cert.proven and cert.lipschitz == pytest.approx(res["lipschitz_bound"], rel=1e-12)
    report = verify_model(model, x, y, eps=(0.25,), budget=Budget.fast())
    assert report.passed, report.to_markdown()


@pytest.mark.slow
def test_groupsort_through_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES / "groupsort"),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = [sys.executable, "-m", "lipnext.cli", "--import", "groupsort"]
    subprocess.run([*run, "train", "model.name=lipnext_l4w64", "model.kwargs.activation=group_sort",
                    "model.kwargs.depth=2", "model.kwargs.width=32", "train.epochs=1",
                    "train.progress=false", "train.tensorboard=false",
                    "train.eval_every=0", f"run_dir={tmp_path / 'run'}"], check=True, env=env,
                   capture_output=True, text=True)
    out = subprocess.run([*run, "certify", str(tmp_path / "run")], check=True, env=env,
                         capture_output=True, text=True).stdout
    assert "CRA" in out
    verify = subprocess.run([*run, "verify", str(tmp_path / "run"), "--budget", "16", "--library", "no",
                             "--limit", "40", "--steps", "5", "--restarts", "1", "--ddn-steps", "10",
                             "--lipschitz-steps", "10", "--lipschitz-restarts", "2", "--lipschitz-points", "4"],
                            env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


class SortWithoutStep(nn.Module):
    """GroupSort's forward and bound, but no float64 step."""

    forward = groupsort.GroupSort.forward

    def __init__(self):
        super().__init__()
        self.channels, self.group = 16, 2

    def lipschitz_bound(self):
        return 1.0


def test_a_layer_without_its_step_or_bound_is_refused():
    m = lipnext.create_model("lipnext_l4w64", num_classes=3, in_chans=1, image_size=8, patch_size=2,
                             depth=2, width=16)
    m.blocks[1].act = SortWithoutStep()
    x, y = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(NotCertifiable, match=r"blocks\.1\.act \(SortWithoutStep\).*does not declare "
                                             r"rounding_steps\(\)"):
        lipnext.certify(m, x, y)
    del SortWithoutStep.lipschitz_bound
    with pytest.raises(NotCertifiable, match=r"lipschitz_bound\(\) and rounding_steps\(\)"):
        m.lipschitz_bound()
