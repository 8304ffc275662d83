"""The convolution rewrites timed by benchmarks/conv_kernels.py compute the same thing as
XLA's convolution (otherwise their timings would say nothing)."""

import jax
import numpy as np
import pytest

from benchmarks import conv_kernels as ck


@pytest.mark.parametrize("shape", [(2, 9, 7, 3, 5), (1, 8, 8, 4, 2), (2, 1, 2, 1, 3)])
def test_winograd_and_kernel_gradient_rewrites_match_xla(shape):
    x, k, dy = ck._inputs(shape)
    np.testing.assert_allclose(ck.winograd_conv3x3(x, k), ck.conv3x3(x, k), rtol=1e-5,
                               atol=1e-5)
    for got, want in zip(ck.fwd_and_grads(ck.winograd_conv3x3)(x, k, dy),
                         ck.fwd_and_grads(ck.conv3x3)(x, k, dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The kernel gradient, against a slow loop over output positions.
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    dyn = np.asarray(dy, np.float64)
    _, h, w, _ = x.shape
    slow = np.zeros(k.shape)
    for i in range(3):
        for j in range(3):
            slow[i, j] = np.einsum("nhwc,nhwd->cd", xp[:, i:i + h, j:j + w], dyn)
    for grad in (ck.kernel_grad_xla, ck.kernel_grad_shifted, ck.kernel_grad_im2col):
        np.testing.assert_allclose(jax.jit(grad)(x, dy), slow, rtol=1e-5, atol=1e-5)
