"""Matrix products in a chosen precision: fp64, fp32, TF32 or bf16 (docs/CORE.md, Optimizer).

``product(name)`` returns a ``Precision``: its ``mm(a, b)`` and ``addmm(c, a, b)``
(beta c + alpha a b) take and return the working dtype (float64 for fp64, else float32),
and its error constants bound the rounding of a product entrywise, |fl(AB) - AB| <= (2 u_op + u_op^2 + gamma_n(u_acc)) |A| |B|:

    fp64:  float64 throughout                          u_op = 0,      u_acc = 2^-53
    fp32:  float32 (no TF32 even if enabled globally)   u_op = 0,      u_acc = 2^-24
    tf32:  operands rounded to a 10-bit mantissa,       u_op = 2^-11,  u_acc = 2^-24
           products exact, fp32 accumulation (tensor cores on CUDA; emulated on CPU)
    bf16:  A = A_hi + A_lo with both halves bf16 (likewise B), and
           AB ~ A_hi B_hi + A_hi B_lo + A_lo B_hi: three bf16 products, fp32 accumulation
           (``mm.dtype`` on CUDA; on CPU the bf16 operands are multiplied in fp32, which is
           exact); the dropped A_lo B_lo and the rounding of the halves leave u_op = 2^-15.

A single bf16 product (u = 2^-8) puts a rounding error of about 2^-8 |X| |W| into each
update X (E - I): over 1,000 NAdam-like steps it drifted 200x more than fp32 and past
the 1e-4 limit (docs/BENCHMARKS.md), hence the split.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PRECISIONS", "Precision", "product", "round_tf32"]

PRECISIONS = ("auto", "fp64", "fp32", "tf32", "bf16")


Addmm = Callable[[Tensor | None, Tensor, Tensor, float, float], Tensor]


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype              # working dtype of operands and results
    operand_u: float                # unit roundoff of the operands as multiplied
    accumulate_u: float             # unit roundoff of the accumulation
    _addmm: Addmm                   # (c, a, b, beta, alpha) -> beta c + alpha a @ b

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        """a @ b for (k, n, n) batches."""
        return self._addmm(None, a, b, 0.0, 1.0)

    def addmm(self, c: Tensor, a: Tensor, b: Tensor, *, beta: float = 1.0,
              alpha: float = 1.0) -> Tensor:
        """beta c + alpha a @ b for (k, ., .) batches, fused where the backend has it."""
        return self._addmm(c, a, b, beta, alpha)

    def error_constant(self, n: int) -> float:
        """c with |fl(AB) - AB| <= c |A| |B| entrywise for inner dimension n."""
        nu = n * self.accumulate_u
        return 2 * self.operand_u + self.operand_u ** 2 + nu / (1 - nu)


def round_tf32(x: Tensor) -> Tensor:
    """x (float32) rounded to nearest, ties to even, to TF32's 10-bit mantissa."""
    bits = x.view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = ((bits + 0x0FFF + lsb) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def _get(backend: str) -> str:
    return torch._C._get_fp32_precision_getter(backend, "matmul")


def _set(backend: str, value: str) -> None:
    torch._C._set_fp32_precision_setter(backend, "matmul", value)


@dataclass(frozen=True)
class _MatmulFlags:
    """PyTorch's two switches for float32 matmuls: the legacy precision ("highest", "high",
    "medium": ``allow_tf32``, ``get_float32_matmul_precision``) and the new per-backend ones
    (``fp32_precision`` of cuda.matmul and mkldnn.matmul; "none": inherited). Each legacy
    reader raises "mix of the legacy and new APIs" when the two disagree."""
    legacy: str
    cuda: str
    mkldnn: str

    @staticmethod
    def read() -> "_MatmulFlags":
        """The flags as they are; never raises, whichever API set them."""
        inherits = {b: _get(b) == torch._C._get_fp32_precision_getter(b, "all") for b in ("cuda", "mkldnn")}
        new = {b: "none" if inherits[b] else _get(b) for b in inherits}
        for b in new:                      # "ieee" on both agrees with any legacy value
            _set(b, "ieee")
        legacy = torch.get_float32_matmul_precision()
        for b, value in new.items():
            _set(b, value)
        return _MatmulFlags(legacy, new["cuda"], new["mkldnn"])

    @staticmethod
    def agreeing(mode: str) -> "_MatmulFlags":
        """Flags with CUDA matmuls in ``mode`` ("ieee" or "tf32") that every reader accepts:
        the legacy value that matches both backends (mkldnn's own kept where it can be)."""
        mkldnn = _get("mkldnn")
        if mode == "ieee":
            return _MatmulFlags("highest", "ieee", "ieee" if mkldnn in ("bf16", "tf32") else "none")
        return _MatmulFlags("medium" if mkldnn == "bf16" else "high", "tf32", mkldnn)

    def apply(self) -> None:
        torch.set_float32_matmul_precision(self.legacy)     # sets both backends too: then each one's
        _set("cuda", self.cuda)
        _set("mkldnn", self.mkldnn)


@contextlib.contextmanager
def _cuda_fp32_precision(device: torch.device, mode: str) -> Iterator[None]:
    """CUDA float32 matmuls in ``mode`` ("ieee" or "tf32") inside the block; no-op elsewhere.

    Both APIs are set to agree, so code inside that reads either one (``allow_tf32``, as
    torch.compile's tracing does, or ``fp32_precision``) works, in a fresh process too; both are
    restored on exit, exactly as they were."""
    if device.type != "cuda":
        yield
        return
    before = _MatmulFlags.read()
    _MatmulFlags.agreeing(mode).apply()
    try:
        yield
    finally:
        before.apply()


def _baddbmm(c: Tensor | None, a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    if c is None:
        out = torch.bmm(a, b)
        return out if alpha == 1 else out.mul_(alpha)
    return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)


def _addmm_ieee(c: Tensor | None, a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    with _cuda_fp32_precision(a.device, "ieee"):
        return _baddbmm(c, a, b, beta, alpha)


def _addmm_tf32(c: Tensor | None, a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    if a.device.type == "cuda":
        with _cuda_fp32_precision(a.device, "tf32"):
            return _baddbmm(c, a, b, beta, alpha)
    return _baddbmm(c, round_tf32(a), round_tf32(b), beta, alpha)


def _split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    hi = x.bfloat16()
    return hi, (x - hi.float()).bfloat16()


def _bf16_pair(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for bf16 batches with fp32 accumulation and an fp32 result."""
    if a.device.type == "cuda":
        return torch.bmm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()          # products of bf16 numbers are exact in fp32


def _addmm_bf16(c: Tensor | None, a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    a_hi, a_lo = _split_bf16(a)
    b_hi, b_lo = _split_bf16(b)
    prod = (_bf16_pair(a_hi, b_hi) + _bf16_pair(a_hi, b_lo)) + _bf16_pair(a_lo, b_hi)
    if c is None:
        return prod if alpha == 1 else prod.mul_(alpha)
    return torch.add(c if beta == 1 else beta * c, prod, alpha=alpha)


_PRODUCTS = {
    "fp64": Precision("fp64", torch.float64, 0.0, 2.0 ** -53, _baddbmm),
    "fp32": Precision("fp32", torch.float32, 0.0, 2.0 ** -24, _addmm_ieee),
    "tf32": Precision("tf32", torch.float32, 2.0 ** -11, 2.0 ** -24, _addmm_tf32),
    "bf16": Precision("bf16", torch.float32, 2.0 ** -15, 2.0 ** -24, _addmm_bf16),
}


def product(name: str, device: torch.device | str = "cpu") -> Precision:
    """The ``Precision`` called ``name`` (one of ``PRECISIONS``); "auto" is TF32 on a CUDA
    ``device`` (tensor cores; drift stays at the fp32 level, tests/test_fast_exp.py) and fp32
    elsewhere."""
    if name == "auto":
        name = "tf32" if torch.device(device).type == "cuda" else "fp32"
    if name not in _PRODUCTS:
        raise ValueError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return _PRODUCTS[name]
