"""Building blocks: orthogonality, norm preservation, 1-Lipschitz maps."""
import math

import pytest
import torch

from lipnext.bounds import spectral_norm_bound
from lipnext.nn import (BetaAbs, L2Pool, NormalizedLinear, OrthogonalParameter,
                        OrthogonalPatchStem, SpatialShift, is_orthogonal, orthogonality_error,
                        random_orthogonal)


def test_random_orthogonal_is_orthogonal():
    q = random_orthogonal(64, dtype=torch.float64)
    assert orthogonality_error(q) < 1e-12


def test_orthogonal_parameter_must_be_square():
    with pytest.raises(ValueError, match="square"):
        OrthogonalParameter(torch.zeros(3, 4))
    assert is_orthogonal(OrthogonalParameter(torch.eye(3)))
    assert not is_orthogonal(torch.nn.Parameter(torch.eye(3)))


@pytest.mark.parametrize("alpha", [1 / 8, 1 / 16, 0.25])
def test_spatial_shift_is_a_norm_preserving_permutation(alpha):
    shift = SpatialShift(32, alpha)
    x = torch.randn(3, 5, 6, 32, dtype=torch.float64)
    y = shift(x)
    torch.testing.assert_close(y.norm(), x.norm())
    # a permutation of the coordinates: same multiset of values
    torch.testing.assert_close(y.flatten().sort().values, x.flatten().sort().values)
    # linear: as a matrix on one example it is orthogonal
    n = 5 * 6 * 32
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 5, 6, 32)
    mat = shift(basis).reshape(n, n)
    torch.testing.assert_close(mat @ mat.T, torch.eye(n, dtype=torch.float64))


def test_spatial_shift_moves_the_right_groups():
    shift = SpatialShift(16, 1 / 8)  # 2 channels per direction, 8 at rest
    x = torch.randn(1, 4, 4, 16)
    y = shift(x)
    torch.testing.assert_close(y[0, :, :, 0:2], torch.roll(x[0, :, :, 0:2], -1, 0))
    torch.testing.assert_close(y[0, :, :, 2:4], torch.roll(x[0, :, :, 2:4], 1, 0))
    torch.testing.assert_close(y[0, :, :, 4:6], torch.roll(x[0, :, :, 4:6], -1, 1))
    torch.testing.assert_close(y[0, :, :, 6:8], torch.roll(x[0, :, :, 6:8], 1, 1))
    torch.testing.assert_close(y[..., 8:], x[..., 8:])
    # circular: the row that leaves at the top comes back at the bottom
    torch.testing.assert_close(y[0, 3, :, 0:2], x[0, 0, :, 0:2])


def test_spatial_shift_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        SpatialShift(16, 0.3)


def test_beta_abs_applies_abs_to_first_channels_and_preserves_norm():
    act = BetaAbs(8, 0.5)
    x = torch.randn(10, 8)
    y = act(x)
    torch.testing.assert_close(y[:, :4], x[:, :4].abs())
    torch.testing.assert_close(y[:, 4:], x[:, 4:])
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))


def test_beta_abs_half_equals_minmax_up_to_orthogonal_change_of_basis():
    """MinMax(x) = B betaAbs(A x) with fixed orthogonal A, B (beta = 1/2)."""
    c = 8
    h = c // 2
    s = 1 / math.sqrt(2)
    a = torch.zeros(c, c, dtype=torch.float64)  # x -> [v; u], v = (a-b)/sqrt2, u = (a+b)/sqrt2
    b = torch.zeros(c, c, dtype=torch.float64)  # [|v|; u] -> (max, min) pairs
    for k in range(h):
        i, j = 2 * k, 2 * k + 1
        a[k, i], a[k, j] = s, -s
        a[h + k, i], a[h + k, j] = s, s
        b[i, h + k], b[i, k] = s, s       # max = (u + |v|)/sqrt2
        b[j, h + k], b[j, k] = s, -s      # min = (u - |v|)/sqrt2
    torch.testing.assert_close(a @ a.T, torch.eye(c, dtype=torch.float64))
    torch.testing.assert_close(b @ b.T, torch.eye(c, dtype=torch.float64))
    x = torch.randn(100, c, dtype=torch.float64)
    pairs = x.view(100, h, 2)
    minmax = torch.stack([pairs.amax(-1), pairs.amin(-1)], -1).view(100, c)
    torch.testing.assert_close(BetaAbs(c, 0.5)(x @ a.T) @ b.T, minmax)


def test_l2_pool_is_norm_preserving_and_1_lipschitz():
    pool = L2Pool()
    x = torch.randn(64, 4, 4, 16, dtype=torch.float64)
    x2 = torch.randn(64, 4, 4, 16, dtype=torch.float64)
    torch.testing.assert_close(pool(x).norm(dim=1), x.flatten(1).norm(dim=1), atol=1e-5, rtol=1e-7)
    ratio = (pool(x) - pool(x2)).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
    assert ratio.max() <= 1.0


@pytest.mark.parametrize("width,in_chans,patch", [(64, 3, 4), (16, 3, 4), (8, 1, 2)])
def test_stem_has_unit_spectral_norm_and_is_isometric_when_wide(width, in_chans, patch):
    stem = OrthogonalPatchStem(in_chans, width, patch, mean=[0.0] * in_chans).double()
    w = stem.matrix()
    sv = torch.linalg.svdvals(w.detach())
    assert abs(sv.max().item() - 1) < 1e-6
    x = torch.rand(5, in_chans, 8, 8, dtype=torch.float64)
    y = stem(x)
    assert y.shape == (5, 8 // patch, 8 // patch, width)
    if width >= in_chans * patch * patch:
        torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    else:
        assert (y.flatten(1).norm(dim=1) <= x.flatten(1).norm(dim=1) + 1e-9).all()


def test_stem_std_division_enters_the_bound():
    stem = OrthogonalPatchStem(3, 64, 4, mean=[0.5] * 3, std=[0.25, 0.5, 1.0])
    assert stem.input_scale() == pytest.approx(4.0)


def test_normalized_head_rows_have_unit_norm():
    head = NormalizedLinear(16, 5)
    with torch.no_grad():
        head.weight.mul_(torch.arange(1, 6).float()[:, None])
    torch.testing.assert_close(head.normalized_weight().norm(dim=1), torch.ones(5))
    f = torch.randn(3, 16)
    torch.testing.assert_close(head(f), f @ head.normalized_weight().T + head.bias)


def test_spectral_norm_bound_is_sound_and_tight():
    for scale in (1.0, 1.01, 0.97):
        q = random_orthogonal(48, dtype=torch.float64) * scale
        bound = spectral_norm_bound(q).item()
        exact = torch.linalg.matrix_norm(q, ord=2).item()
        assert exact <= bound <= exact + 1e-9 + abs(scale - 1)
    g = torch.randn(4, 20, 30, dtype=torch.float64)  # arbitrary, non-square, batched
    assert (torch.linalg.matrix_norm(g, ord=2) <= spectral_norm_bound(g)).all()
