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


def test_traced_unet_convolutions_are_every_3x3_conv_of_the_network():
    from flax import nnx

    from benchmarks.unet_speed import jax_unet, unet_config

    shapes, share = ck.unet_conv_shapes("tiny", 2)
    graphdef, params = jax_unet(unet_config("tiny")[1])
    convs = [m for _, m in nnx.iter_graph(nnx.merge(graphdef, params))
             if isinstance(m, nnx.Conv) and tuple(m.kernel_size) == (3, 3)
             and tuple(m.strides or (1, 1)) == (1, 1)]
    assert sum(calls for _, calls in shapes) == len(convs)  # each runs once per forward
    assert {(s[3], s[4]) for s, _ in shapes} == {(m.in_features, m.out_features) for m in convs}
    assert 0.5 < share <= 1.0
