"""Worked solutions of lesson 10's exercises (see labkit.solutions)."""

from __future__ import annotations

from ..kernels import fused


def unfused_rmsnorm_residual_bytes(rows, hidden):
    n = rows * hidden
    elements = (
        3 * n  # add: read x and residual, write h
        + 2 * n  # pow: read h, write h²
        + n
        + rows  # mean: read h², write [rows, 1]
        + 2 * rows  # + eps
        + 2 * rows  # rsqrt
        + 2 * n
        + rows  # h * rsqrt: read h and [rows, 1], write
        + 2 * n
        + hidden  # weight *: read weight and the product, write y
    )
    return 4 * elements


def matmul_intensity(m, n, k, element_bytes):
    flops = 2 * m * n * k
    nbytes = (m * k + n * k + m * n) * element_bytes
    return flops / nbytes


# The kernel's worked solution is labkit's own kernel, which lesson 10 shows and reads line by line right
# after the exercise (labkit.kernels.fused.rms_norm_kernel).
rms_norm_kernel = fused.rms_norm_kernel
