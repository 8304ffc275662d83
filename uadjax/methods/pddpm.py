"""pDDPM: patched DDPM reconstruction (Behrendt et al., MIDL 2023).

The DDPM of `uadjax.methods.ddpm` (same UNet, schedule, noise and x0 objective), but only one
square patch of the image is noised; the clean rest of the slice is context for inpainting it.

Training: per image one box is chosen ('grid': one of the test-time positions, the authors'
`grid_boxes`; 'random': a uniform top-left corner). x_t is the clean x0 in [-1, 1] outside
the box and q_sample(x0, t, noise) inside it; the UNet predicts x0 for the whole image and the
L1 loss counts only inside the box ('image': averaged over the whole image as the authors'
`inpaint` + `F.l1_loss`, so the box gets weight patch/image area; 'patch': mean in the box).
Score: for each t in `diffusion.test_timesteps` and each patch position p, noise only patch p
(one noise map per t, shared by all positions and slices as in the authors' code), call the
network once and keep its prediction inside p. The patches are stitched as
sum_p pred_p * mask_p / sum_p mask_p (the plain 2x2 mosaic for the paper's grid, an average
where overlapping patches meet) and averaged over the t's (ENS). All (t, position) variants
are one `sweep` (vmap, chunked by `diffusion.sweep_chunk`).
score = mean over channels of |x - rec| (squared with `diffusion.residual = 'l2'`).

Config section `patch`: size (48 at 96 px), stride (= size: the paper's non-overlapping
grid), train_positions ('grid' | 'random'), loss_reduction ('image' | 'patch').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uadjax import diffusion
from uadjax.inference.patches import (
    box_masks,
    check_geometry,
    patch_masks,
    patch_positions,
)
from uadjax.inference.sweep import sweep, weighted_mean
from uadjax.methods.base import Method, Stage
from uadjax.methods.ddpm import (
    make_noise_fn,
    make_schedule,
    residual_score,
    sample_train_t,
    to_model_range,
)
from uadjax.models import make_model

TRAIN_POSITIONS = ("grid", "random")
# patch.loss_reduction -> diffusion.diffusion_loss(mask_reduction=...)
LOSS_REDUCTIONS = {"image": "image", "patch": "mask"}


def sample_boxes(key, batch_size: int, image_size, pcfg):
    """Per-image training box corners -> [B, 2] int32 (traced).

    'grid': one of the test-time `patch_positions`, uniformly (authors' `grid_boxes`);
    'random': a uniform corner among all (H - size + 1) x (W - size + 1).
    """
    height, width = check_geometry(image_size, pcfg.size, pcfg.stride)
    if pcfg.train_positions == "grid":
        positions = jnp.asarray(patch_positions((height, width), pcfg.size, pcfg.stride))
        return positions[jax.random.randint(key, (batch_size,), 0, positions.shape[0])]
    if pcfg.train_positions == "random":
        k_row, k_col = jax.random.split(key)
        rows = jax.random.randint(k_row, (batch_size,), 0, height - pcfg.size + 1)
        cols = jax.random.randint(k_col, (batch_size,), 0, width - pcfg.size + 1)
        return jnp.stack([rows, cols], axis=-1).astype(jnp.int32)
    raise ValueError(f"unknown patch.train_positions {pcfg.train_positions!r}; "
                     f"use one of {TRAIN_POSITIONS}")


# ------------------------------------------------------------------------------------------
# Forward process restricted to a patch.

def noise_patch(schedule, *, x0, t, noise, mask):
    """x_t inside the mask, the clean x0 (exactly) outside.

    Args:
      x0: [B, H, W, C] clean images in [-1, 1].
      t: [B] int timesteps.
      noise: [B, H, W, C].
      mask: [B, H, W, 1] (or broadcastable) bool / {0, 1}.
    Returns:
      [B, H, W, C].
    """
    x_t = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise)
    return jnp.where(mask.astype(bool), x_t, x0)


def make_unet(config, rngs: nnx.Rngs) -> nnx.Module:
    return make_model(config.model, rngs=rngs)


def loss_fn(model, batch, key, config):
    """Patch-inpainting denoising loss on healthy slices -> (loss, metrics).

    batch['image'] [B, H, W, C] in [0, 1]; one box per image (traced), loss inside it only.
    """
    dcfg, pcfg = config.diffusion, config.patch
    if pcfg.loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"unknown patch.loss_reduction {pcfg.loss_reduction!r}; "
                         f"use one of {sorted(LOSS_REDUCTIONS)}")
    schedule = make_schedule(config)
    x0 = to_model_range(batch["image"])
    batch_size, height, width, _ = x0.shape
    k_t, k_noise, k_box, k_drop = jax.random.split(key, 4)
    t = sample_train_t(k_t, batch_size, dcfg)
    noise = make_noise_fn(dcfg)(k_noise, x0.shape)
    corners = sample_boxes(k_box, batch_size, (height, width), pcfg)
    mask = box_masks(corners, (height, width), pcfg.size)[..., None]  # [B, H, W, 1]
    x_t = noise_patch(schedule, x0=x0, t=t, noise=noise, mask=mask)
    prediction = model(x_t, t, deterministic=False, rngs=nnx.Rngs(dropout=k_drop))
    target = diffusion.target_for(dcfg.prediction, x0, noise, schedule, t)
    weights = mask.astype(jnp.float32)
    if dcfg.get("loss_in_brain", False):
        weights = weights * batch["brain_mask"][..., None].astype(jnp.float32)
    loss = diffusion.diffusion_loss(prediction, target, kind=dcfg.loss, mask=weights,
                                    mask_reduction=LOSS_REDUCTIONS[pcfg.loss_reduction])
    return loss, {}


# ------------------------------------------------------------------------------------------
# Test time.

def stitch(patch_predictions, masks):
    """Averages patch predictions where they overlap.

    Args:
      patch_predictions: [..., P, B, H, W, C], each already zero outside its patch.
      masks: [P, H, W] patch masks whose union covers the image.
    Returns:
      [..., B, H, W, C] sum_p pred_p / sum_p mask_p.
    """
    coverage = jnp.sum(jnp.asarray(masks, jnp.float32), axis=0)[None, :, :, None]
    return jnp.sum(patch_predictions, axis=-5) / coverage


def patch_sweep_reconstruct(predict, x0, masks, key, config):
    """Single-step reconstruction of every patch at every test t, stitched and averaged.

    Args:
      predict: (x_t [B, H, W, C], t [B] int32, patch index [] int32) -> network prediction.
      x0: [B, H, W, C] in [-1, 1].
      masks: [P, H, W] patch masks whose union covers the image.
      key: PRNG key of the noise (one map per t, shared by every patch position).
      config: `diffusion.test_timesteps`, `diffusion.sweep_chunk` and the schedule fields.
    Returns:
      [B, H, W, C] in [-1, 1]: the T x P variants run as one `sweep`; results
      [T, P, B, H, W, C] are averaged over overlapping patches, then over T.
    """
    dcfg = config.diffusion
    schedule = make_schedule(config)
    noise_fn = make_noise_fn(dcfg)
    timesteps = jnp.asarray(dcfg.test_timesteps, jnp.int32)  # [T]
    num_t, num_p = timesteps.shape[0], masks.shape[0]
    # One noise map per t, shared by every patch position (and, for shared simplex noise,
    # every slice): [T, B, H, W, C].
    noises = jnp.stack([noise_fn(k, x0.shape) for k in jax.random.split(key, num_t)])
    t_index, p_index = jnp.meshgrid(jnp.arange(num_t), jnp.arange(num_p), indexing="ij")

    def one_variant(variant):
        ti, pi = variant
        t = jnp.full((x0.shape[0],), timesteps[ti], jnp.int32)
        mask = masks[pi][None, :, :, None]
        x_t = noise_patch(schedule, x0=x0, t=t, noise=noises[ti], mask=mask)
        x0_hat = diffusion.to_x0(schedule, prediction=predict(x_t, t, pi), x_t=x_t, t=t,
                                 prediction_type=dcfg.prediction)
        return x0_hat * mask

    preds = sweep(one_variant, (t_index.reshape(-1), p_index.reshape(-1)),
                  chunk_size=dcfg.get("sweep_chunk", None))  # [T * P, B, H, W, C]
    preds = preds.reshape((num_t, num_p) + x0.shape)
    return weighted_mean(stitch(preds, masks))


def reconstruct(model, x0, key, config):
    """Patch-wise reconstruction of x0 [B, H, W, C] in [-1, 1] -> [B, H, W, C] in [-1, 1]
    on pDDPM's patch grid (`patch_sweep_reconstruct`)."""
    pcfg = config.patch
    masks = jnp.asarray(patch_masks(x0.shape[1:3], pcfg.size, pcfg.stride))  # [P, H, W]
    return patch_sweep_reconstruct(lambda x_t, t, _: model(x_t, t), x0, masks, key, config)


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W] mean residual over channels, 'reconstruction': [B, H, W, C]}.

    batch['image'] [B, H, W, C] in [0, 1]; the reconstruction is in the same units.
    """
    image = batch["image"]
    rec = (reconstruct(models["diffusion"], to_model_range(image), key, config) + 1.0) / 2.0
    return residual_score(image, rec, config)


def network_evaluations(config) -> dict[str, float]:
    """T test t values x P patch positions UNet passes per slice."""
    pcfg = config.patch
    positions = patch_masks(tuple(config.data.image_size), pcfg.size, pcfg.stride).shape[0]
    return {"unet": len(config.diffusion.test_timesteps) * positions}


METHOD = Method(
    name="pddpm",
    stages=(Stage(name="diffusion", make_model=make_unet, loss_fn=loss_fn),),
    score_fn=score_fn,
    network_evaluations=network_evaluations,
)
