"""Deterministic L2 certificates (docs/CORE.md, Certificates).

With L a sound bound on the trunk's Lipschitz constant and w_i the effective head
rows, the prediction y = argmax z is certified at radius eps when, for all j != y,

    z_y - z_j > eps * L * ||w_y - w_j||_2            (rule "pairwise")

so the radius is min_j (z_y - z_j) / (L ||w_y - w_j||). The classical rule
margin / (sqrt(2) L ||W||_2) ("sqrt2") holds for any linear head. Inequalities are
strict; a tie (margin 0) is never certified; a wrong prediction gets radius 0.
Distances ||w_y - w_j|| come from the differences (``bounds.pairwise_distances``).

Floating point (``rounding_guard=True``, the default). The trunk and the head run in
float64 as the model's float64 twin (``lipnext.rounding``), whose rounding error is
bounded a priori on the whole ball: ||f^(x') - f(x')|| <= a + b r for every x' with
||x' - x|| <= r. With the head's own rounding this gives, for each pair, a bound
alpha_j + beta_j r of the error of the computed logit difference, and

    r_j = (z^_y - z^_j - 2 u |z^_y - z^_j| - 2 alpha_j) / (L ||w_y - w_j|| + 2 beta_j)

certifies the exact real-number model and the twin's float64 predictions at every
point of the ball (docs/RELIABILITY.md, Floating point). Certification does not depend
on an outer autocast or on the default dtype (``standard_numerics``).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .bounds import distance_upper, gamma, operator_norm_bound, pairwise_distances
from .models.base import CertifiableModel, check_images
from .nn.modes import evaluating
from .options import RULES
from .rounding import UP, U64, Float64Twin, propagate

__all__ = ["Certificate", "RoundingBound", "certify", "certified_radius", "standard_numerics", "RULES"]

_DOWN = 1.0 - 1e-12   # covers the rounding of the radius formula itself (a few float64 operations)


@contextlib.contextmanager
def standard_numerics(model) -> Iterator[None]:
    """No autocast (on the model's device and the CPU) and float32 as the default dtype."""
    param = next(model.parameters(), None)
    kinds = {"cpu", param.device.type if param is not None else "cpu"}
    old = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        for kind in sorted(kinds):
            stack.enter_context(torch.autocast(kind, enabled=False))
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


@dataclass
class RoundingBound:
    """Float64 error of one batch: ||f^(x') - f(x')|| <= a + b r on the ball of radius r;
    lip bounds the trunk's program, fnorm = ||f^(x)||, bias the head's bias."""

    a: torch.Tensor
    b: torch.Tensor
    lip: float
    fnorm: torch.Tensor
    bias: torch.Tensor


@dataclass
class Certificate:
    """Per-example certificates of one batch of (x, y)."""

    radius: torch.Tensor      # (N,) float64; 0 where the prediction is wrong or tied
    correct: torch.Tensor     # (N,) bool; argmax is y and strictly above every other logit
    predictions: torch.Tensor  # (N,) int64
    margin: torch.Tensor      # (N,) float64; z_y - max_{j != y} z_j at the true label
    lipschitz: float          # the trunk bound L used
    rule: str

    def __len__(self) -> int:
        return self.radius.numel()

    @property
    def accuracy(self) -> float:
        return self.correct.double().mean().item() if len(self) else float("nan")

    def certified(self, eps: float) -> torch.Tensor:
        """(N,) bool: correct and certified at eps (radius > eps, strictly)."""
        if eps < 0:
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
                           self.margin[index], self.lipschitz, self.rule)

    @staticmethod
    def cat(certs: list["Certificate"]) -> "Certificate":
        """Concatenate the certificates of several batches (same model and rule)."""
        if not certs:
            raise ValueError("nothing to concatenate")
        return Certificate(*(torch.cat([getattr(c, k) for c in certs]) for k in
                             ("radius", "correct", "predictions", "margin")),
                           lipschitz=certs[0].lipschitz, rule=certs[0].rule)


def _pair_error(rb: RoundingBound, w: torch.Tensor, y: torch.Tensor,
                dist_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) (N, K): |error of z^_y - z^_j| <= alpha_j + beta_j r on the ball.

    Feature error through the pair: ||w_y - w_j|| (a + b r); the head's dot products and
    bias (length C + 1): gamma_{C+1} (||w_i|| ||f^(x')|| + |b_i|) for i = y, j, with
    ||f^(x')|| <= ||f^(x)|| + L_f r + 2 (a + b r).
    """
    g = gamma(w.shape[1] + 1)
    rows = w.norm(dim=1) * UP
    bias = rb.bias.to(w).abs()
    a, b = rb.a[:, None].to(w), rb.b[:, None].to(w)
    fn = rb.fnorm[:, None].to(w)
    nn_ = rows[y][:, None] + rows[None]
    alpha = dist_y * a + g * (nn_ * (fn + 2 * a) + bias[y][:, None] + bias[None])
    beta = dist_y * b + g * nn_ * (rb.lip + 2 * b)
    return alpha * UP, beta * UP


def certified_radius(logits: torch.Tensor, y: torch.Tensor, head_weight: torch.Tensor,
                     lipschitz: float, rule: str = "pairwise",
                     rounding: RoundingBound | None = None) -> Certificate:
    """Certificates from float64 logits (N, K), labels (N,), head rows (K, C) and L.

    ``rounding`` (the float64 error bound of the batch) lowers each pair's radius as in
    the module doc; without it, the exact-arithmetic formula.
    """
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
    if rounding is not None:
        alpha, beta = _pair_error(rounding, w, y, dist_y)
        # 2u|gap|: the subtraction z_y - z_j; the extra 2u (|gap| + 2 alpha) and 1 + 8u cover
        # the rounding of this numerator and denominator themselves (a lower and an upper bound).
        num = gap - 2 * alpha - 4 * U64 * (gap.abs() + 2 * alpha)
        k_pair = (k_pair + 2 * beta) * (1 + 8 * U64)
    ratio = torch.where(k_pair > 0, num / k_pair.clamp_min(1e-300),
                        torch.where(num > 0, math.inf, 0.0))
    radius = torch.where(other, ratio, math.inf).amin(dim=1)
    margin = torch.where(other, gap, math.inf).amin(dim=1)
    correct = margin > 0
    if rounding is not None:
        radius = radius * _DOWN
    radius = torch.where(correct, radius.clamp_min(0.0), torch.zeros_like(radius))
    return Certificate(radius=radius.cpu(), correct=correct.cpu(), predictions=z.argmax(1).cpu(),
                       margin=margin.cpu(), lipschitz=float(lipschitz), rule=rule)


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


def _finite(*tensors: torch.Tensor, x: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"the float64 trunk overflowed (inputs up to |x| = {x.abs().max().item():.3g}): "
                         "no certificate exists for such inputs; certify images with pixels in [0, 1]")


@torch.no_grad()
def certify(model: CertifiableModel, x: torch.Tensor, y: torch.Tensor, rule: str = "pairwise",
            batch_size: int = 512, lipschitz: float | None = None,
            rounding_guard: bool = True, twin: Float64Twin | None = None) -> Certificate:
    """Certify ``model`` on images x (N, C, H, W) in [0, 1] with labels y (N,).

    L is measured from the weights as they are unless given. ``rounding_guard=True``:
    the float64 twin and its a-priori rounding bound (module doc): the certificate holds
    for the exact model and for the twin's float64 predictions on the whole ball.
    ``False``: the exact-arithmetic formula on the model's float32 trunk (for tests of the
    formula only: not sound under rounding). Independent of autocast and default dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():  # the float cast below would silently accept 0..255 pixels
        raise TypeError(f"expected float pixels in [0, 1], got dtype {x.dtype}; "
                        "convert uint8 images with x.float() / 255")
    if not isinstance(rounding_guard, bool):
        raise ValueError(f"rounding_guard must be True (the proven float64 bound) or False (the "
                         f"exact-arithmetic formula), got {rounding_guard!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    y = _check_labels(y, x.shape[0] if x.dim() else 0, model.num_classes)
    device = next(model.parameters()).device
    certs = []
    with evaluating(model), standard_numerics(model):
        lip = model.lipschitz_bound() if lipschitz is None else float(lipschitz)
        if rounding_guard and twin is None:
            twin = Float64Twin(model)
        elif not rounding_guard:
            twin = None
        validate = isinstance(model, CertifiableModel) and getattr(model, "validate_inputs", True)
        for i in range(0, max(x.shape[0], 1), batch_size):
            yb = y[i:i + batch_size]
            if twin is None:
                f = model.forward_features(x[i:i + batch_size].to(device, torch.float32)).float()
                z = model.forward_head(f.double())
                certs.append(certified_radius(z, yb, model.head_weight(), lip, rule))
                continue
            xb = x[i:i + batch_size].to(device, torch.float64)
            if validate:
                check_images(xb, model.in_chans, model.image_size)
            f, a, b, lip_f = propagate(twin.steps, xb)
            z = twin.forward_head(f)
            _finite(z, a, b, x=xb)
            rb = RoundingBound(a, b, lip_f, f.norm(dim=1) * UP, twin.bias)
            certs.append(certified_radius(z, yb, twin.weight, lip, rule, rb))
        del twin
    return Certificate.cat(certs)
