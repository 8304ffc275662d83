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
from uadjax.inference.patches import box_masks, patch_masks
from uadjax.methods import shared
from uadjax.methods.base import Method, Stage


def loss_fn(model, batch, key, config):
    """Patch-inpainting denoising loss on healthy slices -> (loss, metrics).

    batch['image'] [B, H, W, C] in [0, 1]; one box per image (traced), loss inside it only.
    """
    dcfg, pcfg = config.diffusion, config.patch
    if pcfg.loss_reduction not in shared.LOSS_REDUCTIONS:
        raise ValueError(f"unknown patch.loss_reduction {pcfg.loss_reduction!r}; "
                         f"use one of {sorted(shared.LOSS_REDUCTIONS)}")
    schedule = shared.schedule_of(config)
    x0 = shared.to_model_range(batch["image"])
    batch_size, height, width, _ = x0.shape
    k_t, k_noise, k_box, k_drop = jax.random.split(key, 4)
    t = shared.sample_train_t(k_t, batch_size, dcfg)
    noise = shared.noise_fn_of(dcfg)(k_noise, x0.shape, t)
    corners = shared.sample_boxes(k_box, batch_size, (height, width), pcfg)
    mask = box_masks(corners, (height, width), pcfg.size)[..., None]  # [B, H, W, 1]
    x_t = shared.noise_patch(schedule, x0=x0, t=t, noise=noise, mask=mask)
    prediction = model(x_t, t, deterministic=False, rngs=nnx.Rngs(dropout=k_drop))
    target = diffusion.target_for(dcfg.prediction, x0, noise, schedule, t)
    weights = mask.astype(jnp.float32)
    if dcfg.get("loss_in_brain", False):
        weights = weights * batch["brain_mask"][..., None].astype(jnp.float32)
    loss = diffusion.diffusion_loss(prediction, target, kind=dcfg.loss, mask=weights,
                                    mask_reduction=shared.LOSS_REDUCTIONS[pcfg.loss_reduction])
    return loss, {}


def reconstruct(model, x0, key, config):
    """Patch-wise reconstruction of x0 [B, H, W, C] in [-1, 1] -> [B, H, W, C] in [-1, 1]
    on pDDPM's patch grid (`shared.patch_sweep_reconstruct`)."""
    pcfg = config.patch
    masks = jnp.asarray(patch_masks(x0.shape[1:3], pcfg.size, pcfg.stride))  # [P, H, W]
    return shared.patch_sweep_reconstruct(lambda x_t, t, _: model(x_t, t), x0, masks, key,
                                          config)


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W] mean residual over channels, 'reconstruction': [B, H, W, C]}.

    batch['image'] [B, H, W, C] in [0, 1]; the reconstruction is in the same units.
    """
    image = batch["image"]
    rec = shared.from_model_range(
        reconstruct(models["diffusion"], shared.to_model_range(image), key, config))
    return shared.residual_score(image, rec, config)


def network_evaluations(config) -> dict[str, float]:
    """T test t values x P patch positions UNet passes per slice."""
    pcfg = config.patch
    positions = patch_masks(tuple(config.data.image_size), pcfg.size, pcfg.stride).shape[0]
    return {"unet": len(config.diffusion.test_timesteps) * positions}


METHOD = Method(
    name="pddpm",
    stages=(Stage(name="diffusion", make_model=shared.make_network, loss_fn=loss_fn),),
    score_fn=score_fn,
    network_evaluations=network_evaluations,
)
