"""Deterministic L2 certificates (docs/CORE.md, Certificates).

With L a sound bound on the trunk's Lipschitz constant and w_i the effective head
rows, the prediction y = argmax z is certified at radius eps when, for all j != y,

    z_y - z_j > eps * L * ||w_y - w_j||_2            (rule "pairwise")

so the radius is min_j (z_y - z_j) / (L ||w_y - w_j||). The classical rule
margin / (sqrt(2) L ||W||_2) ("sqrt2") holds for any linear head. Inequalities are
strict; a tie (margin 0) is never certified; a wrong prediction gets radius 0.
The head is evaluated in float64 on the trunk's features.

Rounding guard (floating-point safety). The trunk runs in float32, so the computed
features f~ differ from the exact ones by a rounding error, at x and at every x' in
the ball. If ||f~(x) - f(x)|| <= delta(x) everywhere, then for every pair

    z~_y(x') - z~_j(x') >= z~_y(x) - z~_j(x) - (eps L + 2 delta) ||w_y - w_j||

so a certificate is sound for the computed predictions when the radius is lowered to
``r - 2 delta / L`` (the same shift for the "sqrt2" rule, as ||w_y - w_j|| <= sqrt2 ||W||).
delta is estimated as ``kappa ||f~(x)||`` with the relative error kappa measured by
:func:`rounding_error` on a probe of the batch (float32 against a float64 copy of the
model, trunk and head), times ``GUARD_SAFETY`` for the points of the ball that were
not measured (their features are at most about twice as large), and never below
sqrt(C) u32 (the probabilistic rounding bound of one length-C dot product). A margin
within this allowance is not certified (radius 0).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .models.base import CertifiableModel

__all__ = ["Certificate", "certify", "certified_radius", "rounding_error", "RULES",
           "GUARD_SAFETY", "GUARD_PROBE"]

RULES = ("pairwise", "sqrt2")
GUARD_SAFETY = 8.0   # multiplies the measured relative rounding error (see module doc)
GUARD_PROBE = 32     # points of each certify call measured in float64
_U32 = 2.0 ** -24


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


def certified_radius(logits: torch.Tensor, y: torch.Tensor, head_weight: torch.Tensor,
                     lipschitz: float, rule: str = "pairwise",
                     guard: torch.Tensor | None = None) -> Certificate:
    """Certificates from float64 logits (N, K), labels (N,), head rows (K, C) and L.

    ``guard`` (N,) is the feature-space rounding allowance 2 delta of each point: the
    radius becomes max(r - guard / L, 0) (module doc).
    """
    if rule not in RULES:
        raise ValueError(f"unknown certification rule {rule!r}; choose one of {RULES}")
    if not math.isfinite(lipschitz) or lipschitz <= 0:
        raise ValueError(f"the Lipschitz bound must be finite and positive, got {lipschitz}")
    z = logits.to(torch.float64)
    w = head_weight.detach().to(device=z.device, dtype=torch.float64)
    n, k = z.shape
    y = y.to(z.device)
    zy = z.gather(1, y[:, None])
    gap = zy - z                                          # z_y - z_j, (N, K)
    other = torch.ones_like(gap, dtype=torch.bool).scatter_(1, y[:, None], False)
    if rule == "pairwise":
        dist = torch.cdist(w[None], w[None])[0]           # ||w_i - w_j||, (K, K)
        k_pair = lipschitz * dist[y]                       # (N, K)
    else:
        k_pair = torch.full_like(gap, math.sqrt(2) * lipschitz
                                 * torch.linalg.matrix_norm(w, ord=2).item())
    ratio = torch.where(k_pair > 0, gap / k_pair.clamp_min(1e-300),
                        torch.where(gap > 0, math.inf, 0.0))
    radius = torch.where(other, ratio, math.inf).amin(dim=1)
    margin = torch.where(other, gap, math.inf).amin(dim=1)
    correct = margin > 0
    if guard is not None:
        radius = radius - guard.to(radius) / lipschitz
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


@torch.no_grad()
def rounding_error(model: CertifiableModel, x: torch.Tensor) -> float:
    """kappa^: the largest relative float32 rounding error of the model on x, measured.

    Compares the float32 model (trunk and head, as predictions are computed) with a
    float64 copy: max over points of max(||f32 - f64||, max_{j<k} |e_jk| / ||w_j - w_k||)
    / ||f64||, where e_jk is the error of the logit difference z_j - z_k.
    """
    if x.shape[0] == 0:
        return 0.0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            f32 = model.forward_features(x.to(device, torch.float32)).float()
            z32 = model.forward_head(f32).double()
            m64 = copy.deepcopy(model).double()
            f64 = m64.forward_features(x.to(device, torch.float64)).double()
            z64 = m64.forward_head(f64).double()
            w = m64.head_weight().detach().double()
    finally:
        model.train(was_training)
    feat = (f32.double() - f64).norm(dim=1)
    e = z32 - z64
    pair_err = (e[:, :, None] - e[:, None, :]).abs()          # (N, K, K)
    dist = torch.cdist(w[None], w[None])[0]
    logit = torch.where(dist > 0, pair_err / dist.clamp_min(1e-300), 0.0).flatten(1).amax(1)
    return (torch.maximum(feat, logit) / f64.norm(dim=1).clamp_min(1e-30)).max().item()


@torch.no_grad()
def certify(model: CertifiableModel, x: torch.Tensor, y: torch.Tensor, rule: str = "pairwise",
            batch_size: int = 512, lipschitz: float | None = None,
            rounding_guard: bool | float = True) -> Certificate:
    """Certify ``model`` on images x (N, C, H, W) in [0, 1] with labels y (N,).

    The trunk runs in float32 (no autocast), the head in float64; L is measured from
    the weights as they are unless given. ``rounding_guard``: True measures kappa on
    the first GUARD_PROBE points (module doc), a float gives kappa, False turns the
    guard off (radii of the exact-arithmetic formula, for tests of the formula only).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():  # the float32 cast below would silently accept 0..255 pixels
        raise TypeError(f"expected float pixels in [0, 1], got dtype {x.dtype}; "
                        "convert uint8 images with x.float() / 255")
    y = _check_labels(y, x.shape[0] if x.dim() else 0, model.num_classes)
    lip = model.lipschitz_bound() if lipschitz is None else float(lipschitz)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if rounding_guard is True:
        kappa = rounding_error(model, x[:GUARD_PROBE]) * GUARD_SAFETY
    else:
        kappa = float(rounding_guard)
        if not math.isfinite(kappa) or kappa < 0:
            raise ValueError(f"rounding_guard must be True, False or a relative error >= 0, got {kappa}")
    certs = []
    try:
        with torch.autocast(device.type, enabled=False):
            for i in range(0, max(x.shape[0], 1), batch_size):
                xb = x[i:i + batch_size].to(device, torch.float32)
                f = model.forward_features(xb).float()
                z = model.forward_head(f.double())
                guard = None
                if rounding_guard is not False:
                    k = max(kappa, math.sqrt(f.shape[1]) * _U32)
                    guard = 2 * k * f.double().norm(dim=1)
                certs.append(certified_radius(z, y[i:i + batch_size], model.head_weight(), lip, rule,
                                              guard))
    finally:
        model.train(was_training)
    return Certificate.cat(certs)
