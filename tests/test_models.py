"""LipNeXt: shapes, registry, clear errors, norm preservation and the Lipschitz bound."""
import pytest
import torch

import lipnext
from lipnext.models import LipNeXt, model_entry


def tiny(**kw):
    kw = {"depth": 3, "width": 32, "num_classes": 5, "in_chans": 3, "image_size": 8,
          "patch_size": 2, **kw}
    return LipNeXt(**kw)


def test_forward_shapes_and_api():
    m = lipnext.create_model("lipnext_l4w64", num_classes=7, image_size=16)
    x = torch.rand(2, 3, 16, 16)
    f = m.forward_features(x)
    assert f.shape == (2, 64)
    torch.testing.assert_close(m(x), m.forward_head(f))
    assert m(x).shape == (2, 7)


def test_registry_has_paper_and_cpu_models_with_trunk_param_counts():
    names = lipnext.list_models()
    for n in ["lipnext_l32w1024", "lipnext_l32w2048", "lipnext_l32w4096", "lipnext_2b",
              "lipnext_l8w128", "lipnext_l12w256"]:
        assert n in names
    _, d, _ = model_entry("lipnext_2b")
    assert 2 * d["width"] ** 2 * d["depth"] == pytest.approx(2.0e9, rel=0.08)
    m = lipnext.create_model("lipnext_l8w128")
    trunk = sum(p.numel() for b in m.blocks for p in (b.R, b.M))
    assert trunk == 2 * 128 ** 2 * 8


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(KeyError, match="lipnext_l8w128"):
        lipnext.create_model("lipnext_l8w12")


@pytest.mark.parametrize("x,msg", [
    (torch.rand(3, 8, 8), "batch dimension"),
    (torch.rand(2, 1, 8, 8), "3 input channels"),
    (torch.rand(2, 8, 8, 3), "channels-last"),
    (torch.rand(2, 3, 16, 16), "8x8"),
    (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), "255"),
    (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
    (torch.tensor([[[[float("inf")] * 8] * 8] * 3]), "NaN or Inf"),
])
def test_clear_errors_for_bad_input(x, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        tiny()(x)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="patch_size"):
        tiny(patch_size=3)
    with pytest.raises(ValueError, match="mean"):
        tiny(mean=[0.5])


def test_trunk_is_norm_preserving_without_bias_and_positional_encoding():
    """Every map of the trunk preserves norms: stem (wide), R, S, R^T, M, beta-Abs, L2 pool."""
    m = tiny(width=64).double()
    x = torch.rand(16, 3, 8, 8, dtype=torch.float64)
    centred = (x - m.stem.mean.double()).flatten(1).norm(dim=1)
    torch.testing.assert_close(m.forward_features(x).norm(dim=1), centred, atol=1e-5, rtol=1e-6)


def empirical_lipschitz(model, x, steps=60):
    """Gradient ascent on ||f(a) - f(b)|| / ||a - b|| over pairs near x (a lower bound)."""
    a = x.clone().requires_grad_(True)
    b = (x + 0.05 * torch.randn_like(x)).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=0.01)
    best = 0.0
    for _ in range(steps):
        fa, fb = model.forward_features(a), model.forward_features(b)
        ratio = (fa - fb).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1).clamp_min(1e-9)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def test_empirical_search_never_breaks_the_bound():
    m = tiny(width=32).double()
    with torch.no_grad():
        for b in m.blocks:
            b.bias.normal_()
            b.pos.pos.normal_()
    m.validate_inputs = False
    lip = empirical_lipschitz(m, torch.rand(16, 3, 8, 8, dtype=torch.float64))
    assert 0.5 < lip <= m.lipschitz_bound()


def test_bound_follows_the_weights_as_they_are():
    m = tiny()
    assert m.lipschitz_bound() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        m.blocks[1].R.mul_(1.01)
        m.blocks[2].M.mul_(1.02)
    assert m.lipschitz_bound() >= 1.01 ** 2 * 1.02 * (1 - 1e-5)
    m2 = tiny(std=[0.2, 0.25, 0.5])
    assert m2.lipschitz_bound() == pytest.approx(5.0, rel=1e-4)


def test_std_division_bound_is_not_broken_empirically():
    m = tiny(std=[0.2, 0.25, 0.5]).double()
    m.validate_inputs = False
    lip = empirical_lipschitz(m, torch.rand(8, 3, 8, 8, dtype=torch.float64))
    assert 1.0 < lip <= m.lipschitz_bound()


def test_seed_makes_construction_reproducible():
    a, b = tiny(seed=3), tiny(seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_config_dataclass_and_keyword_options_build_the_same_model():
    from lipnext.models import LipNeXtConfig
    cfg = LipNeXtConfig(depth=2, width=16, image_size=8, seed=1)
    assert cfg.image_size == (8, 8) and cfg.patch_size == 2 and cfg.mean == [0.5] * 3
    a, b = LipNeXt(cfg, num_classes=5), LipNeXt(depth=2, width=16, image_size=8, seed=1, num_classes=5)
    assert a.config() == b.config() and a.cfg.num_classes == 5 and cfg.num_classes == 10
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    with pytest.raises(TypeError, match="LipNeXtConfig"):
        LipNeXt(object())
    with pytest.raises(TypeError, match="dept"):
        LipNeXt(dept=3)


def test_seed_scope_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny(seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_a_config_written_by_the_keyword_constructor_still_loads():
    """The header config of files saved before the configs were dataclasses (a literal copy)."""
    from lipnext.models import build_from_config
    saved = {"depth": 2, "width": 16, "num_classes": 10, "in_chans": 1, "image_size": [8, 8],
             "patch_size": 2, "alpha": 0.125, "beta": 0.5, "mean": [0.5], "std": None, "seed": 4,
             "pos_encoding": "block", "padding": "circular", "activation": "beta_abs"}
    m = build_from_config("lipnext", saved)
    assert m.config() == saved and m.image_size == (8, 8) and m.in_chans == 1
    assert build_from_config("lipnext", {"depth": 2, "width": 16}).config()["alpha"] == 0.125
