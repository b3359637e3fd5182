"""Theorem 1 (docs/CORE.md, Theorem 1): a circular depthwise convolution preserves norms iff its
kernel has exactly one non-zero entry, equal to +1 or -1."""
import itertools

import torch


def circular_conv_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """The (n*n, n*n) matrix of a single-channel circular convolution on an n x n grid."""
    k = kernel.shape[0]
    basis = torch.eye(n * n, dtype=torch.float64).reshape(n * n, 1, n, n)
    padded = torch.nn.functional.pad(basis, (0, k - 1, 0, k - 1), mode="circular")
    out = torch.nn.functional.conv2d(padded, kernel.view(1, 1, k, k))
    return out.reshape(n * n, n * n)


def is_norm_preserving(kernel: torch.Tensor, n: int = 5) -> bool:
    a = circular_conv_matrix(kernel, n)
    return torch.allclose(a.T @ a, torch.eye(n * n, dtype=torch.float64), atol=1e-10)


def single_signed_one(kernel: torch.Tensor) -> bool:
    nz = kernel[kernel != 0]
    return nz.numel() == 1 and abs(nz.item()) == 1


def test_exhaustive_small_kernels():
    values = [-1.0, -0.5, 0.0, 0.5, 1.0]
    count = 0
    for entries in itertools.product(values, repeat=4):
        kernel = torch.tensor(entries, dtype=torch.float64).view(2, 2)
        assert is_norm_preserving(kernel) == single_signed_one(kernel), kernel
        count += is_norm_preserving(kernel)
    assert count == 8  # 4 positions x 2 signs


def test_unit_norm_kernels_with_two_entries_are_not_norm_preserving():
    for theta in torch.linspace(0.1, 1.4, 7, dtype=torch.float64):
        kernel = torch.zeros(3, 3, dtype=torch.float64)
        kernel[0, 0], kernel[1, 2] = torch.cos(theta), torch.sin(theta)  # ||kernel||_2 = 1
        assert not is_norm_preserving(kernel)


def test_random_kernels_are_never_norm_preserving_and_shifts_always_are():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        kernel = torch.randn(3, 3, generator=g, dtype=torch.float64)
        kernel /= kernel.norm()
        assert not is_norm_preserving(kernel)
    for i, j, s in itertools.product(range(3), range(3), (1.0, -1.0)):
        kernel = torch.zeros(3, 3, dtype=torch.float64)
        kernel[i, j] = s
        assert is_norm_preserving(kernel)
