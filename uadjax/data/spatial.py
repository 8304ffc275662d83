"""Optional offline spatial preprocessing on SimpleITK: template registration, N4, atlas mask.

Real datasets come on their own grids, with intensity inhomogeneity and sometimes without a
brain mask. The steps here (all optional, see `SpatialOptions`) follow the offline pipeline
of Behrendt et al.: brain mask -> skull strip -> affine registration to the vendored ICBM 2009c
template (`phantom_template`) -> N4 bias-field correction. They run once per subject, before
the online preprocessing of `preprocess` (reorientation, resampling, crop, normalisation).

Conventions:
  * numpy volumes are `[X, Y, Z]` with a nibabel affine (voxel -> RAS mm); SimpleITK images
    carry spacing, origin and direction in LPS mm. `to_sitk` / `from_sitk` convert exactly
    (any orientation, oblique included).
  * a registration transform maps fixed (template) physical points to moving (subject)
    physical points, as `sitk.ImageRegistrationMethod` returns it; `resample_to(subject,
    template_grid, transform)` therefore puts the subject on the template grid.
  * the vendored template is 2 mm; `template_image(spacing=...)` interpolates the same field
    of view onto another grid (registration itself always runs against the 2 mm template).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from uadjax.data.nifti import AFFINE_ATOL, Volume
from uadjax.data.phantom_template import load_template
from uadjax.data.schema import DataError

# nibabel RAS <-> ITK LPS: the signs of the first two world axes differ.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Template modality of each subject modality name ('flair' has no ICBM map: its contrast is
# closest to T2, and Mattes mutual information does not need the same contrast anyway).
TEMPLATE_MODALITIES = {"t1": "t1", "t2": "t2", "pd": "pd", "flair": "t2"}

# Registration settings (Mattes MI, regular sampling, 3-level pyramid).
REG_HISTOGRAM_BINS = 32
REG_SAMPLING_PERCENTAGE = 0.25
REG_SHRINK = (4, 2, 1)
REG_SMOOTHING_VOX = (2.0, 1.0, 0.0)
REG_ITERATIONS = 300
# Registration runs single-threaded: multithreaded, its result is not bitwise reproducible.
REG_THREADS = 1
# N4 fits the bias field on a copy shrunk to about this voxel size.
N4_FIT_SPACING_MM = 4.0
# Margin (mm) of the skull strip of an off-grid modality before its own registration.
OFF_GRID_MARGIN_MM = 5.0
# A registration whose affine scales volumes outside this range has failed.
REG_DETERMINANT_RANGE = (0.25, 4.0)


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """Numpy volume with a nibabel affine -> SimpleITK image.

    Args:
      data: [X, Y, Z] array (bool becomes uint8; other dtypes are kept).
      affine: [4, 4] voxel -> RAS mm (any orientation: permuted, flipped, oblique).

    Returns:
      Image of size (X, Y, Z) with spacing = column norms of the affine, direction = the
      normalised columns and origin = translation, both in LPS.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {data.shape}")
    if data.dtype == bool:
        data = data.astype(np.uint8)
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def from_sitk(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> ([X, Y, Z] array, [4, 4] voxel -> RAS mm affine); inverse of `to_sitk`."""
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return np.ascontiguousarray(data), _RAS_TO_LPS @ lps


def _template_modality(modality: str) -> str:
    if modality not in TEMPLATE_MODALITIES:
        raise ValueError(f"unknown template modality {modality!r}; "
                         f"expected one of {sorted(TEMPLATE_MODALITIES)}")
    return TEMPLATE_MODALITIES[modality]


def _regrid(image: sitk.Image, spacing) -> sitk.Image:
    """An empty image with `image`'s field of view (voxel edges) on a grid of `spacing` mm."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    old_spacing = np.asarray(image.GetSpacing())
    size = np.maximum(np.round(np.asarray(image.GetSize()) * old_spacing / spacing), 1)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    corner = np.asarray(image.GetOrigin()) - direction @ (0.5 * old_spacing)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin([float(o) for o in corner + direction @ (0.5 * spacing)])
    return grid


def template_image(modality: str = "t1", *, brain_only: bool = False,
                   spacing=None) -> sitk.Image:
    """The ICBM 2009c template (float32, head, 2 mm grid cropped to the brain plus a margin).

    Args:
      modality: 't1', 't2' or 'pd'; 'flair' gives the T2 map (no FLAIR template exists).
      brain_only: multiply by the template brain mask (to register skull-stripped subjects).
      spacing: (x, y, z) mm: the same field of view on this grid (linear interpolation);
        None keeps the native 2 mm grid of [88, 104, 88] voxels.
    """
    template = load_template()
    data = getattr(template, _template_modality(modality)).astype(np.float32)
    if brain_only:
        data = data * template.brainmask
    image = to_sitk(data, template.affine)
    if spacing is None:
        return image
    return sitk.Resample(image, _regrid(image, spacing), sitk.Transform(), sitk.sitkLinear,
                         0.0, sitk.sitkFloat32)


def template_brain_mask(spacing=None) -> sitk.Image:
    """The template brain mask (uint8 0/1), on the grid of `template_image(spacing=spacing)`
    (linear interpolation then >= 0.5 when `spacing` is set)."""
    template = load_template()
    image = to_sitk(template.brainmask.astype(np.uint8), template.affine)
    if spacing is None:
        return image
    soft = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), _regrid(image, spacing),
                         sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(soft >= 0.5, sitk.sitkUInt8)


@contextlib.contextmanager
def _itk_threads(threads: int | None):
    """Sets SimpleITK's global default thread count inside the block (None: unchanged)."""
    if threads is None:
        yield
        return
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def register_affine(moving: sitk.Image, fixed: sitk.Image, *, seed: int = 0,
                    threads: int | None = REG_THREADS) -> sitk.Transform:
    """Affine registration of `moving` (subject) to `fixed` (template).

    Mattes mutual information (any pair of contrasts), centred-moments initialisation,
    regular-step gradient descent (step 1 -> 1e-3, halved at each direction change) with
    scales from physical shift, pyramid shrink 4, 2, 1 with smoothing 2, 1, 0 voxels, regular
    sampling of 25 % of the fixed voxels with `seed` (ITK's seed 0 means "wall clock", so
    `seed` is passed as `seed + 1`).

    Determinism: multithreaded, ITK's Mattes metric accumulates in an order that varies from
    run to run, so parameters differ between identical calls at the 1e-12 relative level.
    With `threads=1` (the default; SimpleITK's global default thread count is set to 1 for the
    call and restored after) the same inputs and seed give bitwise equal parameters, at about
    1.6x the wall time on two cores.

    Args:
      moving, fixed: 3D images (cast to float32).
      seed: non-negative sampling seed.
      threads: thread count for the call, or None for SimpleITK's default (faster, not
        bitwise reproducible).

    Returns:
      `sitk.AffineTransform` mapping fixed physical points to moving physical points.

    Raises:
      RuntimeError: from SimpleITK when the registration cannot run (e.g. no overlap).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    with _itk_threads(threads):
        fixed = sitk.Cast(fixed, sitk.sitkFloat32)
        moving = sitk.Cast(moving, sitk.sitkFloat32)
        transform = sitk.AffineTransform(sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(3),
            sitk.CenteredTransformInitializerFilter.MOMENTS))
        reg = sitk.ImageRegistrationMethod()
        if threads is not None:
            reg.SetNumberOfThreads(int(threads))
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=REG_HISTOGRAM_BINS)
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(REG_SAMPLING_PERCENTAGE, seed + 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                     numberOfIterations=REG_ITERATIONS,
                                                     relaxationFactor=0.5)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(REG_SHRINK))
        reg.SetSmoothingSigmasPerLevel(list(REG_SMOOTHING_VOX))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(transform, inPlace=True)
        reg.Execute(fixed, moving)
    return transform


def resample_to(image: sitk.Image, reference: sitk.Image, transform, *,
                label: bool) -> sitk.Image:
    """`image` on the grid of `reference`: out(p) = image(transform(p)), 0 outside `image`.

    Args:
      image: the image to move.
      reference: the output grid (size, spacing, origin, direction).
      transform: maps reference physical points to `image` physical points (None: identity).
      label: nearest neighbour, uint8 output; else cubic B-spline, float32 output clipped to
        [min(image.min, 0), max(image.max, 0)] (no ringing below the background).
    """
    transform = sitk.Transform() if transform is None else transform
    if label:
        return sitk.Resample(sitk.Cast(image, sitk.sitkUInt8), reference, transform,
                             sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    image = sitk.Cast(image, sitk.sitkFloat32)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    out = sitk.Resample(image, reference, transform, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    return sitk.Clamp(out, sitk.sitkFloat32, min(stats.GetMinimum(), 0.0),
                      max(stats.GetMaximum(), 0.0))


def n4_correct(image: sitk.Image, mask: sitk.Image | None = None, *, shrink: int | None = None,
               iterations=(50, 50, 50, 50), control_points: int = 4) -> sitk.Image:
    """N4 bias-field correction: fit on a shrunk copy, divide the full image by the field.

    N4 is deterministic (no sampling), so it takes no seed.

    Args:
      image: 3D image (cast to float32).
      mask: brain mask (non-zero inside) on `image`'s grid, or None for an Otsu foreground.
        Only voxels inside the mask with intensity > 0 drive the fit.
      shrink: shrink factor of the fitting copy; None: the factor that makes its voxels
        about `N4_FIT_SPACING_MM` (4 at 1 mm, 2 at 2 mm; the field is smooth, and at 1 mm
        a factor of 2 costs 24 s instead of 4 s per volume on one core).
      iterations: maximum iterations per fitting level (its length = number of levels).
      control_points: B-spline control points per axis at the first level.

    Returns:
      float32 image / exp(log bias field), on `image`'s grid.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    if shrink is None:
        shrink = max(1, round(N4_FIT_SPACING_MM / min(image.GetSpacing())))
    if mask is None:
        mask = sitk.OtsuThreshold(image, 0, 1, 200)
    mask = sitk.Cast((sitk.Cast(mask, sitk.sitkUInt8) > 0) & (image > 0), sitk.sitkUInt8)
    small_image = sitk.Shrink(image, [shrink] * 3) if shrink > 1 else image
    small_mask = sitk.Shrink(mask, [shrink] * 3) if shrink > 1 else mask
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.SetNumberOfControlPoints([control_points] * 3)
    n4.Execute(small_image, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_bias), sitk.sitkFloat32)


def atlas_brain_mask(subject: sitk.Image, transform) -> sitk.Image:
    """The template brain mask on the subject's grid (uint8 0/1).

    Args:
      subject: any image on the subject's grid.
      transform: from `register_affine(subject, template)` (template -> subject points); its
        inverse carries the mask over, linear interpolation then >= 0.5.
    """
    mask = sitk.Cast(template_brain_mask(), sitk.sitkFloat32)
    soft = sitk.Resample(mask, subject, transform.GetInverse(), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)
    return sitk.Cast(soft >= 0.5, sitk.sitkUInt8)


CURVATURE_FLOW = {"timeStep": 0.125, "numberOfIterations": 3}  # Behrendt's sitk_reader


def curvature_flow(image: sitk.Image) -> sitk.Image:
    """SimpleITK's CurvatureFlow with Behrendt's settings (`CURVATURE_FLOW`), float32."""
    smooth = sitk.CurvatureFlow(image1=sitk.Cast(image, sitk.sitkFloat32), **CURVATURE_FLOW)
    return sitk.Cast(smooth, sitk.sitkFloat32)  # the filter returns float64


@dataclass(frozen=True)
class SpatialOptions:
    """Offline spatial preprocessing of `standardise_subject` (all off by default).

    Attributes:
      register: affine registration of every subject to the ICBM 2009c template; outputs on
        the template field of view at `spacing`.
      spacing: (x, y, z) output grid spacing (mm) when registering.
      n4: N4 bias-field correction (weighted by the brain mask).
      curvature_flow: edge-preserving smoothing of every image (not masks or labels), last:
        `sitk.CurvatureFlow(timeStep=0.125, numberOfIterations=3)`, as Behrendt's
        `create_dataset.py::sitk_reader` applies it to each image it reads.
      atlas_mask: brain mask from the template when the dataset ships none (else non-zero
        voxels of any modality).
      skull_strip: zero every image outside the brain mask; registration then uses the
        brain-only template (set it for datasets that ship skull-stripped images too).
      template_modality: template contrast: 't1', 't2', 'pd' or 'flair' (= 't2').
      seed: registration sampling seed.
    """

    register: bool = False
    spacing: tuple = (1.0, 1.0, 1.0)
    n4: bool = False
    curvature_flow: bool = False
    atlas_mask: bool = False
    skull_strip: bool = False
    template_modality: str = "t1"
    seed: int = 0

    def __post_init__(self):
        _template_modality(self.template_modality)
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive mm values, got {self.spacing}")


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.data.shape == b.data.shape and np.allclose(a.affine, b.affine, atol=AFFINE_ATOL,
                                                        rtol=0.0)


def _register_checked(moving: sitk.Image, fixed: sitk.Image, path, seed: int) -> sitk.Transform:
    """`register_affine` with failures turned into `DataError(path, ...)`."""
    try:
        transform = register_affine(moving, fixed, seed=seed)
    except RuntimeError as err:
        raise DataError(path, f"registration to the template failed ({err})".strip())
    det = float(np.linalg.det(np.reshape(transform.GetMatrix(), (3, 3))))
    low, high = REG_DETERMINANT_RANGE
    if not (np.isfinite(det) and low <= det <= high):
        raise DataError(path, f"registration to the template failed (volume scale {det:.3g})")
    return transform


def _dilate_mm(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """Binary dilation of a uint8 0/1 mask by a box of `margin_mm` on each side."""
    radius = [int(np.ceil(margin_mm / s)) for s in mask.GetSpacing()]
    return sitk.BinaryDilate(mask, radius, sitk.sitkBox, 0.0, 1.0)


def _mask_or_error(mask: np.ndarray, path) -> np.ndarray:
    if not np.any(mask):
        raise DataError(path, "empty brain mask")
    return mask


def standardise_subject(images: dict[str, Volume], seg: Volume | None,
                        brainmask: Volume | None,
                        options: SpatialOptions) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Runs the offline spatial steps on one subject.

    Order: brain mask (the given one; else the atlas mask when `options.atlas_mask`, from a
    registration of the first modality to the head template; else the non-zero voxels of any
    modality) -> skull strip -> registration -> N4 (weighted by the brain mask) -> curvature
    flow smoothing (stripped again when skull stripping).

    Modalities on the grid of the first modality share its transform, and `seg` / `brainmask`
    (which must lie on that grid) follow it with nearest neighbour. A modality on another grid
    (e.g. IXI T2 vs T1) gets the brain mask carried over by world coordinates (nearest
    neighbour: the scans of one session are assumed roughly aligned in world space) and is
    registered on its own; before that registration it is skull-stripped with that mask
    widened by `OFF_GRID_MARGIN_MM` (inter-scan motion), after it with the output mask.
    Without `options.register` every output stays on its own grid (an off-grid modality then
    keeps its own grid and is stripped / N4-weighted with the world-carried mask).

    Args:
      images: modality -> float image `Volume`, first = reference.
      seg: lesion segmentation on the reference grid, or None.
      brainmask: brain mask on the reference grid, or None.
      options: which steps to run.

    Returns:
      {modality: (float32 [X, Y, Z], affine), 'seg': (uint8 0/1, affine) when `seg` is given,
      'brainmask': (uint8 0/1, affine)}; with registration every array is on the template
      grid at `options.spacing`, else on its input grid (brainmask and seg: the reference's).

    Raises:
      DataError: a seg or mask off the reference grid, an empty brain mask (at the start or
        after registration), or a registration that fails (naming the moving file).
    """
    if not images:
        raise ValueError("standardise_subject needs at least one modality")
    ref = next(iter(images.values()))
    for label_vol in (seg, brainmask):
        if label_vol is not None and not _same_grid(ref, label_vol):
            raise DataError(label_vol.path, f"not on the grid of {ref.path.name}")
    sitk_images = {mod: to_sitk(vol.data.astype(np.float32), vol.affine)
                   for mod, vol in images.items()}
    on_ref = {mod: _same_grid(ref, vol) for mod, vol in images.items()}
    ref_image = next(iter(sitk_images.values()))
    transforms: dict[str, sitk.Transform] = {}

    # 1. Brain mask on the reference grid.
    if brainmask is not None:
        mask = _mask_or_error(brainmask.data > 0, brainmask.path)
    elif options.atlas_mask:
        head = template_image(options.template_modality)
        ref_transform = _register_checked(ref_image, head, ref.path, options.seed)
        for mod in images:
            if on_ref[mod]:
                transforms[mod] = ref_transform
        mask = from_sitk(atlas_brain_mask(ref_image, ref_transform))[0] > 0
        mask = _mask_or_error(mask, ref.path)
    else:
        mask = np.zeros(ref.data.shape, bool)
        for mod, vol in images.items():
            if on_ref[mod]:
                mask |= vol.data != 0
        mask = _mask_or_error(mask, ref.path)
    ref_mask = to_sitk(mask.astype(np.uint8), ref.affine)
    masks = {mod: ref_mask if on_ref[mod] else resample_to(ref_mask, sitk_images[mod], None,
                                                           label=True)
             for mod in images}

    # 2. Skull strip (before registration, an off-grid modality keeps a margin around its
    # world-carried mask for inter-scan motion; the output mask strips it after).
    if options.skull_strip:
        strip = {mod: _dilate_mm(masks[mod], OFF_GRID_MARGIN_MM)
                 if options.register and not on_ref[mod] else masks[mod] for mod in images}
        sitk_images = {mod: image * sitk.Cast(strip[mod], sitk.sitkFloat32)
                       for mod, image in sitk_images.items()}

    # 3. Registration to the template.
    seg_image = to_sitk(seg.data > 0, seg.affine) if seg is not None else None
    if options.register:
        fixed = template_image(options.template_modality, brain_only=options.skull_strip)
        grid = _regrid(fixed, options.spacing)
        ref_transform = transforms.get(next(iter(images)))
        for mod, vol in images.items():
            if on_ref[mod]:
                if ref_transform is None:
                    ref_transform = _register_checked(sitk_images[mod], fixed, vol.path,
                                                      options.seed)
                transforms[mod] = ref_transform
            else:
                transforms[mod] = _register_checked(sitk_images[mod], fixed, vol.path,
                                                    options.seed)
        sitk_images = {mod: resample_to(image, grid, transforms[mod], label=False)
                       for mod, image in sitk_images.items()}
        out_mask = resample_to(ref_mask, grid, ref_transform, label=True)
        _mask_or_error(sitk.GetArrayViewFromImage(out_mask) > 0,
                       brainmask.path if brainmask is not None else ref.path)
        masks = {mod: out_mask for mod in images}
        ref_mask = out_mask
        if seg_image is not None:
            seg_image = resample_to(seg_image, grid, ref_transform, label=True)
        if options.skull_strip:
            sitk_images = {mod: image * sitk.Cast(out_mask, sitk.sitkFloat32)
                           for mod, image in sitk_images.items()}

    # 4. N4 bias-field correction.
    if options.n4:
        sitk_images = {mod: n4_correct(image, masks[mod]) for mod, image in sitk_images.items()}

    # 5. Curvature flow smoothing (Behrendt's reader, on the preprocessed images); the
    # smoothing spreads the brain's edge into the background, which skull stripping zeroes
    # again.
    if options.curvature_flow:
        sitk_images = {mod: curvature_flow(image) for mod, image in sitk_images.items()}
        if options.skull_strip:
            sitk_images = {mod: image * sitk.Cast(masks[mod], sitk.sitkFloat32)
                           for mod, image in sitk_images.items()}

    def _arrays(image, dtype, affine):
        data, grid_affine = from_sitk(sitk.Cast(image, dtype))
        return data, grid_affine if options.register else affine

    out = {mod: _arrays(image, sitk.sitkFloat32, images[mod].affine)
           for mod, image in sitk_images.items()}
    if seg_image is not None:
        data, affine = _arrays(seg_image, sitk.sitkUInt8, ref.affine)
        out["seg"] = ((data > 0).astype(np.uint8), affine)
    data, affine = _arrays(ref_mask, sitk.sitkUInt8, ref.affine)
    out["brainmask"] = ((data > 0).astype(np.uint8), affine)
    return out
