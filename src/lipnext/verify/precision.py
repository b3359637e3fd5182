"""Check (d): floating-point safety of the certificates.

``lipnext.certify`` runs the model's float64 twin (``lipnext.rounding``) with an a-priori
rounding bound. Checked here, on all points:

* the twin really computes in float64 (if every feature were a float32 number, some
  step would round to float32) and computes the model: its features agree with the
  model's own float32 forward pass to 1e-4 relative (else the program is not the model);
* the proven certificates are never larger than the exact-arithmetic formula on the
  twin's logits, hence no point is certified at a reported eps by the former only;
* reported: the largest radius reduction due to the rounding bound, and how many points
  the float32 forward pass (as deployed) classifies differently from the twin.

``fft_error_constant`` measures the constant of the FFT error bound that the BRO step
assumes (an assumption about the FFT library, docs/RELIABILITY.md).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..certify import Certificate, _radii, certify
from ..modes import evaluating, standard_numerics
from ..program import float64_twin
from ..rounding import FFT_CONSTANT
from .report import CheckResult

__all__ = ["certify_float64", "fft_error_constant", "precision_check"]


@torch.no_grad()
def certify_float64(model, x: torch.Tensor, y: torch.Tensor, rule: str = "pairwise",
                    batch_size: int = 512) -> tuple[Certificate, torch.Tensor]:
    """(Certificate, features) from the float64 twin by the exact-arithmetic formula (no allowance):
    the reference the proven radii must never exceed (``numerics='exact-formula'``, not a certificate)."""
    twin = float64_twin(model)
    with standard_numerics(model):
        lip = float(model.lipschitz_bound())
        device = twin.weight.device
        certs, feats = [], []
        for i in range(0, max(x.shape[0], 1), batch_size):
            f = twin.forward_features(x[i:i + batch_size].to(device, torch.float64))
            feats.append(f)
            certs.append(_radii(twin.forward_head(f), y[i:i + batch_size].to(device), twin.weight,
                                lip, rule, None, "exact-formula"))
    return Certificate.cat(certs), torch.cat(feats)


@torch.no_grad()
def _float32_features(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    with standard_numerics(model):
        return torch.cat([model.forward_features(x[i:i + batch_size].to(device, torch.float32)).double()
                          for i in range(0, x.shape[0], batch_size)])


def precision_check(model, x: torch.Tensor, y: torch.Tensor,
                    eps: Sequence[float] = (36 / 255, 72 / 255, 108 / 255),
                    rule: str = "pairwise", batch_size: int = 512) -> CheckResult:
    """Proven (float64 twin + bound) certificates against the formula; fails on any unsafe point."""
    with evaluating(model):
        proven = certify(model, x, y, rule=rule, batch_size=batch_size)
        formula, f64 = certify_float64(model, x, y, rule, batch_size)
        f32 = _float32_features(model, x, batch_size)
        z32 = model.forward_head(f32.float().to(next(model.parameters()).device)).argmax(1).cpu()
    genuine = not bool((f64.float().double() == f64).all())
    rel = ((f32.to(f64) - f64).norm(dim=1) / f64.norm(dim=1).clamp_min(1e-30)).max().item()
    over = (proven.radius > formula.radius) & proven.correct
    reduction = (formula.radius - proven.radius)[proven.correct & (proven.radius > 0)]
    per_eps = {}
    for e in eps:
        unsafe = proven.certified(float(e)) & ~formula.certified(float(e))
        per_eps[f"{e:.6g}"] = {"cra": proven.cra(float(e)), "cra_formula": formula.cra(float(e)),
                               "certified_not_by_formula": int(unsafe.sum())}
    disagree = int((z32 != proven.predictions).sum())
    details = {"points": len(proven), "float64_twin_genuine": genuine,
               "twin_vs_float32_features_rel": rel,
               "max_radius_reduction": reduction.max().item() if reduction.numel() else 0.0,
               "radius_above_formula": int(over.sum()),
               "float32_prediction_differs": disagree,
               "float32_prediction_differs_certified": int(((z32 != proven.predictions) & (proven.radius > 0)).sum()),
               "lipschitz": proven.lipschitz, "per_eps": per_eps}
    problems = []
    if not genuine:
        problems.append("the float64 twin rounds to float32 somewhere (its features are all float32 numbers)")
    if not rel < 1e-4:
        problems.append(f"the float64 twin differs from the model's float32 forward by {rel:.2e} (relative): "
                        "its program is not the model")
    if over.any():
        problems.append(f"{int(over.sum())} proven radii exceed the exact-arithmetic formula")
    unsafe_total = sum(v["certified_not_by_formula"] for v in per_eps.values())
    if unsafe_total:
        problems.append(f"{unsafe_total} (point, eps) certified but not by the formula")
    summary = (f"float64 twin on {len(proven)} points: genuine, agrees with the float32 model to {rel:.1e}; "
               f"rounding bound lowers radii by at most {details['max_radius_reduction']:.1e}; "
               f"float32 forward differs from the twin on {disagree} points" if not problems
               else "; ".join(problems))
    return CheckResult("precision", not problems, summary, details)


def fft_error_constant(device: str | torch.device = "cpu", grids: Sequence[tuple[int, int]] = (
        (4, 4), (7, 5), (8, 8), (14, 14), (16, 16), (28, 28), (32, 32), (56, 56), (64, 64)),
        channels: int = 8, trials: int = 4, seed: int = 0) -> dict:
    """The measured constant c of the FFT bound the BRO step assumes (``rounding.FFT_CONSTANT``):
    max over grids and inputs of ||fl(F x) - F x|| / (u (log2 N + 1) ||x||) for torch's float64
    rfft2 and irfft2 (orthonormal) on ``device``, against numpy's long-double FFT (64-bit
    mantissa: its own error is below 1e-3 of a float64 one). Inputs: Gaussian, constant, impulse."""
    import numpy as np
    gen = torch.Generator().manual_seed(seed)
    worst: dict[str, float] = {"rfft2": 0.0, "irfft2": 0.0}
    for n1, n2 in grids:
        scale = 2.0 ** -53 * (math.log2(n1 * n2) + 1)
        inputs = [torch.randn(channels, n1, n2, generator=gen, dtype=torch.float64) for _ in range(trials)]
        inputs += [torch.ones(channels, n1, n2, dtype=torch.float64),
                   torch.zeros(channels, n1, n2, dtype=torch.float64).index_fill_(-1, torch.tensor([0]), 1.0)]
        for x in inputs:
            ref = np.fft.rfft2(x.numpy().astype(np.longdouble), norm="ortho")
            got = torch.fft.rfft2(x.to(device), norm="ortho").cpu().numpy().astype(np.clongdouble)
            worst["rfft2"] = max(worst["rfft2"], float(np.linalg.norm(got - ref) / (scale * np.linalg.norm(
                x.numpy().astype(np.longdouble)))))
            spec = torch.fft.rfft2(x, norm="ortho")
            ref_i = np.fft.irfft2(spec.numpy().astype(np.clongdouble), s=(n1, n2), norm="ortho")
            got_i = torch.fft.irfft2(spec.to(device), s=(n1, n2), norm="ortho").cpu().numpy().astype(np.longdouble)
            worst["irfft2"] = max(worst["irfft2"], float(np.linalg.norm(got_i - ref_i) / (scale * np.linalg.norm(
                spec.numpy().astype(np.clongdouble)) * math.sqrt(2))))
    return {"device": str(device), "grids": [list(g) for g in grids], "constant": worst,
            "assumed": FFT_CONSTANT}
