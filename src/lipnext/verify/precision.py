"""Check (d): floating-point safety of the certificates.

The certificates that ``lipnext.certify`` issues (trunk in float32, with its rounding
guard) are compared with certificates computed entirely in float64 on a float64
copy of the model, without a guard. Required:

* the float64 path really computes in float64 (if every float64 feature is exactly
  a float32 number, some layer rounds to float32 and the reference is not one);
* no point is certified in float32 at a larger radius than in float64, hence none is
  certified at a reported eps in float32 but not in float64;
* the predictions agree wherever the float64 margin exceeds the guard.

Reported: the largest radius discrepancy, and the measured rounding error kappa.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..certify import GUARD_SAFETY, Certificate, certified_radius, certify, rounding_error
from .report import CheckResult

__all__ = ["precision_check", "certify_float64"]


@torch.no_grad()
def certify_float64(model, x: torch.Tensor, y: torch.Tensor, rule: str = "pairwise",
                    batch_size: int = 512):
    """(Certificate, features) of a float64 copy of ``model``: trunk and head in float64."""
    m64 = copy.deepcopy(model).double().eval()
    device = next(m64.parameters()).device
    lip = float(m64.lipschitz_bound())
    certs, feats = [], []
    with torch.autocast(device.type, enabled=False):
        for i in range(0, max(x.shape[0], 1), batch_size):
            f = m64.forward_features(x[i:i + batch_size].to(device, torch.float64))
            feats.append(f)
            certs.append(certified_radius(m64.forward_head(f), y[i:i + batch_size].to(device),
                                          m64.head_weight(), lip, rule))
    return Certificate.cat(certs), torch.cat(feats)


def precision_check(model, x: torch.Tensor, y: torch.Tensor,
                    eps: Sequence[float] = (36 / 255, 72 / 255, 108 / 255),
                    rule: str = "pairwise", batch_size: int = 512) -> CheckResult:
    """Float32 (guarded) certificates against float64 ones; fails on any unsafe point."""
    c32 = certify(model, x, y, rule=rule, batch_size=batch_size)
    c64, f64 = certify_float64(model, x, y, rule, batch_size)
    genuine = not bool((f64.float().double() == f64).all())
    both = c32.correct & c64.correct
    diff = (c32.radius - c64.radius).abs()[both]
    over = (c32.radius > c64.radius) & c32.correct
    per_eps = {}
    for e in eps:
        unsafe = c32.certified(float(e)) & ~c64.certified(float(e))
        per_eps[f"{e:.6g}"] = {"cra_fp32": c32.cra(float(e)), "cra_fp64": c64.cra(float(e)),
                               "certified_fp32_not_fp64": int(unsafe.sum())}
    pred_diff = int((c32.correct & ~c64.correct).sum())
    kappa = rounding_error(model, x[: min(len(x), 256)])
    details = {"points": len(c32), "float64_reference_genuine": genuine,
               "max_radius_discrepancy": diff.max().item() if diff.numel() else 0.0,
               "fp32_radius_above_fp64": int(over.sum()), "correct_fp32_not_fp64": pred_diff,
               "measured_relative_rounding_error": kappa, "guard_safety_factor": GUARD_SAFETY,
               "lipschitz_fp32": c32.lipschitz, "lipschitz_fp64": c64.lipschitz, "per_eps": per_eps}
    problems = []
    if not genuine:
        problems.append("the float64 copy of the model rounds to float32 somewhere (its features "
                        "are all float32 numbers): no float64 reference")
    if over.any():
        problems.append(f"{int(over.sum())} points have a larger float32 radius than float64")
    if pred_diff:
        problems.append(f"{pred_diff} points are correct in float32 but not in float64")
    unsafe_total = sum(v["certified_fp32_not_fp64"] for v in per_eps.values())
    if unsafe_total:
        problems.append(f"{unsafe_total} (point, eps) certified in float32 but not in float64")
    summary = (f"float32 vs float64 certificates on {len(c32)} points: max radius discrepancy "
               f"{details['max_radius_discrepancy']:.2e}, measured relative rounding error "
               f"{kappa:.2e}, 0 float32 radii above float64" if not problems else "; ".join(problems))
    return CheckResult("precision", not problems, summary, details)
