"""Check (c): attack every certified point inside its certified radius.

Hand-written attacks of two kinds (with torchattacks' APGD and FAB added by
``attack_certified`` when installed, see ``library``), on the FULL model (float32 logits):

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
(||x' - x|| <= radius_scale * r, re-checked) whose prediction by the float64 twin (the
predictions the certificate covers, ``lipnext.program``) is not y; float32-only flips
are counted apart. The tightness of a certified point is the distance of the closest
adversarial example found (any attack) divided by its certified radius.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..certify import Certificate
from ..modes import evaluating, frozen
from ..program import float64_twin_or_none
from .library import apgd_attack, fab_attack, library_available
from .report import CheckResult

__all__ = ["pgd_attack", "ddn_attack", "attack_certified", "tightness", "Progress"]


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


def pgd_attack(model, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor | float,
               steps: int = 100, restarts: int = 5, box: bool = True,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, success): L2 PGD on the margin loss within ||x_adv - x|| <= radius."""
    x = x.float()
    radius = torch.as_tensor(radius, dtype=torch.float32, device=x.device).expand(x.shape[0]).clone()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_adv, success = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with evaluating(model), frozen(model):
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
    with evaluating(model), frozen(model):
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
    return x_adv, best


@torch.no_grad()
def _predict(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with evaluating(model):
        return torch.cat([model(x[i:i + batch_size].float()).argmax(1)
                          for i in range(0, x.shape[0], batch_size)])


def _batched(fn, batch_size: int, *tensors, bar: "Progress | None" = None):
    """fn on consecutive batches, concatenated; with a Progress, stops once its time is up
    (the outputs then cover only the first points)."""
    outs = []
    for i in range(0, tensors[0].shape[0], batch_size):
        if bar is not None and bar.out_of_time():
            break
        outs.append(fn(*(t[i:i + batch_size] for t in tensors)))
        if bar is not None:
            bar.update(min(batch_size, tensors[0].shape[0] - i))
    if not outs:
        return None
    return tuple(torch.cat(o) for o in zip(*outs))


class Progress:
    """A tqdm bar per attack phase (if ``show``) and a shared deadline (monotonic seconds)."""

    def __init__(self, show: bool = False, deadline: float | None = None):
        self.show, self.deadline, self._bar, self.truncated = show, deadline, None, False

    def phase(self, name: str, total: int) -> "Progress":
        self.close()
        if self.show:
            from ..progress import progress      # a bar on a terminal, lines in a log
            self._bar = progress(total, f"verify: {name}", unit="pt", leave=False)
        return self

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def out_of_time(self) -> bool:
        late = self.deadline is not None and time.monotonic() > self.deadline
        self.truncated |= late
        return late

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def attack_certified(model, x: torch.Tensor, y: torch.Tensor, certificate: Certificate,
                     eps: Sequence[float] = (), steps: int = 100, restarts: int = 5,
                     ddn_steps: int = 200, era_restarts: int = 1, box: bool = True,
                     radius_scale: float = 1.0, batch_size: int = 256, seed: int = 0,
                     library: bool | None = None, progress: Progress | None = None) -> CheckResult:
    """Attack each certified point within radius_scale * its certified radius.

    Hand-written PGD at each point's radius and DDN (minimum norm); with torchattacks
    (``library`` None: when installed, box only) also APGD-CE and APGD-DLR at the radius
    and FAB (minimum norm). A counterexample is a point x' within the radius whose
    prediction, re-evaluated by the float64 twin that the certificate covers, is not y.
    Fails on any counterexample or when the empirical robust accuracy at some eps falls
    below the CRA. Reports CRA, ERA and their gap at each eps, and the tightness: the
    closest adversarial example found divided by the certified radius, per point.
    """
    if len(certificate) != x.shape[0]:
        raise ValueError(f"the certificate has {len(certificate)} points but x has {x.shape[0]}")
    use_lib = (library_available() if library is None else library) and box
    if library and not library_available():
        raise ImportError("torchattacks is not installed: pip install --no-deps torchattacks "
                          "(the extra 'attacks'), or run without library attacks")
    bar = progress or Progress()
    device = next(model.parameters()).device
    x, y = x.to(device, torch.float32), y.to(device).long()
    dim = x[0].numel()
    radius = certificate.radius.to(device).float()
    cert_idx = (certificate.correct.to(device) & (radius > 0)).nonzero().squeeze(1)
    cap = 2 * math.sqrt(dim)  # beyond the diameter of the box; caps infinite radii
    r_att = (radius[cert_idx] * radius_scale).clamp(max=cap)
    twin = float64_twin_or_none(model)   # None: predictions are checked in float32 only
    closest = torch.full((x.shape[0],), math.inf, device=device)
    cex, float32_only = [], set()
    attacks_run = ["pgd", "ddn"] + (["apgd-ce", "apgd-dlr", "fab"] if use_lib else [])
    if use_lib and model.num_classes < 3:
        attacks_run.remove("apgd-dlr")

    def found(kind: str, i: int, xa: torch.Tensor, r: float | None) -> None:
        """An adversarial candidate for point i: closest distance, counterexample re-check."""
        dist = (xa - x[i]).norm().item()
        pred32 = int(_predict(model, xa[None], 1)[0])
        if pred32 == int(y[i]) and twin is None:
            return
        with torch.no_grad():
            pred = int(twin(xa[None].double()).argmax(1)[0]) if twin is not None else pred32
        if pred != int(y[i]):
            closest[i] = min(float(closest[i]), dist)
        if r is None or dist > r * (1 + 1e-6):
            return
        if pred != int(y[i]):
            cex.append({"index": int(i), "attack": kind, "certified_radius": float(certificate.radius[i]),
                        "distance": dist, "prediction": pred, "prediction_fp32": pred32, "label": int(y[i])})
        elif pred32 != int(y[i]):
            float32_only.add(int(i))

    def run_at_radius(kind: str, fn, idx: torch.Tensor, r: torch.Tensor) -> int:
        out = _batched(fn, batch_size, x[idx], y[idx], r, bar=bar.phase(kind, idx.numel()))
        if out is None:
            return 0
        xa, ok = out
        for k in ok.nonzero().squeeze(1).tolist():
            found(kind, int(idx[k]), xa[k], float(r[k]))
        return ok.shape[0]

    attacked = {}
    # 1. At each certified point's own radius: PGD; APGD-CE/DLR on groups of similar radius.
    if cert_idx.numel():
        attacked["pgd"] = run_at_radius(
            "pgd", lambda a, b, r: pgd_attack(model, a, b, r, steps, restarts, box, seed), cert_idx, r_att)
        order = r_att.argsort()
        for loss in ("ce", "dlr"):
            if f"apgd-{loss}" not in attacks_run:
                continue
            # one radius per batch of similar radii: the smallest of the batch
            attacked[f"apgd-{loss}"] = run_at_radius(
                f"apgd-{loss}", lambda a, b, r, loss=loss: apgd_attack(model, a, b, float(r.min()), loss,
                                                                         steps, restarts, seed),
                cert_idx[order], r_att[order])
    # 2. Minimum-norm attacks on every correctly classified point: DDN (and FAB).
    pred = _predict(model, x, batch_size)
    correct = pred == y
    cidx = correct.nonzero().squeeze(1)
    dist = torch.full((x.shape[0],), math.inf, device=device)
    r_of = torch.full((x.shape[0],), -1.0, device=device)
    r_of[cert_idx] = r_att
    minimum_norm = [("ddn", lambda a, b: ddn_attack(model, a, b, ddn_steps, box=box))]
    if "fab" in attacks_run:
        minimum_norm.append(("fab", lambda a, b: fab_attack(model, a, b, steps, 1, seed)))
    for kind, fn in minimum_norm:
        out = _batched(fn, batch_size, x[cidx], y[cidx], bar=bar.phase(kind, cidx.numel())) if cidx.numel() else None
        if out is None:
            continue
        xd, dd = out
        attacked[kind] = dd.shape[0]
        dist[cidx[:dd.shape[0]]] = torch.minimum(dist[cidx[:dd.shape[0]]], dd)
        for k in torch.isfinite(dd).nonzero().squeeze(1).tolist():
            i = int(cidx[k])
            found(kind, i, xd[k], float(r_of[i]) if r_of[i] > 0 else None)
    # 3. Empirical robust accuracy at each eps: PGD (and APGD) at eps on the points not yet broken.
    per_eps = {}
    for e in eps:
        robust = correct & (dist > e)
        fixed = [("pgd@eps", lambda a, b: pgd_attack(model, a, b, float(e), steps, era_restarts, box, seed))]
        fixed += [(f"apgd-{loss}@eps", lambda a, b, loss=loss: apgd_attack(model, a, b, float(e), loss, steps,
                                                                            era_restarts, seed))
                  for loss in ("ce", "dlr") if f"apgd-{loss}" in attacks_run]
        cert_e = certificate.certified(float(e)).to(device)
        complete = True
        for kind, fn in fixed:
            alive = robust.nonzero().squeeze(1)
            if not alive.numel():
                break
            out = _batched(fn, batch_size, x[alive], y[alive], bar=bar.phase(f"{kind} {e:.3g}", alive.numel()))
            if out is None or out[1].shape[0] < alive.numel():
                complete = False
            if out is None:
                break
            xa, ok = out
            robust[alive[:ok.shape[0]][ok]] = False
            for k in ok.nonzero().squeeze(1).tolist():
                i = int(alive[k])
                found(kind, i, xa[k], float(e) if cert_e[i] else None)
        era, cra = robust.double().mean().item(), certificate.cra(float(e))
        per_eps[f"{e:.6g}"] = {"eps": float(e), "cra": cra, "era": era, "gap": era - cra,
                               "broken_by_min_norm": int((correct & (dist <= e)).sum()),
                               "complete": complete}
    bar.close()
    seen, unique = set(), []
    for c in cex:
        if c["index"] not in seen:
            seen.add(c["index"])
            unique.append(c)
    below = [k for k, v in per_eps.items() if v["era"] < v["cra"] and v["complete"]]
    finite = dist[torch.isfinite(dist)]
    tight = tightness(certificate, closest.cpu(), cert_idx.cpu())
    details = {"points": int(x.shape[0]), "certified_points_attacked": int(cert_idx.numel()),
               "points_attacked": attacked, "attacks": attacks_run,
               "library": "torchattacks" if use_lib else None,
               "counterexamples": len(unique), "examples": unique[:20],
               "float32_only_flips": len(float32_only), "box": "[0, 1]" if box else "none",
               "radius_scale": radius_scale, "pgd_steps": steps, "pgd_restarts": restarts,
               "ddn_steps": ddn_steps, "era_pgd_restarts": era_restarts, "clean_accuracy_fp32":
               correct.double().mean().item(), "min_norm_median_distance":
               finite.median().item() if finite.numel() else None, "per_eps": per_eps,
               "tightness": tight, "budget_exhausted": bar.truncated}
    summary = (f"{int(cert_idx.numel())} certified points attacked at {radius_scale:g} x their radius "
               f"({', '.join(attacks_run)}; PGD {steps} steps x {restarts} restarts, box "
               f"{'[0,1]' if box else 'none'}): {len(unique)} counterexamples")
    if tight["points"]:
        summary += (f"; tightness (closest adversarial / radius) median {tight['median']:.3g}, "
                    f"min {tight['min']:.3g}")
    if per_eps:
        summary += "; CRA/ERA " + ", ".join(f"@{k}: {100 * v['cra']:.1f}/{100 * v['era']:.1f}%"
                                             for k, v in per_eps.items())
    if bar.truncated:
        summary += " (time budget reached: not every point was attacked by every attack)"
    ok = not unique and not below
    if below:
        summary += f"; ERA below CRA at eps {below}"
    return CheckResult("attack", ok, summary, details)


def tightness(certificate: Certificate, closest: torch.Tensor, idx: torch.Tensor) -> dict:
    """Closest adversarial distance found / certified radius over the certified points ``idx``:
    per point and its distribution (min, quantiles, max; None when no point was broken);
    points never broken are counted apart."""
    r = certificate.radius[idx].double()
    c = closest[idx].double()
    ratio = c / r
    fin = ratio[torch.isfinite(ratio)]
    out = {"points": int(fin.numel()), "never_broken": int((~torch.isfinite(ratio)).sum()),
           "per_point": [{"index": int(i), "radius": float(rr), "closest": float(cc), "ratio": float(q)}
                         for i, rr, cc, q in zip(idx.tolist(), r.tolist(), c.tolist(), ratio.tolist())]}
    keys = ("min", "q05", "q25", "median", "q75", "q95", "max")
    if not fin.numel():
        return {**out, **dict.fromkeys(keys)}
    q = torch.quantile(fin, torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64))
    return {**out, **dict(zip(keys, q.tolist()))}
