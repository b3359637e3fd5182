"""The demo end to end, and certificate soundness: an L2 PGD attack inside the certified
radius of every certified point never changes the prediction."""
import json

import pytest
import torch

import lipnext
from lipnext.data import get_dataset
from lipnext.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow          # the module trains the demo model for 8 epochs


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = run_demo(DemoConfig(epochs=8, out=str(out)), progress=False)
    return out, results


def pgd_l2(model, x, y, radius, steps=40, restarts=3):
    """Maximise the best other logit minus the true one inside ||delta|| <= radius."""
    best = torch.full((len(y),), -float("inf"))
    r = radius.float().view(-1, 1, 1, 1)
    for restart in range(restarts):
        delta = torch.randn_like(x)
        delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * r * (restart / restarts)
        for _ in range(steps):
            delta.requires_grad_(True)
            z = model(x + delta)
            zy = z.gather(1, y[:, None]).squeeze(1)
            other = z.scatter(1, y[:, None], -float("inf")).amax(1)
            gap = other - zy
            (g,) = torch.autograd.grad(gap.sum(), delta)
            with torch.no_grad():
                g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta + 2.5 * r / steps * g
                norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                delta = delta * torch.clamp(r / norm.clamp_min(1e-12), max=1.0)
        with torch.no_grad():
            z = model(x + delta)
            zy = z.gather(1, y[:, None]).squeeze(1)
            best = torch.maximum(best, z.scatter(1, y[:, None], -float("inf")).amax(1) - zy)
    return best  # > 0 means the prediction changed


def test_demo_writes_the_run_folder(demo_run):
    out, results = demo_run
    for name in ("model.safetensors", "results.json", "metrics.jsonl", "config.yaml",
                 "certified_accuracy.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["clean_accuracy"] == results["clean_accuracy"] > 0.5  # far above chance (0.1)
    assert 0 <= saved["cra"]["0.75"] <= saved["cra"]["0.5"] <= saved["cra"]["0.25"] <= saved["clean_accuracy"]
    assert results["lipschitz_bound"] == pytest.approx(1.0, abs=1e-4)


def test_demo_weights_are_orthogonal_after_retraction(demo_run):
    model = lipnext.load_model(demo_run[0])
    for p in model.parameters():
        if lipnext.nn.is_orthogonal(p):
            assert lipnext.nn.orthogonality_error(p) < 1e-6


def test_certified_points_survive_pgd_inside_their_radius(demo_run):
    model = lipnext.load_model(demo_run[0]).eval()
    x, y = get_dataset("digits", split="test", holdout=360).tensors()
    cert = lipnext.certify(model, x, y)
    ok = cert.certified(0.0)
    assert ok.sum() >= 20
    xs, ys, rs = x[ok], y[ok], cert.radius[ok]
    inside = pgd_l2(model, xs, ys, rs * 0.999)
    assert (inside < 0).all(), f"{int((inside >= 0).sum())} certified points broken inside their radius"
    # the attack is not toothless: well outside the radius it breaks some points
    outside = pgd_l2(model, xs, ys, rs * 4)
    assert (outside > 0).any()
