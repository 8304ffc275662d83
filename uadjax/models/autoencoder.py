"""Convolutional autoencoder (AE) and variational autoencoder (VAE) in flax NNX, NHWC.

The AE/VAE baselines in the style of the comparative study of Baur et al. (2021,
"Autoencoders for unsupervised anomaly segmentation in brain MR images"): a strided
convolutional encoder, a bottleneck, a mirrored decoder and a linear output (no sigmoid).

Layout (``C_i = channels[i]``, ``L = len(channels)``, ``s = 2 ** L``, ``h, w = H / s, W / s``):

* encoder, per level i: ``ConvNormAct(C_{i-1} -> C_i)`` halving H and W (a stride-2 3x3
  conv, or a 3x3 conv followed by 2x2 average pooling), then ``convs_per_level - 1``
  more 3x3 ``ConvNormAct(C_i -> C_i)``; ``C_{-1} = in_channels``. Output [B, h, w, C_{L-1}].
* bottleneck ``latent='dense'``: flatten -> Linear(h * w * C_{L-1} -> latent_dim) (twice
  as wide for the VAE: mu and log-variance), and back Linear(latent_dim -> h * w * C_{L-1})
  -> reshape. ``latent='spatial'``: a 1x1 conv to ``latent_dim`` channels at [h, w]
  (twice as wide for the VAE), and back a 1x1 conv to C_{L-1}.
* decoder, per level i = L-1 .. 0: nearest upsampling by 2, ``ConvNormAct(C_i -> C_{i-1})``
  (``C_0`` at level 0), then ``convs_per_level - 1`` more ``ConvNormAct``; a final 3x3
  conv ``C_0 -> out_channels`` with no activation.

``ConvNormAct`` is conv -> GroupNorm (``GroupNorm32``) -> SiLU or LeakyReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uadjax.models.layers import GroupNorm32, avg_pool2, conv, linear, upsample_nearest2
from uadjax.models.registry import register_model

LATENTS = ("dense", "spatial")
DOWNSAMPLES = ("conv", "avgpool")
ACTIVATIONS = {"silu": nnx.silu, "leaky_relu": nnx.leaky_relu}  # leaky slope 0.01 (torch)
# The VAE's log-variance is clipped to this range before use (as the LDM autoencoder does),
# so exp(logvar) can neither overflow nor vanish early in training.
LOGVAR_RANGE = (-30.0, 20.0)


class ConvNormAct(nnx.Module):
    """3x3 conv -> GroupNorm -> activation, optionally halving H and W.

    ``downsample='conv'`` uses a stride-2 conv; ``'avgpool'`` a stride-1 conv followed by
    2x2 average pooling (after the activation).
    """

    def __init__(self, in_features: int, out_features: int, *, activation: str,
                 downsample: str | None = None, rngs: nnx.Rngs):
        stride = 2 if downsample == "conv" else 1
        self.conv = conv(in_features, out_features, 3, stride=stride, rngs=rngs)
        self.norm = GroupNorm32(out_features, rngs=rngs)
        self.activation = activation
        self.pool = downsample == "avgpool"

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H', W', C_out], H' = H / 2 when downsampling, else H."""
        h = ACTIVATIONS[self.activation](self.norm(self.conv(x)))
        return avg_pool2(h) if self.pool else h


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@register_model("conv_autoencoder")
class ConvAutoencoder(nnx.Module):
    """Convolutional AE / VAE with a dense or spatial bottleneck (see the module docstring).

    ``__call__(x, *, key=None)`` returns a dict:
      'reconstruction' [B, H, W, out_channels], linear output;
      'z'              the latent decoded ([B, latent_dim] dense, [B, h, w, latent_dim]
                       spatial);
      'mu', 'logvar'   (VAE only) the posterior mean and clipped log-variance, shaped as z.
    The VAE decodes ``z = mu + exp(logvar / 2) * eps`` when a ``key`` is given (training)
    and ``z = mu`` when ``key`` is None (test time: deterministic).
    """

    def __init__(
        self,
        *,
        image_size: Sequence[int],
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (32, 64, 128, 256),
        convs_per_level: int = 1,
        latent: str = "dense",
        latent_dim: int = 128,
        variational: bool = False,
        downsample: str = "conv",
        activation: str = "silu",
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          image_size: (H, W) of the inputs; both divisible by ``2 ** len(channels)``. The
            dense bottleneck's width depends on it.
          in_channels: input channels (modalities).
          out_channels: output channels; None = ``in_channels``.
          channels: encoder width per level; each level halves H and W.
          convs_per_level: 3x3 convs per level (the first one resamples), >= 1.
          latent: 'dense' (a vector of ``latent_dim``) or 'spatial' (``latent_dim``
            channels at [h, w], through 1x1 convs).
          latent_dim: latent width.
          variational: encode a diagonal Gaussian (mu, logvar) instead of a point.
          downsample: 'conv' (stride-2 conv) or 'avgpool' (conv, then 2x2 average pooling).
          activation: 'silu' or 'leaky_relu'.
          rngs: parameter RNGs.

        Raises:
          ValueError: for an unknown choice, empty or non-positive widths, or an image size
            not divisible by ``2 ** len(channels)``.
        """
        channels = tuple(int(c) for c in channels)
        image_size = tuple(int(s) for s in image_size)
        _check_choice("latent", latent, LATENTS)
        _check_choice("downsample", downsample, DOWNSAMPLES)
        _check_choice("activation", activation, ACTIVATIONS)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be non-empty positive widths, got {channels}")
        if convs_per_level < 1:
            raise ValueError(f"convs_per_level must be >= 1, got {convs_per_level}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        factor = 2 ** len(channels)
        if len(image_size) != 2 or image_size[0] % factor or image_size[1] % factor:
            raise ValueError(f"image_size {image_size} must be (H, W) divisible by {factor} "
                             f"for {len(channels)} levels")
        out_channels = out_channels or in_channels
        self.image_size = image_size
        self.num_levels = len(channels)
        self.in_channels = in_channels
        self.latent = latent
        self.latent_dim = latent_dim
        self.variational = variational
        self.bottom_shape = (image_size[0] // factor, image_size[1] // factor, channels[-1])
        stats_width = 2 * latent_dim if variational else latent_dim

        def block(c_in, c_out, down=None):
            return ConvNormAct(c_in, c_out, activation=activation, downsample=down, rngs=rngs)

        encoder, c_prev = [], in_channels
        for c in channels:
            encoder.append(block(c_prev, c, downsample))
            encoder.extend(block(c, c) for _ in range(convs_per_level - 1))
            c_prev = c
        self.encoder = nnx.List(encoder)

        bottom = self.bottom_shape[0] * self.bottom_shape[1] * channels[-1]
        if latent == "dense":
            self.to_latent = linear(bottom, stats_width, rngs=rngs)
            self.from_latent = linear(latent_dim, bottom, rngs=rngs)
        else:
            self.to_latent = conv(channels[-1], stats_width, 1, rngs=rngs)
            self.from_latent = conv(latent_dim, channels[-1], 1, rngs=rngs)

        decoder = []
        for i in reversed(range(len(channels))):
            c_out = channels[max(i - 1, 0)]
            level = [block(channels[i], c_out)]
            level.extend(block(c_out, c_out) for _ in range(convs_per_level - 1))
            decoder.append(nnx.List(level))
        self.decoder = nnx.List(decoder)
        self.head = conv(channels[0], out_channels, 3, rngs=rngs)

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be [B, H, W, {self.in_channels}], got {tuple(x.shape)}")
        if self.latent == "dense" and tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(f"this dense autoencoder was built for {self.image_size} inputs, "
                             f"got {tuple(x.shape[1:3])}")
        factor = 2 ** self.num_levels
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {tuple(x.shape[1:3])}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """x [B, H, W, in_channels] -> (mu, logvar) of the latent ([B, latent_dim] dense,
        [B, h, w, latent_dim] spatial); logvar is None for the plain AE, clipped to
        ``LOGVAR_RANGE`` for the VAE."""
        self._check_input(x)
        h = x
        for layer in self.encoder:
            h = layer(h)
        if self.latent == "dense":
            h = h.reshape(h.shape[0], -1)
        stats = self.to_latent(h)
        if not self.variational:
            return stats, None
        mu, logvar = jnp.split(stats, 2, axis=-1)
        return mu, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """z ([B, latent_dim] dense, [B, h, w, latent_dim] spatial) -> [B, H, W, out_channels]."""
        h = self.from_latent(z)
        if self.latent == "dense":
            h = h.reshape(h.shape[0], *self.bottom_shape)
        for level in self.decoder:
            h = upsample_nearest2(h)
            for layer in level:
                h = layer(h)
        return self.head(h)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> dict[str, jax.Array]:
        """x [B, H, W, in_channels] -> {'reconstruction', 'z'} (+ 'mu', 'logvar' for the VAE).

        Args:
          x: input images.
          key: VAE only: samples z from the posterior; None decodes the mean.
        """
        mu, logvar = self.encode(x)
        if not self.variational:
            return {"reconstruction": self.decode(mu), "z": mu}
        z = mu
        if key is not None:
            z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
        return {"reconstruction": self.decode(z), "z": z, "mu": mu, "logvar": logvar}
