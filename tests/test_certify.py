"""Certificates: hand-computed radii, strictness, ties, rules and bad labels."""
import math

import pytest
import torch

import lipnext
from lipnext.certify import Float32EstimateWarning, certified_radius, float32_estimate

W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)  # unit rows


def formula(*args, **kwargs):
    """The exact-arithmetic formula: it warns and is marked as an estimate, never a certificate."""
    with pytest.warns(Float32EstimateWarning, match="not a certificate"):
        c = certified_radius(*args, **kwargs)
    assert c.numerics == "exact-formula" and not c.proven
    return c


def test_pairwise_radius_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)
    c = formula(z, torch.tensor([0]), W, lipschitz=2.0)
    # pairs: (0,1): gap 2, ||w0-w1|| = sqrt2 ; (0,2): gap 3, ||w0-w2|| = 2
    expected = min(2 / (2 * math.sqrt(2)), 3 / (2 * 2))
    assert c.radius.item() == pytest.approx(expected)
    assert c.correct.item()


def test_sqrt2_rule_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)
    c = formula(z, torch.tensor([0]), W, lipschitz=2.0, rule="sqrt2")
    head_norm = torch.linalg.matrix_norm(W, ord=2).item()
    assert c.radius.item() == pytest.approx(2 / (math.sqrt(2) * 2 * head_norm))
    assert c.rule == "sqrt2"


def test_wrong_predictions_and_ties_get_radius_zero():
    z = torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    c = formula(z, torch.tensor([0, 0]), W, lipschitz=1.0)
    assert c.radius.tolist() == [0.0, 0.0]
    assert c.correct.tolist() == [False, False]  # a tie is not a correct, certified prediction
    assert c.cra(0.0) == 0.0


def test_strict_inequality_at_the_radius():
    z = torch.tensor([[2.0, 0.0, -10.0]], dtype=torch.float64)
    c = formula(z, torch.tensor([0]), W, lipschitz=1.0)
    r = c.radius.item()
    assert r == pytest.approx(2 / math.sqrt(2))
    assert c.cra(r) == 0.0
    assert c.cra(r * (1 - 1e-9)) == 1.0
    assert c.cra([0.0, r, 2 * r]) == [1.0, 0.0, 0.0]


def test_select_keeps_the_chosen_examples():
    z = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    c = formula(z, torch.tensor([0, 1, 0]), W, lipschitz=1.0)
    s = c.select(slice(2))
    assert len(s) == 2 and s.lipschitz == c.lipschitz and s.rule == c.rule
    assert torch.equal(s.radius, c.radius[:2]) and torch.equal(s.correct, c.correct[:2])
    assert torch.equal(c.select(c.correct).margin, c.margin[c.correct])


def test_unknown_rule_and_bad_bound_are_refused():
    z = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="rule"):
        certified_radius(z, torch.tensor([0]), W, 1.0, rule="linf")
    with pytest.raises(ValueError, match="finite"):
        certified_radius(z, torch.tensor([0]), W, float("nan"))


def test_certify_model_matches_manual_computation_and_batches():
    m = lipnext.create_model("lipnext_l4w64", num_classes=4, image_size=8, patch_size=2)
    x, y = torch.rand(37, 3, 8, 8), torch.randint(0, 4, (37,))
    with pytest.warns(Float32EstimateWarning):
        c = float32_estimate(m, x, y, batch_size=10)  # the exact formula on the float32 model
    assert c.numerics == "float32-estimate" and not c.proven
    assert len(c) == 37 and c.lipschitz == pytest.approx(m.lipschitz_bound())
    with torch.no_grad():
        z = m(x).double()
    wn = m.head_weight().double()
    for i in range(37):
        zi, yi = z[i], int(y[i])
        others = [j for j in range(4) if j != yi]
        margin = min(zi[yi] - zi[j] for j in others)
        if margin <= 0:
            assert c.radius[i] == 0 and not c.correct[i]
            continue
        r = min((zi[yi] - zi[j]) / (c.lipschitz * (wn[yi] - wn[j]).norm()) for j in others)
        assert c.radius[i].item() == pytest.approx(r.item(), rel=1e-5)


@pytest.mark.parametrize("y,err", [
    (torch.tensor([0, 1]), "3 labels"),
    (torch.tensor([0.0, 1.0, 2.0]), "integers"),
    (torch.tensor([0, 1, 9]), r"\[0, 3\]"),
    (torch.tensor([-1, 1, 2]), r"\[0, 3\]"),
])
def test_bad_labels_are_refused(y, err):
    m = lipnext.create_model("lipnext_l4w64", num_classes=4, image_size=8, patch_size=2)
    with pytest.raises((ValueError, TypeError), match=err):
        lipnext.certify(m, torch.rand(3, 3, 8, 8), y)
