"""Verification of a certifiable model: are its certificates worth what they claim?

``verify_model(model, x, y)`` runs every check and returns a :class:`VerifyReport`:

(a) ``orthogonality_check``: orthogonality error and spectral norm of every orthogonal weight;
(b) ``empirical_lipschitz``: gradient-ascent lower bound of the trunk's Lipschitz constant,
    which must not exceed ``lipschitz_bound()``; ``head_check``: the head computes
    W f + b with W = head_weight(), and forward = head o trunk;
(c) ``attack_certified``: PGD with restarts and the DDN minimum-norm attack (and, with
    torchattacks installed, APGD-CE/DLR and FAB) against every certified point inside its
    certified radius (0 counterexamples required), the empirical robust accuracy against
    the CRA at each eps, and the tightness (closest adversarial / certified radius);
(d) ``precision_check``: the float64 twin and its rounding bound against the formula;
(e) ``autoattack_check`` (with ``autoattack=True``): the standard L2 AutoAttack at every eps,
    whose robust accuracy must not fall below the CRA (``verify.autoattack``).

Runs outside any autocast and with float32 as the default dtype (``standard_numerics``).

Works for any model with the lipnext interface (forward_features, forward_head,
lipschitz_bound, head_weight, num_classes, and the float64 programs rounding_program and
head_program); models without orthogonal weights report none for (a). When certification
refuses the model (a claimed bound below the layers' bound, a layer without its certificate)
the report has a failed ``certify`` check with the reason, and the checks that need
certificates (c, d) do not run.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..certify import UnsoundClaim, certify, standard_numerics
from ..program import NotCertifiable
from .attacks import Progress, attack_certified, ddn_attack, pgd_attack, tightness
from .autoattack import autoattack_check
from .library import apgd_attack, fab_attack, library_available
from .lipschitz import empirical_lipschitz, head_check
from .orthogonality import orthogonality_check
from .precision import certify_float64, precision_check
from .report import CheckResult, VerifyReport

__all__ = ["Budget", "CheckResult", "VerifyReport", "apgd_attack", "attack_certified", "autoattack_check",
           "certify_float64",
           "ddn_attack", "empirical_lipschitz", "fab_attack", "head_check", "library_available",
           "orthogonality_check", "pgd_attack", "precision_check", "tightness", "verify_model",
           "DEFAULT_EPS"]

DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)


@dataclass
class Budget:
    """How hard the checks try. The defaults are the full strength of ``lipnext verify``."""

    pgd_steps: int = 100
    pgd_restarts: int = 5
    ddn_steps: int = 200
    era_restarts: int = 1          # PGD restarts for the empirical robust accuracy at each eps
    lipschitz_steps: int = 200
    lipschitz_restarts: int = 4
    lipschitz_points: int = 32     # data points that start the Lipschitz ascent
    attack_points: int | None = None  # attack only the first n points (None: all)
    seconds: float | None = None   # stop starting attack batches after this long (None: no limit)
    library: bool | None = None    # torchattacks' APGD/FAB: None when installed, True required, False never

    @classmethod
    def fast(cls) -> "Budget":
        """A small budget for tests and quick looks."""
        return cls(pgd_steps=10, pgd_restarts=2, ddn_steps=30, lipschitz_steps=30,
                   lipschitz_restarts=2, lipschitz_points=8)


def verify_model(model, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float] = DEFAULT_EPS,
                 rule: str = "pairwise", budget: Budget | None = None, box: bool = True,
                 radius_scale: float = 1.0, ortho_tol: float = 1e-4, lipschitz_rtol: float = 1e-3,
                 attacks: bool = True, seed: int = 0, batch_size: int = 256,
                 progress: bool = False, autoattack: bool = False) -> VerifyReport:
    """Run checks (a)-(d) on ``model`` with images x (N, C, H, W) in [0, 1] and labels y, and
    (e) with ``autoattack`` (on the first ``budget.attack_points`` points, or all).

    ``progress``: a tqdm bar per check and attack phase, and each check's result printed
    as soon as it is known.
    """
    budget = budget or Budget()
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
        raise ValueError("verify_model needs a non-empty batch of images x (N, C, H, W)")
    times, checks = {}, []
    start = time.monotonic()
    deadline = None if budget.seconds is None else start + budget.seconds
    names = ["certify", "orthogonality", "empirical_lipschitz", "head"] + (["attack"] if attacks else []) \
        + ["precision"] + (["autoattack"] if autoattack else [])
    bar = None

    def timed(name, fn, *a, **k):
        if bar is not None:
            bar.set_postfix_str(name)
        t = time.perf_counter()
        out = fn(*a, **k)
        times[name] = round(time.perf_counter() - t, 3)
        if bar is not None:
            bar.update(1)
            if isinstance(out, CheckResult):
                bar.write(f"{out.name}: {'pass' if out.passed else 'FAIL'}: {out.summary}")
        return out

    with standard_numerics(model):
        try:
            cert = timed("certify", certify, model, x, y, rule=rule, batch_size=batch_size)
        except (UnsoundClaim, NotCertifiable) as refusal:   # reported as the failed check it is
            cert = None
            checks.append(CheckResult("certify", False, f"certification refused: {refusal}",
                                      {"refused": type(refusal).__name__}))
        if progress:  # after certify, which checks the inputs: a usage error prints nothing else
            from ..progress import progress as progress_bar   # a bar on a terminal, lines in a log
            bar = progress_bar(len(names), "verify", initial=1, unit="check")
        checks.append(timed("orthogonality", orthogonality_check, model, ortho_tol))
        checks.append(timed("empirical_lipschitz", empirical_lipschitz, model, x[:budget.lipschitz_points],
                            budget.lipschitz_steps, budget.lipschitz_restarts, rtol=lipschitz_rtol, seed=seed))
        checks.append(timed("head", head_check, model, x[:256], seed=seed))
        if cert is None:
            return VerifyReport(checks, _info(model, x, rule, None, eps, box, radius_scale, budget, times))
        n = x.shape[0] if budget.attack_points is None else min(budget.attack_points, x.shape[0])
        if attacks:
            sub = cert.select(slice(n))
            checks.append(timed("attack", attack_certified, model, x[:n], y[:n], sub, eps, budget.pgd_steps,
                                budget.pgd_restarts, budget.ddn_steps, budget.era_restarts, box, radius_scale,
                                batch_size, seed, budget.library, Progress(progress, deadline)))
        checks.append(timed("precision", precision_check, model, x, y, eps, rule, batch_size))
        if autoattack:
            checks.append(timed("autoattack", autoattack_check, model, x[:n], y[:n], cert.select(slice(n)), eps,
                                batch_size, seed, progress))
    if bar is not None:
        bar.close()
    return VerifyReport(checks, _info(model, x, rule, cert, eps, box, radius_scale, budget, times))


def _info(model, x: torch.Tensor, rule: str, cert, eps: Sequence[float], box: bool, radius_scale: float,
          budget: Budget, times: dict[str, float]) -> dict:
    """The report's header: the model, the points, and the certificates' figures (None if refused)."""
    return {"model": type(model).__name__, "arch": getattr(model, "arch", ""), "points": int(x.shape[0]),
            "rule": rule, "lipschitz_bound": cert.lipschitz if cert else None,
            "clean_accuracy": cert.accuracy if cert else None,
            "cra": {f"{e:.6g}": cert.cra(float(e)) for e in eps} if cert else None,
            "box": "[0, 1]" if box else "none", "radius_scale": radius_scale, "budget": asdict(budget),
            "seconds": times}
