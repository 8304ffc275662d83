"""ResNet encoder with SparK-style sparse (masked) execution: the cDDPM condition encoder.

The same network runs two ways:
  dense   `encoder(x)` -> feature maps of every stage; cDDPM pools the last one into c.
  sparse  `encoder(x, active=mask)` with `mask [B, h, w]` on the grid of mask units (one unit
          = `encoder.downsample` pixels square): masked units are zeroed at the input and
          after every convolution, normalisation and pooling, and normalisation statistics
          use visible positions only (SparK's sparse convolution / sparse BatchNorm). Nothing
          of a masked unit reaches a visible one, so the features are those of the visible
          units alone.

Normalisation is GroupNorm (masked in sparse mode) instead of the authors' BatchNorm: it has
no running statistics, works with any per-device batch size, and keeps the encoder a pure
function of its parameters (a documented deviation from timm's ResNet-50).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from uadjax.models.layers import GN_EPSILON, conv, num_groups_for
from uadjax.models.registry import register_model


def unit_mask_at(active: jax.Array | None, size: tuple[int, int]) -> jax.Array | None:
    """active [B, h, w] (bool) -> float mask [B, H, W, 1] at a finer resolution (nearest)."""
    if active is None:
        return None
    fy, fx = size[0] // active.shape[1], size[1] // active.shape[2]
    mask = jnp.repeat(jnp.repeat(active, fy, axis=1), fx, axis=2)
    return mask[..., None].astype(jnp.float32)


def apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return x if mask is None else x * mask.astype(x.dtype)


class MaskedGroupNorm(nnx.Module):
    """GroupNorm whose statistics ignore masked positions; masked outputs are zero."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        del rngs
        self.groups = num_groups_for(channels)
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, C], mask [B, H, W, 1] (1 = visible) or None -> [B, H, W, C]."""
        b, h, w, c = x.shape
        g = self.groups
        xg = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        m = jnp.ones((b, h, w, 1, 1), jnp.float32) if mask is None else mask[..., None]
        count = jnp.maximum(jnp.sum(m, axis=(1, 2, 4), keepdims=True) * (c // g), 1.0)
        mean = jnp.sum(xg * m, axis=(1, 2, 4), keepdims=True) / count
        var = jnp.sum(jnp.square(xg - mean) * m, axis=(1, 2, 4), keepdims=True) / count
        y = ((xg - mean) * jax.lax.rsqrt(var + GN_EPSILON)).reshape(b, h, w, c)
        y = y * self.scale[...] + self.bias[...]
        return apply_mask(y, mask).astype(x.dtype)


class Block(nnx.Module):
    """ResNet basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x expansion) residual block."""

    def __init__(self, in_ch: int, width: int, stride: int, bottleneck: bool, expansion: int,
                 *, rngs: nnx.Rngs):
        out_ch = width * expansion if bottleneck else width
        if bottleneck:
            convs = [conv(in_ch, width, 1, rngs=rngs), conv(width, width, 3, stride=stride, rngs=rngs),
                     conv(width, out_ch, 1, rngs=rngs)]
            norms = [MaskedGroupNorm(width, rngs=rngs), MaskedGroupNorm(width, rngs=rngs),
                     MaskedGroupNorm(out_ch, rngs=rngs)]
        else:
            convs = [conv(in_ch, width, 3, stride=stride, rngs=rngs), conv(width, out_ch, 3, rngs=rngs)]
            norms = [MaskedGroupNorm(width, rngs=rngs), MaskedGroupNorm(out_ch, rngs=rngs)]
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = conv(in_ch, out_ch, 1, stride=stride, rngs=rngs)
            self.shortcut_norm = MaskedGroupNorm(out_ch, rngs=rngs)
        else:
            self.shortcut = None
        self.out_channels = out_ch

    def __call__(self, x: jax.Array, active: jax.Array | None) -> jax.Array:
        h = x
        for i, (c, n) in enumerate(zip(self.convs, self.norms)):
            h = c(h)
            mask = unit_mask_at(active, h.shape[1:3])
            h = n(apply_mask(h, mask), mask)
            if i < len(self.convs) - 1:
                h = nnx.relu(h)
        skip = x
        if self.shortcut is not None:
            skip = self.shortcut(x)
            mask = unit_mask_at(active, skip.shape[1:3])
            skip = self.shortcut_norm(apply_mask(skip, mask), mask)
        return nnx.relu(h + skip)


@register_model("resnet_encoder")
class ResNetEncoder(nnx.Module):
    """ResNet feature extractor [B, H, W, C_in] -> one feature map per stage.

    ResNet-50 = stem_channels 64, stem_kernel 7, stem_pool True, stage_widths
    (64, 128, 256, 512), stage_blocks (3, 4, 6, 3), bottleneck True (outputs 256 ... 2048),
    downsample 32.
    """

    def __init__(
        self,
        in_channels: int = 1,
        stem_channels: int = 64,
        stem_kernel: int = 7,
        stem_pool: bool = True,
        stage_widths=(64, 128, 256, 512),
        stage_blocks=(3, 4, 6, 3),
        bottleneck: bool = True,
        expansion: int = 4,
        *,
        rngs: nnx.Rngs,
    ):
        stage_widths, stage_blocks = tuple(stage_widths), tuple(stage_blocks)
        if len(stage_widths) != len(stage_blocks) or not stage_widths:
            raise ValueError(f"stage_widths {stage_widths} and stage_blocks {stage_blocks} "
                             "must be non-empty and of equal length")
        self.stem = conv(in_channels, stem_channels, stem_kernel, stride=2, rngs=rngs)
        self.stem_norm = MaskedGroupNorm(stem_channels, rngs=rngs)
        self.stem_pool = stem_pool
        ch = stem_channels
        stages = []
        for i, (width, n) in enumerate(zip(stage_widths, stage_blocks)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                block = Block(ch, width, stride, bottleneck, expansion, rngs=rngs)
                ch = block.out_channels
                blocks.append(block)
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.stage_channels = tuple(
            w * expansion if bottleneck else w for w in stage_widths)
        self.out_channels = ch
        self.in_channels = in_channels
        self.downsample = 2 * (2 if stem_pool else 1) * 2 ** (len(stage_widths) - 1)

    def __call__(self, x: jax.Array, active: jax.Array | None = None) -> list[jax.Array]:
        """x [B, H, W, C_in] (H, W divisible by `downsample`); active [B, H/ds, W/ds] bool
        (True = visible unit) for sparse execution, None for dense.

        Returns the stage outputs, finest first: [B, H/s, W/s, C_s] for s = 4, 8, ... ds.
        """
        if x.shape[1] % self.downsample or x.shape[2] % self.downsample:
            raise ValueError(f"image size {tuple(x.shape[1:3])} must be divisible by the "
                             f"encoder's downsampling factor {self.downsample}")
        x = apply_mask(x, unit_mask_at(active, x.shape[1:3]))
        h = self.stem(x)
        mask = unit_mask_at(active, h.shape[1:3])
        h = nnx.relu(self.stem_norm(apply_mask(h, mask), mask))
        if self.stem_pool:
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                      ((0, 0), (1, 1), (1, 1), (0, 0)))
            h = apply_mask(h, unit_mask_at(active, h.shape[1:3]))
        features = []
        for stage in self.stages:
            for block in stage:
                h = block(h, active)
            features.append(h)
        return features


def resnet_encoder_config(size: str = "paper") -> ml_collections.ConfigDict:
    """ResNet-50 (`paper`, the cDDPM encoder) or a small ResNet for CPU (`cpu`, `tiny`)."""
    c = ml_collections.ConfigDict()
    c.name = "resnet_encoder"
    c.in_channels = 1
    c.stem_channels = 64
    c.stem_kernel = 7
    c.stem_pool = True
    c.stage_widths = (64, 128, 256, 512)
    c.stage_blocks = (3, 4, 6, 3)
    c.bottleneck = True
    c.expansion = 4
    if size == "cpu":  # basic blocks, 16 px units on 64 px slices
        c.stem_channels = 16
        c.stem_kernel = 3
        c.stage_widths = (16, 32, 64)
        c.stage_blocks = (1, 1, 1)
        c.bottleneck = False
    elif size == "tiny":
        c.stem_channels = 8
        c.stem_kernel = 3
        c.stem_pool = False
        c.stage_widths = (8, 16)
        c.stage_blocks = (1, 1)
        c.bottleneck = False
    return c
