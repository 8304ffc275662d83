"""MAEDiff: masked-autoencoder-enhanced patch diffusion (Xu, Wang, Du, arXiv 2401.10561).

pDDPM (`uadjax.methods.pddpm`: same schedule, simplex noise, x0 objective, L1 loss inside
the patch, single-step test reconstruction) with a hierarchical partition and an MAE module
inside the UNet (`uadjax.models.maediff.MAEDiffUNet`; no public code, every value we chose
is listed in configs/maediff.py):

* upper level: p x p patches, noised and reconstructed as in pDDPM (`patch.size` p);
* sub level: an r x r grid of cells (`patch.sub_size` r); the UNet encoder's feature map is
  cut into the same cells (tokens). Patches are aligned to this grid (p, s, H, W multiples of
  r, patch corners multiples of r), so each patch masks exactly (p / r)^2 tokens and
  Nv = (H / r)(W / r) - (p / r)^2 are visible whatever its position: the MAE encoder gets a
  static [B, Nv] gather of the visible (unnoised) tokens, its decoder adds mask tokens for
  the noised patch.

Training: one upper-level patch per image ('grid': one of the test-time sliding positions,
uniformly; 'random': any r-aligned corner), noised at t ~ U(train_t_range); the network
predicts x0 for the whole image with the visible-token indices of that patch; L1 inside the
patch ('image': averaged over the whole image like the pDDPM authors' code, 'patch': mean in
the patch).
Score: for each t in `diffusion.test_timesteps` the patch slides horizontally and vertically
with step s (`patch.stride`; the last position flush with the border); each position is
noised alone (one noise map per t, shared by all positions as in pDDPM) and reconstructed;
the reconstructions are averaged where they overlap, pixel value
sum_k pred_k * mask_k / sum_k mask_k (coverage-weighted, `shared.stitch`), then over t. All
(t, position) variants are one `sweep` (vmap, chunked by `diffusion.sweep_chunk`).
score = mean over channels of |x - rec| (squared with `diffusion.residual = 'l2'`).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uadjax import diffusion
from uadjax.inference.patches import box_masks, patch_positions
from uadjax.methods import shared
from uadjax.methods.base import Method, Stage
from uadjax.models import make_model

# ------------------------------------------------------------------------------------------
# Hierarchical geometry: everything is computed on the r x r token grid, then scaled by r.

def token_geometry(image_hw, pcfg) -> tuple[int, int, int, int]:
    """Validates the partition and returns it in token units.

    Args:
      image_hw: (H, W) in pixels.
      pcfg: `config.patch` with size p, stride s and sub_size r (pixels).
    Returns:
      (H / r, W / r, p / r, s / r).
    Raises:
      ValueError: r < 1, or H, W, p or s not a multiple of r (patches must be unions of
        whole sub-level cells, so the visible-token count is the same for every position).
    """
    height, width = (int(v) for v in image_hw)
    r = int(pcfg.sub_size)
    if r < 1:
        raise ValueError(f"patch.sub_size must be >= 1, got {r}")
    for name, value in (("image height", height), ("image width", width),
                        ("patch.size", pcfg.size), ("patch.stride", pcfg.stride)):
        if int(value) % r:
            raise ValueError(f"{name} {value} is not a multiple of patch.sub_size {r}")
    return height // r, width // r, int(pcfg.size) // r, int(pcfg.stride) // r


def sliding_corners(image_hw, pcfg) -> np.ndarray:
    """Top-left pixel corners of the test-time sliding positions -> [P, 2] int32 (numpy).

    Rows and columns 0, s, 2s, ... and a last position flush with the border; all multiples
    of r (`patch_positions` on the token grid, times r).
    """
    grid_h, grid_w, size, stride = token_geometry(image_hw, pcfg)
    return (patch_positions((grid_h, grid_w), size, stride) * int(pcfg.sub_size)).astype(
        np.int32)


def num_visible(image_hw, pcfg) -> int:
    """Visible (unnoised) tokens per image: (H / r)(W / r) - (p / r)^2."""
    grid_h, grid_w, size, _ = token_geometry(image_hw, pcfg)
    return grid_h * grid_w - size * size


def visible_tokens(corners, image_hw, pcfg) -> jax.Array:
    """Indices of the tokens outside each patch (jit-able).

    Args:
      corners: [B, 2] int top-left pixel corners (multiples of r), numpy or traced.
      image_hw: (H, W).
      pcfg: `config.patch`.
    Returns:
      [B, Nv] int32 token indices, raster order over the (H / r, W / r) grid, ascending.
    """
    grid_h, grid_w, size, _ = token_geometry(image_hw, pcfg)
    tokens = jnp.asarray(corners) // int(pcfg.sub_size)
    masked = box_masks(tokens, (grid_h, grid_w), size).reshape(tokens.shape[0], -1)  # [B, N]
    # A stable sort of the 0/1 flags puts the visible tokens first, in raster order.
    order = jnp.argsort(masked.astype(jnp.int32), axis=-1, stable=True)
    return order[:, :num_visible(image_hw, pcfg)].astype(jnp.int32)


def sample_corners(key, batch_size: int, image_hw, pcfg) -> jax.Array:
    """Training patch corners [B, 2] int32 (pixels, multiples of r).

    'grid': one of the `sliding_corners` uniformly; 'random': a uniform r-aligned corner
    (`shared.sample_boxes` on the token grid, times r).
    """
    grid_h, grid_w, size, stride = token_geometry(image_hw, pcfg)
    token_cfg = types.SimpleNamespace(size=size, stride=stride,
                                      train_positions=pcfg.train_positions)
    corners = shared.sample_boxes(key, batch_size, (grid_h, grid_w), token_cfg)
    return corners * int(pcfg.sub_size)


def _check_config(config) -> None:
    pcfg = config.patch
    if pcfg.loss_reduction not in shared.LOSS_REDUCTIONS:
        raise ValueError(f"unknown patch.loss_reduction {pcfg.loss_reduction!r}; "
                         f"use one of {sorted(shared.LOSS_REDUCTIONS)}")
    token_size = config.model.get("token_size", pcfg.sub_size)
    if token_size != pcfg.sub_size:
        raise ValueError(f"model.token_size {token_size} != patch.sub_size {pcfg.sub_size}: "
                         "the MAE tokens must be the sub-level cells")


# ------------------------------------------------------------------------------------------
# Training.

def make_network(config, rngs: nnx.Rngs) -> nnx.Module:
    return make_model(config.model, rngs=rngs)


def loss_fn(model, batch, key, config):
    """Patch-inpainting denoising loss with the MAE on the visible cells -> (loss, metrics).

    batch['image'] [B, H, W, C] in [0, 1]; model(x_t [B, H, W, C], t [B], visible [B, Nv])
    -> x0 prediction [B, H, W, C]; one patch per image (traced), loss inside it only.
    """
    _check_config(config)
    dcfg, pcfg = config.diffusion, config.patch
    schedule = shared.schedule_of(config)
    x0 = shared.to_model_range(batch["image"])
    batch_size, height, width, _ = x0.shape
    k_t, k_noise, k_box, k_drop = jax.random.split(key, 4)
    t = shared.sample_train_t(k_t, batch_size, dcfg)
    noise = shared.noise_fn_of(dcfg)(k_noise, x0.shape, t)
    corners = sample_corners(k_box, batch_size, (height, width), pcfg)
    mask = box_masks(corners, (height, width), pcfg.size)[..., None]  # [B, H, W, 1]
    x_t = shared.noise_patch(schedule, x0=x0, t=t, noise=noise, mask=mask)
    visible = visible_tokens(corners, (height, width), pcfg)
    prediction = model(x_t, t, visible, deterministic=False, rngs=nnx.Rngs(dropout=k_drop))
    target = diffusion.target_for(dcfg.prediction, x0, noise, schedule, t)
    weights = mask.astype(jnp.float32)
    if dcfg.get("loss_in_brain", False):
        weights = weights * batch["brain_mask"][..., None].astype(jnp.float32)
    loss = diffusion.diffusion_loss(prediction, target, kind=dcfg.loss, mask=weights,
                                    mask_reduction=shared.LOSS_REDUCTIONS[
                                        pcfg.loss_reduction])
    return loss, {}


# ------------------------------------------------------------------------------------------
# Test time.

def reconstruct(model, x0, key, config):
    """Sliding-patch reconstruction of x0 [B, H, W, C] in [-1, 1] -> [B, H, W, C] in [-1, 1].

    pDDPM's sweep over (t, position) (`shared.patch_sweep_reconstruct`) on the sliding
    positions, each prediction given the visible cells of its patch; overlapping positions
    are averaged with coverage weights, then the T values.
    """
    _check_config(config)
    pcfg = config.patch
    batch_size = x0.shape[0]
    image_hw = x0.shape[1:3]
    corners = sliding_corners(image_hw, pcfg)  # [P, 2] numpy
    masks = box_masks(corners, image_hw, pcfg.size).astype(jnp.float32)  # [P, H, W]
    visible = visible_tokens(corners, image_hw, pcfg)  # [P, Nv]

    def predict(x_t, t, position):
        return model(x_t, t, jnp.broadcast_to(visible[position], (batch_size, visible.shape[1])))

    return shared.patch_sweep_reconstruct(predict, x0, masks, key, config)


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W] mean residual over channels, 'reconstruction': [B, H, W, C]}.

    batch['image'] [B, H, W, C] in [0, 1]; the reconstruction is in the same units.
    """
    image = batch["image"]
    rec = shared.from_model_range(
        reconstruct(models["diffusion"], shared.to_model_range(image), key, config))
    return shared.residual_score(image, rec, config)


def network_evaluations(config) -> dict[str, float]:
    """T test t values x P sliding positions passes of the UNet (with its MAE module)."""
    positions = sliding_corners(tuple(config.data.image_size), config.patch).shape[0]
    return {"unet+mae": len(config.diffusion.test_timesteps) * positions}


METHOD = Method(
    name="maediff",
    stages=(Stage(name="diffusion", make_model=make_network, loss_fn=loss_fn),),
    score_fn=score_fn,
    network_evaluations=network_evaluations,
)
