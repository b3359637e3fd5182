"""Sound by construction: each finding of the external audit (issue 21) as a regression test.

1. spectral_norm_bound is an upper bound at every scale (closed forms, mpmath, float64 SVD);
2. a claimed L (model.lipschitz_bound(), lipschitz=) or a handed-in twin is checked, not trusted;
3. every layer owns its certificate: an undeclared layer, an overriding subclass, a replaced
   method or a hook is refused with the module's path;
4. 1/std enters the bound by its absolute value; a non-positive std is refused;
5. the certificate covers the whole ball in floating point (overflow, underflow);
6. estimates warn and are marked, never presented as certificates.
(7, torch.func and double backward, is tests/test_functorch.py.)
"""
import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lipnext
from lipnext.bounds import abs_norm_bound, operator_norm_bound, spectral_norm_bound
from lipnext.certify import Float32EstimateWarning, float32_estimate
from lipnext.models import LipNeXt
from lipnext.nn import BetaAbs
from lipnext.program import NotCertifiable, float64_twin, same_function
from lipnext.rounding import linear, norm_upper, propagate

U = 2.0 ** -53


def tiny_lipnext(**kw):
    kw = {"depth": 2, "width": 16, "num_classes": 4, "in_chans": 1, "image_size": 8, "patch_size": 2,
          "seed": 0, **kw}
    return LipNeXt(**kw).eval()


def sigma_mp(w: torch.Tensor) -> float:
    """sigma_max of the exact matrix stored in w (float64 entries), by a 60-digit SVD."""
    mpmath.mp.dps = 60
    a = mpmath.matrix([[mpmath.mpf(float(v)) for v in row] for row in w.double().tolist()])
    return float(max(mpmath.svd_r(a, compute_uv=False)))


# ------------------------------------------------------------------ 1. the spectral-norm bound
@pytest.mark.parametrize("scale", [5e-324, 1e-310, 1e-300, 1e-154, 1e-9, 1.0, 1e9, 1e30, 1e300])
def test_bound_of_a_scaled_identity_holds_at_every_scale(scale):
    """sigma(c I) = c exactly (c a float64): the audit's 1e-9 I_4 gave bound/sigma - 1 = -1."""
    w = torch.eye(4, dtype=torch.float64) * scale
    bound = spectral_norm_bound(w).item()
    assert bound >= w[0, 0].item()
    assert bound <= w[0, 0].item() * (1 + 1e-12) + 2.0 ** -1000          # and tight


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (1, 9), (16, 16)])
@pytest.mark.parametrize("scale", [1e-200, 1e-9, 1.0, 1e25])
def test_rank_one_grams_are_bounded(shape, scale):
    """W = scale u v^T: sigma = scale ||u|| ||v||, and the row sums of the Gram equal sigma^2
    exactly, so any rounding down shows."""
    u = torch.full((shape[0], 1), 1 / 3, dtype=torch.float64)
    v = torch.full((1, shape[1]), 1 / 7, dtype=torch.float64)
    w = scale * (u @ v)
    assert spectral_norm_bound(w).item() >= sigma_mp(w)


def test_bound_of_a_block_matrix_scaled_down_is_above_sigma():
    """The audit's case: a block's M scaled by 1e-9 was bounded by 3.5e-13."""
    m = tiny_lipnext().blocks[0].M.detach() * 1e-9
    sigma = torch.linalg.matrix_norm(m.double(), ord=2).item()
    assert spectral_norm_bound(m).item() >= sigma * (1 - 64 * 16 * U)   # float64 SVD's error allowed
    assert spectral_norm_bound(m).item() <= sigma * 1.001


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), exponent=st.integers(-320, 300),
       seed=st.integers(0, 2 ** 31 - 1), rank_one=st.booleans())
def test_bound_is_above_the_exact_sigma_for_random_matrices(rows, cols, exponent, seed, rank_one):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    if rank_one:
        w = w[:, :1] @ w[:1, :]
    w = w * 10.0 ** exponent
    assert spectral_norm_bound(w).item() >= sigma_mp(w)


def test_bound_of_large_random_matrices_is_above_the_svd():
    """Against the float64 SVD with its error allowed for (|sigma^ - sigma| <= 64 n u sigma)."""
    gen = torch.Generator().manual_seed(0)
    for shape, scale in [((64, 64), 1.0), ((40, 90), 1e-150), ((90, 40), 1e150), ((128, 128), 3e-5)]:
        w = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        sigma = torch.linalg.matrix_norm(w, ord=2).item()
        assert spectral_norm_bound(w).item() >= sigma * (1 - 64 * max(shape) * U)


def test_the_other_bounds_hold_at_small_and_large_scales():
    for scale in (1e-300, 1e-9, 1e200):
        w = torch.tensor([[3.0, -1.0], [2.0, 5.0]], dtype=torch.float64) * scale
        exact = sigma_mp(w)
        assert operator_norm_bound(w) >= exact
        assert abs_norm_bound(w) >= sigma_mp(w.abs())
    assert math.isinf(spectral_norm_bound(torch.tensor([[math.nan, 1.0], [0.0, 1.0]])).item())


def test_a_model_with_tiny_mixing_matrices_is_not_certified_beyond_a_class_change():
    """End to end (the audit: radius 977, class change at 0.55): M scaled by 1e-9 in every block."""
    torch.manual_seed(0)
    m = tiny_lipnext(depth=1, num_classes=2)
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        m.blocks[0].M.mul_(1e-9)
        m.blocks[0].bias.zero_()
        f = float64_twin(m).forward_features(x)
        w = m.head_weight().double()
        m.head.bias.copy_(torch.tensor([0.0, ((w[0] - w[1]) @ f.T).median().item()]))  # boundary mid-data
    twin = float64_twin(m)
    with torch.no_grad():
        y = twin(x).argmax(1)
    assert y.unique().numel() == 2
    cert = lipnext.certify(m, x, y)
    i = int(cert.radius.argmax())
    j = int((y != y[i]).nonzero()[0])
    t = torch.linspace(0, 1, 4001, dtype=torch.float64).view(-1, 1, 1, 1)
    seg = x[i].double() + t * (x[j] - x[i]).double()
    with torch.no_grad():
        flip = int((twin(seg).argmax(1) != y[i]).nonzero()[0])
    assert cert.radius[i].item() < (seg[flip] - x[i]).norm().item()


# ------------------------------------------------------------------ 2. claims are checked
class ClaimsTooLittle(LipNeXt):
    def lipschitz_bound(self) -> float:
        return 0.01


def test_a_claimed_bound_below_the_layers_bound_is_refused_with_both_numbers():
    m = ClaimsTooLittle(**tiny_lipnext().config()).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    true_l = tiny_lipnext().lipschitz_bound()
    with pytest.raises(ValueError, match=r"L = 0\.01 \(model\.lipschitz_bound\(\)\) is below L = 1\.0"):
        lipnext.certify(m, x, y)
    with pytest.raises(ValueError, match=r"L = 0\.01 \(lipschitz=\) is below"):
        lipnext.certify(tiny_lipnext(), x, y, lipschitz=0.01)
    above = lipnext.certify(tiny_lipnext(), x, y, lipschitz=2.0)      # a looser claim is used as given
    assert above.lipschitz == 2.0 and true_l < 2.0


def test_a_twin_of_other_weights_is_refused():
    m = tiny_lipnext()
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    twin = float64_twin(m)
    assert lipnext.certify(m, x, y, twin=twin).proven
    with torch.no_grad():
        m.blocks[0].bias.add_(1.0)
    with pytest.raises(ValueError, match="other weights"):
        lipnext.certify(m, x, y, twin=twin)
    with pytest.raises(TypeError, match="Float64Twin"):
        lipnext.certify(m, x, y, twin=m)


# ------------------------------------------------------------------ 3. layers own their certificates
def test_an_undeclared_activation_is_refused_with_its_path():
    """The audit: LeakyReLU(3) in a block kept L = 1.0 and certified a point that flips."""
    m = tiny_lipnext()
    m.blocks[0].act = nn.LeakyReLU(3.0)
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    for call in (lambda: lipnext.certify(m, x, y), m.lipschitz_bound, lambda: float64_twin(m)):
        with pytest.raises(NotCertifiable, match=r"blocks\.0\.act \(LeakyReLU\).*lipschitz_bound\(\) and "
                                                 r"rounding_steps\(\)"):
            call()


class BoundOnly(nn.Module):
    def forward(self, x):
        return x

    def lipschitz_bound(self):
        return 1.0


def test_a_layer_with_a_bound_but_no_float64_step_is_refused():
    m = tiny_lipnext()
    m.blocks[1].act = BoundOnly()
    with pytest.raises(NotCertifiable, match=r"blocks\.1\.act \(BoundOnly\).*does not declare rounding_steps\(\)"):
        float64_twin(m)


def test_a_module_outside_the_program_is_refused():
    m = tiny_lipnext()
    m.extra = nn.Linear(16, 16)                    # parameters the program never mentions
    with pytest.raises(NotCertifiable, match=r"extra \(Linear\) is not part of LipNeXt's float64 program"):
        float64_twin(m)


class TemperatureHead(LipNeXt):
    def forward_head(self, f):
        return super().forward_head(f) / 0.1


class SharperBetaAbs(BetaAbs):
    def forward(self, x):
        return 3 * super().forward(x)


def test_subclasses_that_change_the_computation_without_a_program_are_refused():
    with pytest.raises(NotCertifiable, match=r"overrides forward_head\(\).*not head_program\(\)"):
        float64_twin(TemperatureHead(**tiny_lipnext().config()))
    m = tiny_lipnext()
    m.blocks[0].act = SharperBetaAbs(16)
    with pytest.raises(NotCertifiable, match=r"blocks\.0\.act \(SharperBetaAbs\): SharperBetaAbs\.forward"):
        float64_twin(m)


def test_replaced_methods_and_hooks_are_refused_but_checkpointing_is_not():
    m = tiny_lipnext()
    m.blocks[0].act.forward = lambda x: 3 * x
    with pytest.raises(NotCertifiable, match=r"blocks\.0\.act.*forward was replaced"):
        float64_twin(m)
    m = tiny_lipnext()
    m.forward_features = lambda x: x
    with pytest.raises(NotCertifiable, match="forward_features was replaced"):
        float64_twin(m)
    m = tiny_lipnext()
    handle = m.blocks[1].register_forward_hook(lambda mod, inp, out: 2 * out)
    with pytest.raises(NotCertifiable, match=r"blocks\.1 \(LipNeXtBlock\) has forward hooks"):
        float64_twin(m)
    handle.remove()
    from torch.utils.checkpoint import checkpoint
    for block in m.blocks:      # what train.activation_checkpointing does: the same function
        block.forward = same_function(lambda x, f=block.forward: checkpoint(f, x, use_reentrant=False))
    assert len(float64_twin(m).steps) > 0


# ------------------------------------------------------------------ 4. std
def test_the_input_scale_takes_absolute_values_and_bad_std_is_refused():
    m = tiny_lipnext(in_chans=3, std=[1.0, 1.0, 1.0])
    base = m.lipschitz_bound()
    with torch.no_grad():
        m.stem.inv_std.copy_(torch.tensor([1.0, 1.0, -4.0]).view(1, -1, 1, 1))
    assert m.stem.input_scale() == 4.0
    assert m.lipschitz_bound() == pytest.approx(4 * base, rel=1e-12)
    x, y = torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    assert lipnext.certify(m, x, y).lipschitz >= 4 * base
    for bad in ([1.0, 0.0, 1.0], [1.0, -2.0, 1.0], [1.0, math.inf, 1.0]):
        with pytest.raises(ValueError, match="positive, finite"):
            tiny_lipnext(in_chans=3, std=bad)
    good = tiny_lipnext(in_chans=3, std=[0.5, 0.5, 0.5])
    state = good.state_dict()
    state["stem.inv_std"] = torch.tensor([2.0, -2.0, 2.0]).view(1, -1, 1, 1)
    with pytest.raises(ValueError, match="inv_std must be positive and finite"):
        good.load_state_dict(state)


# ------------------------------------------------------------------ 5. the whole ball, in floating point
def test_a_ball_that_leaves_float64s_range_gets_no_radius_beyond_it():
    """The audit: ||x|| ~ 1.3e154 was certified while points of its ball overflow in the twin."""
    m = tiny_lipnext(num_classes=2)
    pattern = torch.rand(1, 1, 8, 8, dtype=torch.float64) - 0.5
    for norm in (1.3e154, 1e150, 1e140):
        x = pattern / pattern.norm() * norm
        twin = float64_twin(m)
        with torch.no_grad():
            y = twin(x).argmax(1)
        with pytest.warns() as seen:
            cert = lipnext.certify(m, x, y)
        r = cert.radius.item()
        if norm > 1e150:
            assert r == 0.0 and cert.range_limited.item()
            assert any("leaves float64's range" in str(w.message) for w in seen)
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(64, 1, 8, 8, generator=gen, dtype=torch.float64)
        u = torch.cat([u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1), pattern / pattern.norm()])
        with torch.no_grad():
            z = twin(x + r * (1 - 1e-9) * u)
        assert torch.isfinite(z).all() and (z.argmax(1) == y).all()


def test_norms_below_1e_minus_154_are_not_lost():
    """||h|| computed as sqrt(sum h^2) is 0 below 1e-154, and the rounding allowance with it."""
    h = torch.full((2, 50), 1e-170, dtype=torch.float64)
    exact = 1e-170 * math.sqrt(50)
    assert (norm_upper(h) >= exact).all() and (norm_upper(h) <= exact + math.sqrt(50) * 2.0 ** -510).all()
    w = torch.randn(8, 50, dtype=torch.float64)
    step = linear(w)
    kin, _ = step.error((50,))
    prop = propagate([step], h)
    assert (prop.a >= kin * exact).all()
    big = torch.full((1, 50), 1e200, dtype=torch.float64)
    assert norm_upper(big).item() >= 1e200 * math.sqrt(50)         # no overflow in the norm either


# ------------------------------------------------------------------ 6. estimates are labelled
def test_estimates_warn_are_marked_and_certify_has_no_unsound_switch():
    from test_rounding import adversarial_model
    m, x0 = adversarial_model()
    with torch.no_grad():
        y32 = m(x0).argmax(1)
        y64 = float64_twin(m)(x0).argmax(1)
    assert y32 != y64
    with pytest.warns(Float32EstimateWarning, match="not a certificate"):
        est = float32_estimate(m, x0, y32)
    assert est.numerics == "float32-estimate" and not est.proven
    assert est.certified(0.0).item()               # the estimate "certifies" the wrong class ...
    proven = lipnext.certify(m, x0, y32)
    assert proven.proven and not proven.certified(0.0).item()   # ... the certificate does not
    with pytest.raises(TypeError):
        lipnext.certify(m, x0, y32, rounding_guard=False)


def test_the_fft_error_constant_is_far_below_the_assumed_one():
    """The BRO step assumes ||fl(F x) - F x|| <= 64 u (log2 N + 1) ||x||; measured on this CPU
    against a long-double FFT (docs/RELIABILITY.md: about 0.3, for power-of-two and odd grids)."""
    from lipnext.rounding import FFT_CONSTANT
    from lipnext.verify.precision import fft_error_constant
    measured = fft_error_constant(trials=2)
    assert 0 < max(measured["constant"].values()) < FFT_CONSTANT / 16


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("lipnext_l4w64", {}), ("lipnext_l4w64", {"activation": "minmax"}),
                                     ("lipnext_l4w64", {"padding": "zero", "pos_encoding": "shared"}),
                                     ("liresnet_l7w64", {"dense_depth": 1}), ("bronet_l6w96", {"dense_depth": 1})])
def test_attacks_find_no_counterexample_on_any_built_in_model(name, kw):
    """verify's attacks (PGD, DDN, and the library's APGD and FAB when installed) against every
    certified point of each built-in model, trained briefly on digits: 0 counterexamples."""
    from lipnext.data import get_dataset
    from lipnext.losses import emma_loss
    from lipnext.optim import build_optimizer
    from lipnext.verify import attack_certified
    torch.manual_seed(0)
    train_x, train_y = get_dataset("digits", "train", holdout=300).tensors()
    x, y = get_dataset("digits", "test", holdout=300).tensors()
    model = lipnext.create_model(name, num_classes=10, in_chans=1, image_size=8, patch_size=2, depth=2,
                                 width=32, seed=0, **kw)
    opt = build_optimizer(model, lr=1e-2)
    for step in range(60):
        idx = torch.randint(0, len(train_y), (128,))
        loss = emma_loss(model(train_x[idx]), train_y[idx], model.head_weight(), model.lipschitz_bound(), 0.25)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    cert = lipnext.certify(model, x[:96], y[:96])
    res = attack_certified(model, x[:96], y[:96], cert, eps=(0.1, 0.25), steps=20, restarts=2, ddn_steps=40)
    assert res.details["certified_points_attacked"] > 10, (name, cert.accuracy)
    assert res.details["counterexamples"] == 0 and res.passed, res.summary
