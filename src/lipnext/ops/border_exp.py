"""X exp(U) for a skew U that is zero outside its first k rows and columns, in O(n^2 k).

Such a U is the optimizer's step for an orthogonal Q of which a layer reads only the first
k columns, as the patch stem does (W = Q[:, :d]): its Lie gradient Q^T G is zero outside
those columns, so the moments and the step are too. It has rank <= 2k (docs/CORE.md,
Optimizer):

    U = P Q^T,   P = [C, E],  Q = [E, -C],   C = U[:, :k] with its top k x k block halved,
                                             E = the first k columns of I,
    exp(U) = I + P phi(Z) Q^T,   Z = Q^T P = [[U_kk / 2, I], [-C^T C, U_kk / 2]]   (2k x 2k),
    phi(Z) = sum_j Z^j / (j + 1)!  = the top-right block of exp([[Z, I], [0, 0]]),

so X exp(U) = X - Y_2 C^T, plus Y_1 on the first k columns, with Y = [Y_1, Y_2] = [X C, X E] phi(Z):
products of n x n x k and one 4k x 4k exponential (float64: ``torch.linalg.matrix_exp`` on the
CPU; elsewhere ``expm_unsynced``, since matrix_exp reads its norms to the host on a GPU),
against FastExp's 2-4 n^3 and X W's n^3. The products run in the chosen ``Precision``;
each multiplies by C or by phi(Z)'s blocks of order ||U|| (Y_2 is X E + O(||U||), then
times C^T), so as with X + X (E - I) the rounding scales with ||U||.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .precision import Precision

__all__ = ["MAX_BORDER", "border_exp_update", "border_widths", "expm_unsynced"]

#: the border path is taken for k <= n * MAX_BORDER (its 4k x 4k float64 exponential stays small)
MAX_BORDER = 1 / 16
_TAYLOR, _SQUARINGS = 18, 24      # expm_unsynced: degree, and the most squarings (||M||_1 <= 2^24)


def border_widths(u: Tensor) -> list[int | None]:
    """Per matrix of a stack (b, n, n): the smallest k with U[k:, k:] = 0 where it is at most
    n * ``MAX_BORDER``, else None. A matrix is examined only if its last row has at most that
    many nonzeros (a dense step is dismissed by one row)."""
    n = u.shape[-1]
    limit = int(n * MAX_BORDER)
    widths: list[int | None] = [None] * len(u)
    if limit < 1:
        return widths
    candidates = (u[:, -1].ne(0).sum(-1) <= limit).nonzero().squeeze(1).tolist()
    if not candidates:
        return widths
    idx = torch.arange(n, device=u.device, dtype=torch.int32)
    last = torch.where(u[candidates].ne(0), idx, -1).amax(-1)       # last nonzero column per row
    suffix = last.flip(-1).cummax(-1).values.flip(-1)               # max over the rows i >= k
    fits = suffix < idx                                              # U[k:, k:] = 0, k = 0..n-1
    ks = torch.where(fits.any(-1), fits.int().argmax(-1), n).tolist()
    for i, k in zip(candidates, ks):
        widths[i] = k if k <= limit else None
    return widths


def expm_unsynced(m: Tensor) -> Tensor:
    """exp(M) for a float64 stack (b, n, n) without a host read: T_18(M / 2^s) squared s times,
    s = ceil(log2 ||M||_1) per matrix (so ||M / 2^s||_1 <= 1, where T_18's remainder is below
    2^-56), chosen on the device: every matrix runs ``_SQUARINGS`` squarings, masked where they
    exceed its s. nan where ||M||_1 > 2^``_SQUARINGS`` (never for an optimizer's step)."""
    norm = m.abs().sum(-2).amax(-1)
    s = torch.log2(norm).ceil_().clamp_(0, _SQUARINGS)            # ||M|| = 0: log2 = -inf -> 0
    b = m * torch.pow(2.0, -s).view(-1, 1, 1)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    t = eye.expand_as(m)
    for j in range(_TAYLOR, 0, -1):                                # Horner: I + B (I + B/2 (...))
        t = torch.baddbmm(eye, b, t, alpha=1.0 / j)
    for j in range(_SQUARINGS):
        t = torch.where((s > j).view(-1, 1, 1), t @ t, t)
    return torch.where((norm <= 2.0 ** _SQUARINGS).view(-1, 1, 1), t, torch.full_like(t, math.nan))


def _phi(c: Tensor, k: int) -> Tensor:
    """phi(Z) for Z = [[C_k, I], [-C^T C, C_k]] (C_k = C[:k]), float64, by one exponential."""
    c64 = c.double()
    b, dtype, device = len(c), torch.float64, c.device
    eye = torch.eye(2 * k, dtype=dtype, device=device)
    big = torch.zeros(b, 4 * k, 4 * k, dtype=dtype, device=device)
    top = c64[:, :k]
    big[:, :k, :k] = top
    big[:, k:2 * k, k:2 * k] = top
    big[:, :k, k:2 * k] = eye[:k, :k]
    big[:, k:2 * k, :k] = -(c64.mT @ c64)
    big[:, :2 * k, 2 * k:] = eye
    expm = torch.linalg.matrix_exp if big.device.type == "cpu" else expm_unsynced
    return expm(big)[:, :2 * k, 2 * k:]


def border_exp_update(x: Tensor, u: Tensor, k: int, prec: Precision) -> Tensor:
    """X exp(U) for stacks X (b, m, n), U (b, n, n) skew with U[k:, k:] = 0 (``border_widths``),
    returned in X's dtype; as in ``optim.exp_update`` the products run in ``prec`` and the sum
    X + update in the wider of its dtype and X's."""
    if k == 0:                                     # U = 0
        return x.clone()
    xw, c = x.to(prec.dtype), u[:, :, :k].to(prec.dtype, copy=True)
    c[:, :k] *= 0.5
    y = prec.mm(torch.cat([prec.mm(xw, c), xw[:, :, :k]], -1), _phi(c, k).to(prec.dtype))
    if x.dtype.itemsize <= prec.dtype.itemsize:
        out = prec.addmm(xw, y[:, :, k:], c.mT, alpha=-1.0)
        out[:, :, :k] += y[:, :, :k]
        return out.to(x.dtype)
    update = prec.mm(y[:, :, k:], c.mT).neg_()
    update[:, :, :k] += y[:, :, :k]
    return x + update.to(x.dtype)
