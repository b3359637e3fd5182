"""Check (b): the claimed bounds against the model as it computes.

* Trunk: an empirical lower bound of Lip(f), f = forward_features, by gradient
  ascent over input pairs (a, b) of

      ratio(a, b) = ||f(a) - f(b)||_2 / ||a - b||_2,

  started at data points (and, every other restart, far out along the rays from the
  data mean) with separations from ``min_dist`` to 1 (one per restart),
  with ||a - b|| kept >= ``min_dist`` so that float32 noise cannot fake a large ratio;
  the best pairs are re-evaluated in float64 by the model's float64 twin (``lipnext.program``,
  the trunk certification computes; float32 ratios for a model without one). Any ratio is a
  lower bound of Lip(f) (over all of R^n, no box), so it must not exceed
  ``lipschitz_bound()``.
* Head: certification assumes z = forward_head(f) = W f + b with W = head_weight().
  Checked on data features and random ones in float64:
  forward_head(F) - forward_head(0) = F W^T, and forward(x) = forward_head(forward_features(x)).
"""
from __future__ import annotations

import math

import torch

from ..bounds import pairwise_distances
from ..modes import evaluating, frozen
from ..program import float64_twin_or_none
from .report import CheckResult

__all__ = ["empirical_lipschitz", "head_check"]


def _ratio(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    num = (model.forward_features(a) - model.forward_features(b)).flatten(1).norm(dim=1)
    return num / (a - b).flatten(1).norm(dim=1)


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (g.dim() - 1))


def empirical_lipschitz(model, x: torch.Tensor, steps: int = 200, restarts: int = 4,
                        step_size: float = 0.05, min_dist: float = 1e-2, rtol: float = 1e-3,
                        far_scale: float = 10.0, seed: int = 0) -> CheckResult:
    """Largest ||f(a) - f(b)|| / ||a - b|| found; fails if above lipschitz_bound() (1 + rtol).

    Normalised gradient ascent on log ratio: a moves by ``step_size`` (L2, cosine
    decay), the separation d = b - a by ``step_size`` times its own length. Even
    restarts start at the data points with random d; odd ones at the points pushed
    ``far_scale`` times further from the data mean, with d along that ray (where the
    biases matter least, a positively homogeneous trunk is at its steepest).
    """
    if x.shape[0] == 0:
        raise ValueError("empirical_lipschitz needs at least one input point")
    claimed = float(model.lipschitz_bound())
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.to(device, torch.float32)
    n = x.shape[0]
    scales = torch.logspace(torch.log10(torch.tensor(min_dist)).item(), 0.0, max(restarts, 1))
    a = x.repeat(restarts, 1, 1, 1).clone()
    d = _unit(torch.randn(a.shape, generator=gen).to(device))
    far = (torch.arange(restarts) % 2 == 1).repeat_interleave(n).to(device)
    if far.any():  # odd restarts: points far out along the rays from the data mean, d radial
        center = x.mean(dim=(0, 2, 3), keepdim=True)
        a[far] = center + far_scale * (a[far] - center)
        d[far] = _unit(a[far] - center)
    d = d * scales.repeat_interleave(n).view(-1, 1, 1, 1).to(device)
    best = torch.full((a.shape[0],), -1.0, device=device)
    best_a, best_d = a.clone(), d.clone()
    validate = getattr(model, "validate_inputs", None)  # the ascent leaves [0, 1] on purpose:
    try:                                                 # no pixel-range warning for it
        if validate is not None:
            model.validate_inputs = False
        with evaluating(model), frozen(model):
            for t in range(steps + 1):
                a.requires_grad_(True)
                d.requires_grad_(True)
                r = _ratio(model, a, a + d)
                ga, gd = torch.autograd.grad(torch.log(r.clamp_min(1e-30)).sum(), [a, d])
                with torch.no_grad():
                    better = r > best
                    best = torch.where(better, r, best)
                    best_a[better], best_d[better] = a[better], d[better]
                    lr = step_size * 0.5 * (1 + math.cos(math.pi * t / max(steps, 1)))
                    nd = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                    a = a + lr * _unit(ga)
                    d = d + lr * nd * _unit(gd)
                    nd = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                    d = d * torch.where(nd < min_dist, min_dist / nd.clamp_min(1e-30), 1.0)
            with torch.no_grad():   # the best pairs again, by the float64 twin if there is one
                twin = float64_twin_or_none(model)
                r64 = (_ratio(twin, best_a.double(), (best_a + best_d).double()) if twin is not None
                       else best.double())
                by = "float64 twin" if twin is not None else "float32 model (no float64 program)"
                del twin
    finally:
        if validate is not None:
            model.validate_inputs = validate
    k = int(r64.argmax())
    value = r64[k].item()
    per_restart = r64.view(restarts, n).amax(dim=1).tolist()
    details = {"empirical": value, "claimed": claimed, "ratio": value / claimed, "rtol": rtol,
               "steps": steps, "restarts": restarts, "points": n, "min_dist": min_dist,
               "best_per_restart": per_restart, "separations": scales.tolist(),
               "best_pair_distance": best_d[k].norm().item(), "box": "none (all of R^n)",
               "reevaluated_by": by}
    ok = value <= claimed * (1 + rtol)
    summary = (f"empirical Lip(trunk) >= {value:.6f} vs claimed L = {claimed:.6f} "
               f"(ratio {value / claimed:.4f}; {n} points x {restarts} restarts x {steps} steps)")
    if not ok:
        summary += " -- the claimed bound is NOT an upper bound: certificates are unsound"
    return CheckResult("empirical_lipschitz", ok, summary, details)


@torch.no_grad()
def head_check(model, x: torch.Tensor, num_random: int = 64, rtol: float = 1e-6,
               seed: int = 0) -> CheckResult:
    """forward_head is the affine map with weight head_weight(); forward = head o trunk."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with evaluating(model):
        x = x.to(device, torch.float32)
        f = model.forward_features(x).double()
        w = model.head_weight().detach().double().to(device)
        rand = torch.randn(num_random, f.shape[1], generator=gen, dtype=torch.float64).to(device)
        rand = rand * f.norm(dim=1).mean() / rand.norm(dim=1, keepdim=True)
        feats = torch.cat([f, rand, 10 * rand])
        z = model.forward_head(feats)
        dtype_ok = z.dtype == torch.float64
        b = model.forward_head(torch.zeros(1, f.shape[1], dtype=torch.float64, device=device))
        lin = feats @ w.mT
        head_err = ((z.double() - b.double()) - lin).abs().max().item()
        head_scale = lin.abs().max().item() + 1e-12
        full = model(x).double()
        split = model.forward_head(model.forward_features(x).float()).double()
        comp_err = (full - split).abs().max().item()
        comp_scale = full.abs().max().item() + 1e-12
    norms = w.norm(dim=1)
    ok_head = head_err <= rtol * head_scale
    ok_comp = comp_err <= 1e-5 * comp_scale
    details = {"affine_error": head_err, "affine_rel_error": head_err / head_scale,
               "composition_error": comp_err, "composition_rel_error": comp_err / comp_scale,
               "float64_head": dtype_ok, "row_norm_min": norms.min().item(),
               "row_norm_max": norms.max().item(),
               "max_pair_distance": pairwise_distances(w).max().item()}
    problems = []
    if not ok_head:
        problems.append(f"forward_head(f) - forward_head(0) differs from f @ head_weight().T by "
                        f"{head_err:.3g} (relative {head_err / head_scale:.2e}): the head used in "
                        "the forward pass is not the one certification uses")
    if not ok_comp:
        problems.append(f"forward(x) differs from forward_head(forward_features(x)) by {comp_err:.3g}")
    if not dtype_ok:
        problems.append(f"forward_head returned {z.dtype} for float64 features (must be float64)")
    summary = (f"head affine with weight head_weight() (rel. error {head_err / head_scale:.1e}), "
               f"forward = head(trunk) (rel. error {comp_err / comp_scale:.1e}), "
               f"row norms [{norms.min().item():.4f}, {norms.max().item():.4f}]")
    if problems:
        summary = "; ".join(problems)
    return CheckResult("head", not problems, summary, details)
