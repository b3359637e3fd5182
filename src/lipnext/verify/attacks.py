"""Check (c): attack every certified point inside its certified radius.

Two attacks of different kinds, both on the FULL model (float32 logits, as deployed):

* ``pgd_attack``: projected gradient ascent (Madry et al.) on the CW margin
  max_{j != y} z_j - z_y in the L2 ball ||delta|| <= r (a radius per point), step
  2.5 r / steps along the normalised gradient, random restarts (the first from x).
* ``ddn_attack``: a minimum-norm attack, Decoupled Direction and Norm (Rony et al.,
  2019): a step along the cross-entropy gradient, then a projection onto the sphere
  of radius eps_k, with eps_k shrunk by (1 - gamma) while the point is adversarial
  and grown by (1 + gamma) otherwise. It returns the smallest adversarial distance
  found, so one run gives the empirical robust accuracy at every eps.

With ``box=True`` iterates are also clipped to the image box [0, 1] (this only
shrinks the feasible set: the certificate holds in all of R^n); ``box=False``
attacks in R^n. A *counterexample* is a point certified at radius r with a point x'
(||x' - x|| <= radius_scale * r, re-checked) whose float32 prediction is not y.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..certify import Certificate
from .report import CheckResult

__all__ = ["pgd_attack", "ddn_attack", "attack_certified"]


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


def _project(x: torch.Tensor, delta: torch.Tensor, radius: torch.Tensor, box: bool) -> torch.Tensor:
    """Onto the ball ||delta|| <= r, then (box) x + delta into [0, 1]; clipping keeps the ball."""
    n = _norm(delta)
    delta = delta * _expand(torch.where(n > radius, radius / n.clamp_min(1e-30), 1.0), delta)
    return (x + delta).clamp(0, 1) - x if box else delta


def _margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y (> 0 iff some other class wins)."""
    return z.scatter(1, y[:, None], -math.inf).amax(1) - z.gather(1, y[:, None]).squeeze(1)


def _frozen(model):
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    return flags


def _restore(model, flags, training):
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    model.train(training)


def pgd_attack(model, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor | float,
               steps: int = 100, restarts: int = 5, box: bool = True,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, success): L2 PGD on the margin loss within ||x_adv - x|| <= radius."""
    x = x.float()
    radius = torch.as_tensor(radius, dtype=torch.float32, device=x.device).expand(x.shape[0]).clone()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_adv, success = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    training, flags = model.training, _frozen(model)
    model.eval()
    try:
        for restart in range(restarts):
            idx = (~success).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xi, yi, ri = x[idx], y[idx], radius[idx]
            if restart == 0:
                delta = torch.zeros_like(xi)
            else:
                u = torch.randn(xi.shape, generator=gen).to(xi)
                scale = ri * torch.rand(len(idx), generator=gen).to(xi)
                delta = _project(xi, _expand(scale / _norm(u).clamp_min(1e-30), u) * u, ri, box)
            alpha = _expand(2.5 * ri / max(steps, 1), xi)
            found = torch.zeros(len(idx), dtype=torch.bool, device=x.device)
            for t in range(steps + 1):
                delta.requires_grad_(True)
                z = model(xi + delta)
                adv = (z.argmax(1) != yi) & ~found
                if adv.any():
                    x_adv[idx[adv]] = (xi + delta).detach()[adv]
                    found |= adv
                if t == steps or found.all():
                    break
                g, = torch.autograd.grad(_margin(z, yi).sum(), [delta])
                with torch.no_grad():
                    g = g / _expand(_norm(g).clamp_min(1e-30), g)
                    delta = _project(xi, delta + alpha * g, ri, box)
            success[idx[found]] = True
    finally:
        _restore(model, flags, training)
    return x_adv, success


def ddn_attack(model, x: torch.Tensor, y: torch.Tensor, steps: int = 200, init_norm: float = 1.0,
               gamma: float = 0.05, alpha: float = 1.0, box: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, dist): DDN minimum-norm attack; dist = inf where nothing adversarial was found."""
    x = x.float()
    n = x.shape[0]
    delta = torch.zeros_like(x)
    eps = torch.full((n,), init_norm, device=x.device)
    best = torch.full((n,), math.inf, device=x.device)
    x_adv = x.clone()
    training, flags = model.training, _frozen(model)
    model.eval()
    try:
        for t in range(steps + 1):
            delta.requires_grad_(True)
            z = model(x + delta)
            with torch.no_grad():
                adv = z.argmax(1) != y
                dist = _norm(delta)
                better = adv & (dist < best)
                best = torch.where(better, dist, best)
                x_adv[better] = (x + delta)[better]
            if t == steps:
                break
            g, = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), [delta])
            with torch.no_grad():
                lr = alpha * 0.5 * (1 + math.cos(math.pi * t / steps)) + 1e-3
                delta = delta + lr * g / _expand(_norm(g).clamp_min(1e-30), g)
                eps = torch.where(adv, torch.minimum(eps, dist) * (1 - gamma), eps * (1 + gamma))
                dn = _norm(delta)
                delta = delta * _expand(eps / dn.clamp_min(1e-30), delta)
                if box:
                    delta = (x + delta).clamp(0, 1) - x
    finally:
        _restore(model, flags, training)
    return x_adv, best


@torch.no_grad()
def _predict(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size].float()).argmax(1)
                          for i in range(0, x.shape[0], batch_size)])
    finally:
        model.train(training)


def _batched(fn, batch_size: int, *tensors):
    outs = [fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, tensors[0].shape[0], batch_size)]
    return tuple(torch.cat(o) for o in zip(*outs))


def attack_certified(model, x: torch.Tensor, y: torch.Tensor, certificate: Certificate,
                     eps: Sequence[float] = (), steps: int = 100, restarts: int = 5,
                     ddn_steps: int = 200, era_restarts: int = 1, box: bool = True,
                     radius_scale: float = 1.0, batch_size: int = 256, seed: int = 0) -> CheckResult:
    """Attack each certified point within radius_scale * its certified radius (PGD + DDN).

    Fails when some prediction changes inside a certified ball (counterexample) or
    when the empirical robust accuracy at some eps falls below the CRA. Reports, at
    each eps, CRA, the empirical robust accuracy (ERA: correct and neither attack
    succeeds within eps) and the gap ERA - CRA.
    """
    if len(certificate) != x.shape[0]:
        raise ValueError(f"the certificate has {len(certificate)} points but x has {x.shape[0]}")
    device = next(model.parameters()).device
    x, y = x.to(device, torch.float32), y.to(device).long()
    dim = x[0].numel()
    radius = certificate.radius.to(device).float()
    cert_idx = (certificate.correct.to(device) & (radius > 0)).nonzero().squeeze(1)
    cap = 2 * math.sqrt(dim)  # beyond the diameter of the box; caps infinite radii
    r_att = (radius[cert_idx] * radius_scale).clamp(max=cap)
    cex = []

    def record(kind: str, i: int, xa: torch.Tensor, r: float):
        dist = (xa - x[i]).norm().item()
        pred = int(_predict(model, xa[None], 1)[0])
        if pred != int(y[i]) and dist <= r * (1 + 1e-6):
            cex.append({"index": int(i), "attack": kind, "certified_radius": float(certificate.radius[i]),
                        "distance": dist, "prediction": pred, "label": int(y[i])})

    # 1. PGD at each certified point's own radius.
    if cert_idx.numel():
        xa, ok = _batched(lambda a, b, r: pgd_attack(model, a, b, r, steps, restarts, box, seed),
                          batch_size, x[cert_idx], y[cert_idx], r_att)
        for k in ok.nonzero().squeeze(1).tolist():
            record("pgd", int(cert_idx[k]), xa[k], float(r_att[k]))
    # 2. DDN minimum-norm attack on every correctly classified point.
    pred = _predict(model, x, batch_size)
    correct = pred == y
    dist = torch.full((x.shape[0],), math.inf, device=device)
    cidx = correct.nonzero().squeeze(1)
    if cidx.numel():
        xd, dd = _batched(lambda a, b: ddn_attack(model, a, b, ddn_steps, box=box), batch_size,
                          x[cidx], y[cidx])
        dist[cidx] = dd
        pos = {int(i): k for k, i in enumerate(cidx.tolist())}
        for k, i in enumerate(cert_idx.tolist()):
            if i in pos and dd[pos[i]] <= r_att[k]:
                record("ddn", i, xd[pos[i]], float(r_att[k]))
    # 3. Empirical robust accuracy at each eps: PGD at eps on the points DDN did not break.
    per_eps = {}
    for e in eps:
        alive = (correct & (dist > e)).nonzero().squeeze(1)
        robust = torch.zeros_like(correct)
        if alive.numel():
            xa, ok = _batched(lambda a, b: pgd_attack(model, a, b, float(e), steps, era_restarts, box, seed),
                              batch_size, x[alive], y[alive])
            robust[alive[~ok]] = True
            cert_e = certificate.certified(float(e)).to(device)
            for k in (ok & cert_e[alive]).nonzero().squeeze(1).tolist():
                record("pgd@eps", int(alive[k]), xa[k], float(e))
        era, cra = robust.double().mean().item(), certificate.cra(float(e))
        per_eps[f"{e:.6g}"] = {"eps": float(e), "cra": cra, "era": era, "gap": era - cra,
                               "broken_by_ddn": int((correct & (dist <= e)).sum())}
    seen, unique = set(), []
    for c in cex:
        if c["index"] not in seen:
            seen.add(c["index"])
            unique.append(c)
    below = [k for k, v in per_eps.items() if v["era"] < v["cra"]]
    finite = dist[torch.isfinite(dist)]
    details = {"points": int(x.shape[0]), "certified_points_attacked": int(cert_idx.numel()),
               "counterexamples": len(unique), "examples": unique[:20], "box": "[0, 1]" if box else "none",
               "radius_scale": radius_scale, "pgd_steps": steps, "pgd_restarts": restarts,
               "ddn_steps": ddn_steps, "era_pgd_restarts": era_restarts, "clean_accuracy_fp32":
               correct.double().mean().item(), "ddn_median_distance":
               finite.median().item() if finite.numel() else None, "per_eps": per_eps}
    summary = (f"{int(cert_idx.numel())} certified points attacked at {radius_scale:g} x their radius "
               f"(PGD {steps} steps x {restarts} restarts + DDN {ddn_steps} steps, box "
               f"{'[0,1]' if box else 'none'}): {len(unique)} counterexamples")
    if per_eps:
        summary += "; CRA/ERA " + ", ".join(f"@{k}: {100 * v['cra']:.1f}/{100 * v['era']:.1f}%"
                                             for k, v in per_eps.items())
    ok = not unique and not below
    if below:
        summary += f"; ERA below CRA at eps {below}"
    return CheckResult("attack", ok, summary, details)
