"""RandAugment (Cubuk et al. 2020) on a whole batch, as tensor operations on its device.

The definition is torchvision's ``transforms.RandAugment(num_ops=2, magnitude=9,
num_magnitude_bins=31)`` on PIL images (nearest interpolation, fill 0), the transform of the
LiResNet++ recipe that LipNeXt follows. Each augmented image gets ``num_ops`` operations in
turn, each drawn uniformly from the 14 of :data:`OPS`, with a random sign for the signed
ones; at magnitude m of B bins (level t = m / (B - 1), 0.3 at m = 9, B = 31):

==============  ===============================================  ==================
op              action on an image x in [0, 1]                   value at m = 9
==============  ===============================================  ==================
identity        x
shear_x / _y    x(u + s v, v) / x(u, v + s u), s = +-0.3 t         s = +-0.09
translate_x/_y  shift by int(+-150/331 t W) (H for y) pixels       +-4 px at 32, 8 at 64
rotate          by +-30 t degrees about the centre                 +-9 degrees
brightness      clip(f x), f = 1 +- 0.9 t                          f = 1 +- 0.27
color           clip(g + f (x - g)), g = 0.299 R + 0.587 G + 0.114 B
contrast        clip(mu + f (x - mu)), mu = the mean of g
sharpness       clip(k + f (x - k)), k = x smoothed by [[1,1,1],[1,5,1],[1,1,1]]/13
                (border pixels unsmoothed)
posterize       keep the top 8 - round(4 t) bits of round(255 x)    7 bits
solarize        x < c ? x : 1 - x, c = 1 - t                       c = 178.5 / 255
autocontrast    (x - min) / (max - min) per channel (if max > min)
equalize        PIL's histogram equalization of round(255 x) per channel
==============  ===============================================  ==================

Geometric ops sample the nearest pixel with PIL's convention (output pixel (u, v) reads the
input at floor(A (u + 1/2, v + 1/2))) and fill 0 outside. Intermediate images stay float32
(PIL rounds each op's result to 8 bits; the differences, op by op, are bounded in
tests/test_randaugment.py). The random draws (:meth:`RandAugment.sample`) are per image:
whether it is augmented (probability ``p``), its ops and their signs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RandAugment", "OPS", "op_values", "apply_op", "affine_nearest"]

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
       "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = frozenset(OPS[1:10])
GREY = (0.299, 0.587, 0.114)        # PIL's "L" conversion (ITU-R 601-2 luma)
SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's ImageFilter.SMOOTH, / 13


def op_values(magnitude: int, bins: int, image_size: tuple[int, int]) -> dict[str, float]:
    """Each op's value at ``magnitude`` (torchvision's bins, float32 linspace as there)."""
    h, w = image_size

    def level(hi: float) -> float:
        return float(torch.linspace(0.0, hi, bins)[magnitude])

    return {"shear_x": level(0.3), "shear_y": level(0.3),
            "translate_x": float(int(level(150.0 / 331.0 * w))),
            "translate_y": float(int(level(150.0 / 331.0 * h))),
            "rotate": level(30.0), "brightness": level(0.9), "color": level(0.9),
            "contrast": level(0.9), "sharpness": level(0.9),
            "posterize": float(8 - int((torch.arange(bins) / ((bins - 1) / 4)).round()[magnitude])),
            "solarize": float(torch.linspace(255.0, 0.0, bins)[magnitude]) / 255.0,
            "identity": 0.0, "autocontrast": 0.0, "equalize": 0.0}


def affine_nearest(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Output pixel (u, v) of image i = x_i at floor(theta_i @ (u + 1/2, v + 1/2, 1)) (nearest,
    PIL's convention), 0 outside. x (B, C, H, W); theta (B, 2, 3), input from output coordinates."""
    b, c, h, w = x.shape
    theta = theta.to(device=x.device, dtype=torch.float32)
    v, u = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32) + 0.5,
                          torch.arange(w, device=x.device, dtype=torch.float32) + 0.5, indexing="ij")
    col = torch.floor(theta[:, 0, 0, None, None] * u + theta[:, 0, 1, None, None] * v + theta[:, 0, 2, None, None])
    row = torch.floor(theta[:, 1, 0, None, None] * u + theta[:, 1, 1, None, None] * v + theta[:, 1, 2, None, None])
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long().view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return torch.where(inside[:, None], out, torch.zeros((), dtype=x.dtype, device=x.device))


def _maps(op: str, v: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, 3) input-from-output maps of a geometric op with signed values v (B,), as
    torchvision hands them to PIL: shears about the corner (0, 0), rotation about the centre."""
    v = v.double()
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if op == "shear_x":
        rows = [one, v, zero, zero, one, zero]
    elif op == "shear_y":
        rows = [one, zero, zero, v, one, zero]
    elif op == "translate_x":
        rows = [one, zero, -v, zero, one, zero]
    elif op == "translate_y":
        rows = [one, zero, zero, zero, one, -v]
    else:                                      # rotate by v degrees counter-clockwise
        cy, cx = image_size[0] / 2, image_size[1] / 2
        a = torch.deg2rad(-v)
        cos, sin = torch.cos(a), torch.sin(a)
        rows = [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]
    return torch.stack(rows, dim=1).view(-1, 2, 3)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of RGB images; grey images as they are."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (GREY[0] * r + GREY[1] * g + GREY[2] * b).unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: clip(d + f (x - d)) with a factor f (B,) per image."""
    return (degenerate + f.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0.0, 1.0)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter: interior pixels smoothed, the one-pixel border kept. Nine shifted
    slices rather than conv2d, whose algorithm (and rounding) depends on the batch size: an
    image gets the same bits on one process or on several."""
    h, w = x.shape[-2:]
    total = sum(SMOOTH[1 + dy][1 + dx] * x[..., 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
                for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out = x.clone()
    out[..., 1:-1, 1:-1] = total / 13.0
    return out


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """Pixel values on the 8-bit grid: round(255 x) as int64."""
    return (x * 255.0).round().clamp(0, 255).long()


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per image and channel: lut[i] = (step // 2 + cum[i - 1]) // step,
    step = (pixels - pixels at the top level) // 255; unchanged where step = 0."""
    b, c, h, w = x.shape
    q = _bytes(x).view(b, c, h * w)
    hist = torch.zeros(b, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, q, torch.ones_like(q))
    top = 255 - (hist > 0).flip(-1).long().argmax(-1, keepdim=True)       # highest level present
    step = (h * w - hist.gather(2, top)) // 255
    below = torch.cat([torch.zeros_like(hist[..., :1]), hist.cumsum(-1)[..., :-1]], dim=-1)
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(0, 255)
    out = torch.where(step > 0, lut.gather(2, q), q)
    return (out.to(x.dtype) / 255.0).view(b, c, h, w)


def apply_op(op: str, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Op ``op`` of :data:`OPS` on images x (B, C, H, W) in [0, 1], with values v (B,) (signed
    for the signed ops; see :func:`op_values`)."""
    if op in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        return affine_nearest(x, _maps(op, v, x.shape[-2:]))
    v = v.to(device=x.device, dtype=x.dtype)
    if op == "brightness":
        return _blend(torch.zeros_like(x), x, 1.0 + v)
    if op == "color":
        return x if x.shape[1] == 1 else _blend(_grey(x), x, 1.0 + v)
    if op == "contrast":
        # mean in float64: the float32 result does not show the reduction's order, which on a
        # GPU may depend on the batch size (and so on the number of processes)
        return _blend(_grey(x).double().mean(dim=(1, 2, 3), keepdim=True).to(x.dtype), x, 1.0 + v)
    if op == "sharpness":
        return x if min(x.shape[-2:]) < 3 else _blend(_smooth(x), x, 1.0 + v)
    if op == "posterize":
        keep = (2 ** (8 - v.long())).view(-1, 1, 1, 1)
        return (_bytes(x) // keep * keep).to(x.dtype) / 255.0
    if op == "solarize":
        return torch.where(x < v.view(-1, 1, 1, 1), x, 1.0 - x)
    if op == "autocontrast":
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, ((x - lo) / (hi - lo).clamp(min=1e-12)).clamp(0.0, 1.0), x)
    if op == "equalize":
        return _equalize(x)
    if op == "identity":
        return x
    raise ValueError(f"unknown RandAugment op {op!r}; choose one of {', '.join(OPS)}")


@dataclass
class RandAugment:
    """``num_ops`` ops at ``magnitude`` (of ``bins``) on each image, with probability ``p``."""

    num_ops: int = 2
    magnitude: int = 9
    p: float = 0.5
    bins: int = 31

    def __post_init__(self):
        if self.num_ops < 1:
            raise ValueError(f"augment.randaugment_ops must be >= 1, got {self.num_ops}")
        if not 0 <= self.magnitude < self.bins:
            raise ValueError(f"augment.randaugment_magnitude must lie in [0, {self.bins - 1}], "
                             f"got {self.magnitude}")
        if not 0 <= self.p <= 1:
            raise ValueError(f"augment.randaugment_p is a probability in [0, 1], got {self.p}")

    def sample(self, n: int, generator: torch.Generator, n_augmented: int | None = None) -> dict[str, torch.Tensor]:
        """Draws for n images (CPU): ``randaugment`` (augmented or not; never for rows from
        ``n_augmented`` on), ``randaugment_ops`` (n, num_ops) indices into :data:`OPS`,
        ``randaugment_negative`` (n, num_ops) signs."""
        on = torch.rand(n, generator=generator) < self.p
        on[n if n_augmented is None else n_augmented:] = False
        return {"randaugment": on,
                "randaugment_ops": torch.randint(0, len(OPS), (n, self.num_ops), generator=generator),
                "randaugment_negative": torch.randint(0, 2, (n, self.num_ops), generator=generator).bool()}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] augmented with the draws of :meth:`sample` (rows for these B)."""
        if x.shape[1] not in (1, 3):
            raise ValueError(f"RandAugment works on grey or RGB images, got {x.shape[1]} channels")
        values = op_values(self.magnitude, self.bins, x.shape[-2:])
        on, ops, negative = params["randaugment"], params["randaugment_ops"], params["randaugment_negative"]
        for k in range(self.num_ops):
            for i in ops[on, k].unique().tolist():
                if OPS[i] == "identity":
                    continue
                rows = (on & (ops[:, k] == i)).nonzero().squeeze(1)
                sign = 1.0 - 2.0 * negative[rows, k].double() if OPS[i] in SIGNED else torch.ones(len(rows))
                rows_dev = rows.to(x.device)
                x = x.index_copy(0, rows_dev, apply_op(OPS[i], x.index_select(0, rows_dev), values[OPS[i]] * sign))
        return x
