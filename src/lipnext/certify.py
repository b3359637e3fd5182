"""Deterministic L2 certificates (docs/CORE.md, Certificates; docs/RELIABILITY.md, Floating point).

With L a sound bound on the trunk's Lipschitz constant and w_i the effective head
rows, the prediction y = argmax z is certified at radius eps when, for all j != y,

    z_y - z_j > eps * L * ||w_y - w_j||_2            (rule "pairwise")

so the radius is min_j (z_y - z_j) / (L ||w_y - w_j||). The classical rule
margin / (sqrt(2) L ||W||_2) ("sqrt2") holds for any linear head. Inequalities are
strict; a tie (margin 0) is never certified; a wrong prediction gets radius 0.

``certify`` trusts nothing it is handed. It assembles the model's float64 program from the
layers' own certificates (``lipnext.program``: a layer without one is refused), checks a
claimed L (``model.lipschitz_bound()`` or ``lipschitz=``) against the product of the
program's bounds and refuses a claim below it, refuses a twin built from other weights,
and runs the program in float64 with its a-priori rounding bound on the whole ball,
||f^(x') - f(x')|| <= a + b r (``lipnext.rounding.propagate``). With the head's own
rounding this gives, for each pair, a bound alpha_j + beta_j r of the error of the
computed logit difference, and

    r_j = (z^_y - z^_j - 2 u |z^_y - z^_j| - 2 alpha_j) / (L ||w_y - w_j|| + 2 beta_j),

capped by the largest radius on which no intermediate value can leave float64's range
(``reach``; 0 where x itself is out of range, marked ``range_limited``). The certificate
holds for the exact real-number model and for the twin's float64 predictions at every
point of the ball. It does not depend on an outer autocast or on the default dtype.

Estimates, for comparison only, warn (``Float32EstimateWarning``) and are marked in their
``numerics``: ``float32_estimate`` (the formula on the float32 model) and
``certified_radius`` without a rounding bound (the formula on given logits).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .bounds import TINY, distance_upper, gamma, operator_norm_bound, pairwise_distances
from .models.base import check_images
from .modes import evaluating, standard_numerics
from .options import RULES
from .program import Float64Twin, state_fingerprint
from .rounding import OMEGA, U64, norm_upper, propagate

__all__ = ["Certificate", "Certifier", "Float32EstimateWarning", "NUMERICS", "RoundingBound", "UnsoundClaim",
           "certify", "certified_radius", "float32_estimate", "standard_numerics", "RULES"]

_DOWN = 1.0 - 1e-12   # covers the rounding of the radius formula itself (a few float64 operations)

#: how a Certificate's radii were computed; only the first is a certificate
NUMERICS = ("float64-proven", "float32-estimate", "exact-formula")


class UnsoundClaim(ValueError):
    """A claimed Lipschitz bound below the product of the bounds of the layers' own programs."""


class Float32EstimateWarning(UserWarning):
    """Radii from the exact-arithmetic formula without a rounding bound: not certificates."""


def _warn_estimate(what: str, numerics: str) -> None:
    warnings.warn(f"{what}: exact-arithmetic radii without a rounding bound, marked numerics="
                  f"{numerics!r}: an estimate for comparison, not a certificate (rounding can make them "
                  "wrong); lipnext.certify(model, x, y) gives certificates", Float32EstimateWarning,
                  stacklevel=3)


@dataclass
class RoundingBound:
    """Float64 error of one batch: ||f^(x') - f(x')|| <= a + b r on the ball of radius r <=
    reach; lip bounds the trunk's program, fnorm >= ||f^(x)||, bias the head's bias."""

    a: torch.Tensor
    b: torch.Tensor | float
    lip: float
    fnorm: torch.Tensor
    bias: torch.Tensor
    reach: torch.Tensor


@dataclass
class Certificate:
    """Per-example certificates of one batch of (x, y)."""

    radius: torch.Tensor      # (N,) float64; 0 where the prediction is wrong or tied
    correct: torch.Tensor     # (N,) bool; argmax is y and strictly above every other logit
    predictions: torch.Tensor  # (N,) int64
    margin: torch.Tensor      # (N,) float64; z_y - max_{j != y} z_j at the true label
    lipschitz: float          # the trunk bound L used
    rule: str
    numerics: str = "float64-proven"   # one of NUMERICS
    range_limited: torch.Tensor = field(default=None)  # (N,) bool: radius cut where float64's range ends
    labels: torch.Tensor | None = None  # (N,) int64: the labels certified against (None: not kept)

    def __post_init__(self) -> None:
        if self.range_limited is None:
            self.range_limited = torch.zeros_like(self.correct)

    def __len__(self) -> int:
        return self.radius.numel()

    @property
    def proven(self) -> bool:
        """True for certificates (the float64 twin with its proven bound), False for estimates."""
        return self.numerics == "float64-proven"

    @property
    def accuracy(self) -> float:
        return self.correct.double().mean().item() if len(self) else float("nan")

    def certified(self, eps: float) -> torch.Tensor:
        """(N,) bool: correct and certified at eps (radius > eps, strictly)."""
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        return self.correct & (self.radius > eps)

    def cra(self, eps: float | Iterable[float]) -> float | list[float]:
        """Certified robust accuracy at eps (a float), or at each of a list of eps."""
        if isinstance(eps, (int, float)):
            return self.certified(float(eps)).double().mean().item() if len(self) else float("nan")
        return [self.cra(float(e)) for e in eps]

    def select(self, index: slice | torch.Tensor) -> "Certificate":
        """The certificates of the examples picked by ``index`` (a slice, mask or indices)."""
        return Certificate(self.radius[index], self.correct[index], self.predictions[index],
                           self.margin[index], self.lipschitz, self.rule, self.numerics,
                           self.range_limited[index], None if self.labels is None else self.labels[index])

    @staticmethod
    def cat(certs: list["Certificate"]) -> "Certificate":
        """Concatenate the certificates of several batches (same model, rule and numerics)."""
        if not certs:
            raise ValueError("nothing to concatenate")
        if len({(c.rule, c.numerics) for c in certs}) > 1:
            raise ValueError("cannot concatenate certificates of different rules or numerics")
        return Certificate(*(torch.cat([getattr(c, k) for c in certs]) for k in
                             ("radius", "correct", "predictions", "margin")),
                           lipschitz=max(c.lipschitz for c in certs), rule=certs[0].rule,
                           numerics=certs[0].numerics,
                           range_limited=torch.cat([c.range_limited for c in certs]),
                           labels=None if any(c.labels is None for c in certs)
                           else torch.cat([c.labels for c in certs]))


def _pair_error(rb: RoundingBound, w: torch.Tensor, y: torch.Tensor,
                dist_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) (N, K): |error of z^_y - z^_j| <= alpha_j + beta_j r on the ball.

    Feature error through the pair: ||w_y - w_j|| (a + b r); the head's dot products and
    bias (length C + 1): gamma_{C+1} (||w_i|| ||f^(x')|| + |b_i|) + (C + 1) TINY (1 + |w_i|max)
    for i = y, j, with ||f^(x')|| <= ||f^(x)|| + L_f r + 2 (a + b r).
    """
    g = gamma(w.shape[1] + 1)
    rows = w.norm(dim=1) * (1 + gamma(w.shape[1] + 1))
    under = (w.shape[1] + 1) * TINY * (1 + w.abs().amax(dim=1))
    bias = rb.bias.to(w).abs()
    a = rb.a[:, None].to(w)
    b = torch.as_tensor(rb.b, dtype=w.dtype, device=w.device).reshape(-1, 1)
    fn = rb.fnorm[:, None].to(w)
    nn_ = rows[y][:, None] + rows[None]
    alpha = (dist_y * a + g * (nn_ * (fn + 2 * a) + bias[y][:, None] + bias[None])
             + under[y][:, None] + under[None])
    beta = dist_y * b + g * nn_ * (rb.lip + 2 * b)
    ops = gamma(8)
    return alpha * (1 + 2 * ops), beta * (1 + 2 * ops)


def _radii(logits: torch.Tensor, y: torch.Tensor, head_weight: torch.Tensor, lipschitz: float,
           rule: str, rounding: RoundingBound | None, numerics: str) -> Certificate:
    """The radius formula (module doc); ``rounding`` lowers each pair's radius, None: exact arithmetic."""
    if rule not in RULES:
        raise ValueError(f"unknown certification rule {rule!r}; choose one of {RULES}")
    if not math.isfinite(lipschitz) or lipschitz <= 0:
        raise ValueError(f"the Lipschitz bound must be finite and positive, got {lipschitz}")
    z = logits.to(torch.float64)
    w = head_weight.detach().to(device=z.device, dtype=torch.float64)
    y = y.to(z.device)
    zy = z.gather(1, y[:, None])
    gap = zy - z                                          # z_y - z_j, (N, K)
    other = torch.ones_like(gap, dtype=torch.bool).scatter_(1, y[:, None], False)
    labels, inverse = torch.unique(y, return_inverse=True)
    dist_y = pairwise_distances(w, labels)[inverse] if y.numel() else gap.new_zeros(gap.shape)
    if rounding is not None:
        dist_y = distance_upper(dist_y, w.shape[1])
    if rule == "pairwise":
        k_pair = lipschitz * dist_y                        # (N, K)
    else:
        norm = (operator_norm_bound(w) if rounding is not None
                else torch.linalg.matrix_norm(w, ord=2).item())
        k_pair = torch.full_like(gap, math.sqrt(2) * lipschitz * norm)
    num = gap
    limited = torch.zeros(gap.shape[0], dtype=torch.bool, device=gap.device)
    if rounding is not None:
        alpha, beta = _pair_error(rounding, w, y, dist_y)
        # 2u|gap|: the subtraction z_y - z_j; the extra 2u (|gap| + 2 alpha) and 1 + 8u cover
        # the rounding of this numerator and denominator themselves (a lower and an upper bound).
        num = gap - 2 * alpha - 4 * U64 * (gap.abs() + 2 * alpha) - 4 * TINY
        k_pair = (k_pair + 2 * beta) * (1 + 8 * U64)
    ratio = torch.where(k_pair > 0, num / k_pair.clamp_min(1e-300),
                        torch.where(num > 0, math.inf, 0.0))
    radius = torch.where(other, ratio, math.inf).amin(dim=1)
    margin = torch.where(other, gap, math.inf).amin(dim=1)
    correct = margin > 0
    if rounding is not None:
        reach = rounding.reach.to(radius)
        limited = (reach < radius) | ~(reach > 0)        # cut by the range, or x itself out of it
        radius = torch.minimum(radius, reach) * _DOWN
        radius = torch.where(torch.isnan(radius), torch.zeros_like(radius), radius)
    radius = torch.where(correct, radius.clamp_min(0.0), torch.zeros_like(radius))
    return Certificate(radius=radius.cpu(), correct=correct.cpu(), predictions=z.argmax(1).cpu(),
                       margin=margin.cpu(), lipschitz=float(lipschitz), rule=rule, numerics=numerics,
                       range_limited=limited.cpu(), labels=y.cpu())


def certified_radius(logits: torch.Tensor, y: torch.Tensor, head_weight: torch.Tensor,
                     lipschitz: float, rule: str = "pairwise",
                     rounding: RoundingBound | None = None) -> Certificate:
    """The formula on float64 logits (N, K), labels (N,), head rows (K, C) and L.

    With ``rounding`` (the float64 error bound of the batch, as ``certify`` computes it) the
    radii are the proven ones for those inputs; without it, the exact-arithmetic formula,
    which warns and is marked ``numerics='exact-formula'``: not a certificate."""
    if rounding is None:
        cert = _radii(logits, y, head_weight, lipschitz, rule, None, "exact-formula")
        _warn_estimate("certified_radius without a rounding bound", "exact-formula")
        return cert
    return _radii(logits, y, head_weight, lipschitz, rule, rounding, "float64-proven")


def _check_labels(y: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.numel() != n:
        raise ValueError(f"expected {n} labels of shape ({n},), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got dtype {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y.long()


def _check_inputs(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():  # the float cast below would silently accept 0..255 pixels
        raise TypeError(f"expected float pixels in [0, 1], got dtype {x.dtype}; "
                        "convert uint8 images with x.float() / 255")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return _check_labels(y, x.shape[0] if x.dim() else 0, model.num_classes)


class Certifier:
    """A model's checked float64 program, ready to certify batches: the twin (built, or a given
    one checked against the weights) and the checked L, once. Build it when the weights are final."""

    def __init__(self, model, rule: str = "pairwise", lipschitz: float | None = None,
                 twin: Float64Twin | None = None):
        if rule not in RULES:
            raise ValueError(f"unknown certification rule {rule!r}; choose one of {RULES}")
        self.model, self.rule = model, rule
        with evaluating(model), standard_numerics(model):
            if twin is None:
                twin = Float64Twin(model)
            elif not isinstance(twin, Float64Twin):
                raise TypeError(f"twin must be a lipnext Float64Twin, got {type(twin).__name__}")
            elif twin.fingerprint != state_fingerprint(model):
                raise ValueError("the float64 twin was built from other weights than the model's as they "
                                 "are now: build it again (lipnext.program.float64_twin(model))")
            self.twin = twin
            claimed = model.lipschitz_bound() if lipschitz is None else lipschitz
            self.lipschitz = _checked_lipschitz(float(claimed), twin, "model.lipschitz_bound()"
                                                if lipschitz is None else "lipschitz=")
        w = twin.weight
        self._head_reach = (OMEGA / 2) / max(float(w.norm(dim=1).max()) * 1.01, 1e-300) \
            if w.numel() and float(twin.bias.abs().max()) < OMEGA / 2 else 0.0
        self.validate = getattr(model, "validate_inputs", True)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Certificate:
        """Certificates of one batch (float64 on the twin's device)."""
        y = _check_inputs(self.model, x, y, 1)
        xb = x.to(self.twin.weight.device, torch.float64)
        if self.validate:
            check_images(xb, self.model.in_chans, self.model.image_size)
        with standard_numerics(self.model):
            prop = propagate(self.twin.steps, xb)
            f = prop.features
            z = self.twin.forward_head(f)
            fnorm = norm_upper(f)
            # the head's dot products stay in range while ||f(x')|| <= head reach
            room = (self._head_reach - fnorm - 2 * prop.a) * (1 - 1e-6)
            reach = torch.minimum(prop.reach, torch.where(room > 0, room / (prop.lip + 2 * prop.b), 0.0))
            rb = RoundingBound(prop.a, prop.b, prop.lip, fnorm, self.twin.bias, reach)
            cert = _radii(z, y.to(z.device), self.twin.weight, self.lipschitz, self.rule, rb, "float64-proven")
        if cert.range_limited.any():
            warnings.warn(f"{int(cert.range_limited.sum())} of {len(cert)} points: the L2 ball of their "
                          "radius leaves float64's range (an intermediate value could overflow), so their "
                          "radius is cut there (0 if the point itself is out of range; "
                          "Certificate.range_limited marks them)", RuntimeWarning, stacklevel=2)
        return cert


def _checked_lipschitz(claimed: float, twin: Float64Twin, source: str) -> float:
    """max(claim, the program's bound rounded up), refusing a claim below the program's bound."""
    computed, upper = twin.lipschitz, twin.lipschitz_upper
    if not (math.isfinite(claimed) and claimed > 0):
        raise ValueError(f"the Lipschitz bound must be finite and positive, got {claimed} ({source})")
    if not (math.isfinite(upper) and upper > 0):
        raise ValueError(f"the layers' programs give the Lipschitz bound {computed}: no certificate "
                         "exists for weights with non-finite entries")
    if claimed < computed - (upper - computed):         # below, beyond the product's own rounding
        raise UnsoundClaim(f"the claimed Lipschitz bound L = {claimed:.9g} ({source}) is below "
                         f"L = {computed:.9g}, the product of the bounds of the layers' own float64 "
                         "programs: refusing to certify with it (a layer's lipschitz_bound() or the "
                         "given bound is wrong)")
    return max(claimed, upper)


@torch.no_grad()
def certify(model, x: torch.Tensor, y: torch.Tensor, rule: str = "pairwise",
            batch_size: int = 512, lipschitz: float | None = None,
            twin: Float64Twin | None = None) -> Certificate:
    """Certify ``model`` on images x (N, C, H, W) in [0, 1] with labels y (N,) (module doc).

    L is ``model.lipschitz_bound()`` unless given; either way it is checked against the
    layers' programs. ``twin``: a float64 twin of this model as it is now (checked). The
    certificate holds for the exact model and for the twin's float64 predictions on the
    whole ball; it does not depend on autocast or the default dtype."""
    y = _check_inputs(model, x, y, batch_size)
    certifier = Certifier(model, rule, lipschitz, twin)
    with evaluating(model):
        certs = [certifier(x[i:i + batch_size], y[i:i + batch_size])
                 for i in range(0, max(x.shape[0], 1), batch_size)]
    return Certificate.cat(certs)


@torch.no_grad()
def float32_estimate(model, x: torch.Tensor, y: torch.Tensor, rule: str = "pairwise",
                     batch_size: int = 512, lipschitz: float | None = None) -> Certificate:
    """Radii of the exact-arithmetic formula on the model's float32 trunk, for comparison only:
    NOT a certificate (rounding can make them wrong). Warns; marked ``numerics='float32-estimate'``."""
    y = _check_inputs(model, x, y, batch_size)
    _warn_estimate("float32_estimate", "float32-estimate")
    device = next(model.parameters()).device
    certs = []
    with evaluating(model), standard_numerics(model):
        lip = float(model.lipschitz_bound()) if lipschitz is None else float(lipschitz)
        for i in range(0, max(x.shape[0], 1), batch_size):
            f = model.forward_features(x[i:i + batch_size].to(device, torch.float32)).float()
            certs.append(_radii(model.forward_head(f.double()), y[i:i + batch_size], model.head_weight(),
                                lip, rule, None, "float32-estimate"))
    return Certificate.cat(certs)
