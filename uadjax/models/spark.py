"""SparK masked image modelling for a ResNet encoder (Tian et al. 2023; cDDPM stage 1).

The encoder sees only the visible mask units (sparse execution, see `resnet.py`). Its stage
features are "densified": normalised over the visible positions (SparK's sparse BatchNorm,
here a masked GroupNorm), masked positions filled with a learned mask token per scale, then
projected (1x1 conv at the coarsest scale, 3x3 elsewhere) to the light decoder's width.
The decoder starts from the coarsest scale and upsamples by 2 per stage (transposed conv
k4 s2, then two conv3x3-norm-ReLU6), adding the projected feature of each matching scale,
and ends with a 1x1 conv to the image channels. The loss is the mean squared error on the
masked units only (`masked_reconstruction_loss`), without per-patch normalisation.
Left out: the encoder's drop-path (timm drop_path_rate 0.05), a regulariser of long runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from uadjax.models.layers import GroupNorm32, conv, torch_kernel_init
from uadjax.models.resnet import MaskedGroupNorm, ResNetEncoder, unit_mask_at


def random_unit_mask(key: jax.Array, batch: int, grid: tuple[int, int],
                     mask_ratio: float) -> jax.Array:
    """-> active [B, gh, gw] bool: round(units * (1 - mask_ratio)) visible units per image,
    chosen uniformly at random (at least one)."""
    units = grid[0] * grid[1]
    keep = max(1, round(units * (1.0 - mask_ratio)))
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, units)), axis=1), axis=1)
    return (ranks < keep).reshape(batch, *grid)


def masked_reconstruction_loss(prediction: jax.Array, target: jax.Array,
                               active: jax.Array) -> jax.Array:
    """Mean squared error over the pixels of masked units only.

    prediction, target [B, H, W, C]; active [B, gh, gw] (True = visible unit, excluded).
    """
    masked = 1.0 - unit_mask_at(active, prediction.shape[1:3])
    sq = jnp.square(prediction - target) * masked
    return jnp.sum(sq) / jnp.maximum(jnp.sum(masked) * prediction.shape[-1], 1.0)


class UpBlock(nnx.Module):
    """Transposed conv (k4, s2) then 2 x [conv3x3, GroupNorm, ReLU6]: [B,h,w,Ci] -> [B,2h,2w,Co]."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        self.up = nnx.ConvTranspose(in_ch, in_ch, kernel_size=(4, 4), strides=(2, 2),
                                    padding="SAME", kernel_init=torch_kernel_init(), rngs=rngs)
        self.conv1 = conv(in_ch, out_ch, 3, rngs=rngs)
        self.norm1 = GroupNorm32(out_ch, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, rngs=rngs)
        self.norm2 = GroupNorm32(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.up(x)
        x = jax.nn.relu6(self.norm1(self.conv1(x)))
        return jax.nn.relu6(self.norm2(self.conv2(x)))


class SparKPretrainer(nnx.Module):
    """ResNet encoder + mask tokens + projections + light decoder (SparK).

    Attributes:
      encoder: the `ResNetEncoder` whose weights cDDPM's stage 2 starts from.
    """

    def __init__(self, encoder: ResNetEncoder, decoder_width: int = 512, *, rngs: nnx.Rngs):
        self.encoder = encoder
        chans = encoder.stage_channels  # finest first
        num_up = round(math.log2(encoder.downsample))
        widths = [max(decoder_width // 2 ** i, 1) for i in range(num_up + 1)]  # coarsest first
        coarse_first = list(reversed(chans))
        self.mask_tokens = nnx.List([
            nnx.Param(0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (c,)))
            for c in coarse_first])
        self.densify_norms = nnx.List([MaskedGroupNorm(c, rngs=rngs) for c in coarse_first])
        self.projections = nnx.List([
            conv(c, widths[i], 1 if i == 0 else 3, rngs=rngs) for i, c in enumerate(coarse_first)])
        self.decoder = nnx.List([UpBlock(widths[i], widths[i + 1], rngs=rngs)
                                 for i in range(num_up)])
        self.head = conv(widths[-1], encoder.in_channels, 1, rngs=rngs)

    def __call__(self, x: jax.Array, active: jax.Array) -> jax.Array:
        """x [B, H, W, C] in [0, 1], active [B, H/ds, W/ds] bool -> reconstruction [B, H, W, C]."""
        features = list(reversed(self.encoder(x, active)))  # coarsest first
        h = None
        for i, up in enumerate(self.decoder):
            if i < len(features):
                f = features[i]
                visible = unit_mask_at(active, f.shape[1:3])
                f = self.densify_norms[i](f, visible)
                dense = f * visible + self.mask_tokens[i][...] * (1.0 - visible)
                projected = self.projections[i](dense)
                h = projected if h is None else h + projected
            h = up(h)
        return self.head(h)
