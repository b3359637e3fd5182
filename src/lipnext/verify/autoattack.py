"""Check (e): AutoAttack as a cross-check of the certificates (``lipnext verify --autoattack``).

The standard L2 AutoAttack (Croce & Hein 2020) from torchattacks (extra ``attacks``):
APGD-CE, APGD-T, FAB-T and Square (5,000 queries), each on the points the previous ones
left, in the image box [0, 1], on the float32 model as deployed. At every certified eps it
gives the AutoAttack robust accuracy: the share of points classified correctly whose
attacked image x' (with ||x' - x|| <= eps) is still classified correctly. A certificate
at eps says no such x' exists, so

    AutoAttack accuracy >= CRA  at every eps,

and more precisely no point certified at eps may be broken within eps. A point broken at
eps stays broken at every larger eps (the same x' lies in the larger ball), so each eps
attacks only the points still robust at the one before. A broken certified point is
re-checked by the float64 twin (the predictions the certificate covers): a counterexample
when the twin also misclassifies x', a float32-only flip otherwise. The check fails on any
counterexample or any eps where AutoAttack accuracy < CRA.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..certify import Certificate
from ..modes import evaluating, frozen
from ..program import float64_twin_or_none
from .library import _Float32
from .report import CheckResult

__all__ = ["autoattack_check", "AUTOATTACK_ATTACKS"]

AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
_TOL = 1e-6    # relative slack on ||x' - x|| <= eps for the attacks' own rounding


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1)


def autoattack_check(model, x: torch.Tensor, y: torch.Tensor, certificate: Certificate,
                     eps: Sequence[float], batch_size: int = 256, seed: int = 0,
                     progress: bool = False) -> CheckResult:
    """Run standard L2 AutoAttack at every eps on (x, y) and compare with ``certificate`` (module doc)."""
    from ..extras import require

    torchattacks = require("torchattacks", "AutoAttack (lipnext verify --autoattack)")
    if len(certificate) != x.shape[0]:
        raise ValueError(f"the certificate covers {len(certificate)} points but x has {x.shape[0]}")
    device = next(model.parameters()).device
    x, y = x.to(device, torch.float32), y.to(device).long()
    wrapped = _Float32(model).eval()
    twin = float64_twin_or_none(model)
    with torch.no_grad(), evaluating(model):
        robust = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]) == y
    clean = robust.double().mean().item()
    per_eps, cex, float32_only, outside = {}, [], 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(eps), desc="autoattack", unit="eps")
    start = time.perf_counter()
    for e in sorted(float(v) for v in eps):
        t0 = time.perf_counter()
        alive = robust.nonzero().squeeze(1)
        attacked = int(alive.numel())
        certified = certificate.certified(e).to(device)
        for i in range(0, attacked, batch_size):
            idx = alive[i:i + batch_size]
            atk = torchattacks.AutoAttack(wrapped, norm="L2", eps=e, version="standard",
                                          n_classes=int(model.num_classes), seed=seed)
            with frozen(model):
                xa = atk(x[idx], y[idx]).detach()
            with torch.no_grad(), evaluating(model):
                wrong = model(xa).argmax(1) != y[idx]
            inside = _norm(xa - x[idx]) <= e * (1 + _TOL)
            outside += int((wrong & ~inside).sum())
            broken = wrong & inside
            robust[idx[broken]] = False
            for k in (broken & certified[idx]).nonzero().squeeze(1).tolist():
                j = int(idx[k])
                with torch.no_grad():
                    pred = int(twin(xa[k:k + 1].double()).argmax(1)[0]) if twin is not None else -1
                if twin is not None and pred == int(y[j]):
                    float32_only += 1
                    continue
                cex.append({"index": j, "eps": e, "certified_radius": float(certificate.radius[j]),
                            "distance": float(_norm(xa[k:k + 1] - x[j:j + 1])[0]), "label": int(y[j]),
                            "prediction": pred})
        acc, cra = robust.double().mean().item(), certificate.cra(e)
        per_eps[f"{e:.6g}"] = {"eps": e, "autoattack_acc": acc, "cra": cra, "gap": acc - cra,
                               "attacked": attacked, "seconds": round(time.perf_counter() - t0, 2)}
        if bar is not None:
            bar.update(1)
            bar.write(f"autoattack eps {e:.4g}: AutoAttack {100 * acc:.1f}%  CRA {100 * cra:.1f}%")
    if bar is not None:
        bar.close()
    below = [k for k, v in per_eps.items() if v["autoattack_acc"] < v["cra"]]
    details = {"version": "standard", "norm": "L2", "attacks": list(AUTOATTACK_ATTACKS),
               "library": f"torchattacks {getattr(torchattacks, '__version__', '')}".strip(),
               "points": int(x.shape[0]), "clean_accuracy_fp32": clean, "per_eps": per_eps,
               "counterexamples": len(cex), "examples": cex[:20], "float32_only_flips": float32_only,
               "adversarial_outside_ball": outside, "seed": seed, "seconds": round(time.perf_counter() - start, 2)}
    summary = (f"standard L2 AutoAttack ({', '.join(AUTOATTACK_ATTACKS)}) on {x.shape[0]} points: AutoAttack/CRA "
               + ", ".join(f"@{k}: {100 * v['autoattack_acc']:.1f}/{100 * v['cra']:.1f}%" for k, v in per_eps.items()))
    if below:
        summary += f"; CRITICAL: AutoAttack accuracy below CRA at eps {below}"
    if cex:
        summary += f"; CRITICAL: {len(cex)} certified points broken inside their radius"
    if float32_only:
        summary += f"; {float32_only} float32-only flips of certified points (the float64 twin holds)"
    return CheckResult("autoattack", not below and not cex, summary, details)
