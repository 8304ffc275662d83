"""MR signal equations and tissue parameters for the phantom (1.5 T).

Each voxel holds fractions of tissue compartments (GM, WM, CSF and lesion compartments);
its signal is the fraction-weighted sum of the compartments' signals (partial volume).
Compartment signals come from the spin-echo and inversion-recovery equations:

  spin echo:           S = PD (1 - exp(-TR/T1)) exp(-TE/T2)
  inversion recovery:  S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)

Times are in ms, PD is relative to pure water (CSF = 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np


class TissueParameters(NamedTuple):
    """Relaxation times (ms) and proton density (relative) of one compartment."""

    t1: float
    t2: float
    pd: float


# 1.5 T values (docs/phantom.md, section 3).
# gm, wm, ms, and CSF's T2 and PD: the BrainWeb simulator's tissue parameters (Kwan, Evans &
#   Pike, IEEE TMI 18(11):1085-1097, 1999; Cocosco et al., NeuroImage 5(4):S425, 1997).
# CSF T1: 4200 ms, the in-vivo value of the Gach et al. 2008 MRI phantom standard (BrainWeb's
#   2569 ms gave FLAIR a CSF-nulling TI of 1780 ms, shorter than clinical 1.5 T protocols'
#   2200-2500 ms, which darkened every long-T1 lesion on FLAIR).
# The other compartments are approximate values, not from one source: chosen inside the
#   ranges reported at 1.5 T for each tissue, ordered by water content between WM and CSF
#   (vasogenic oedema and necrosis lengthen T1 and T2; cysts and chronic infarct cavities
#   are near-fluid but with shorter T1 than CSF because of protein, so FLAIR does not null
#   them; gliosis is FLAIR-bright). pv_rim is the healthy periventricular interstitial fluid
#   (ependymitis granularis, "caps and bands") that makes FLAIR/T2 rims around ventricles.
TISSUES: dict[str, TissueParameters] = {
    "csf": TissueParameters(t1=4200.0, t2=329.0, pd=1.00),
    "gm": TissueParameters(t1=833.0, t2=83.0, pd=0.86),
    "wm": TissueParameters(t1=500.0, t2=70.0, pd=0.77),
    "ms": TissueParameters(t1=752.0, t2=237.0, pd=0.76),
    "oedema": TissueParameters(t1=1200.0, t2=180.0, pd=0.88),
    "tumour": TissueParameters(t1=1100.0, t2=120.0, pd=0.85),
    "necrosis": TissueParameters(t1=2000.0, t2=250.0, pd=0.95),
    "cyst": TissueParameters(t1=2300.0, t2=300.0, pd=0.98),
    "infarct_fluid": TissueParameters(t1=2250.0, t2=290.0, pd=0.97),
    "gliosis": TissueParameters(t1=1000.0, t2=150.0, pd=0.85),
    "infarct_acute": TissueParameters(t1=1150.0, t2=160.0, pd=0.88),
    "pv_rim": TissueParameters(t1=1000.0, t2=140.0, pd=0.84),
}
HEALTHY_TISSUES = ("gm", "wm", "csf")
# Healthy compartments that are not lesion tissue (the periventricular fluid is normal).
NORMAL_COMPARTMENTS = (*HEALTHY_TISSUES, "pv_rim")
MODALITIES = ("t1", "t2", "pd", "flair")


def spin_echo(params: TissueParameters, tr: float, te: float) -> np.ndarray:
    """Spin-echo signal S = PD (1 - exp(-TR/T1)) exp(-TE/T2); broadcasts over arrays."""
    t1, t2, pd = (np.asarray(p, dtype=np.float64) for p in params)
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(params: TissueParameters, tr: float, te: float, ti: float) -> np.ndarray:
    """Magnitude IR signal S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)."""
    t1, t2, pd = (np.asarray(p, dtype=np.float64) for p in params)
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def null_inversion_time(t1: float, tr: float) -> float:
    """TI that nulls a tissue of this T1: T1 ln(2 / (1 + exp(-TR/T1))) (T1 ln 2 for long TR)."""
    return float(t1 * np.log(2.0 / (1.0 + np.exp(-tr / t1))))


def modality_signal(params: TissueParameters, sequence: Mapping) -> np.ndarray:
    """Signal of `params` for one sequence of the config (`kind` 'se' or 'ir', tr, te[, ti]).

    For 'ir' without `ti` (or ti <= 0), TI nulls the nominal (unjittered) CSF.
    """
    if sequence["kind"] == "se":
        return spin_echo(params, sequence["tr"], sequence["te"])
    ti = sequence.get("ti") or 0.0
    if ti <= 0.0:
        ti = null_inversion_time(TISSUES["csf"].t1, sequence["tr"])
    return inversion_recovery(params, sequence["tr"], sequence["te"], ti)


def compartment_signals(
    tissues: Mapping[str, TissueParameters], sequences: Mapping[str, Mapping]
) -> dict[str, dict[str, float]]:
    """Signal of every compartment in every modality: {modality: {compartment: float}}."""
    return {
        modality: {name: float(modality_signal(p, sequences[modality]))
                   for name, p in tissues.items()}
        for modality in MODALITIES
    }


def jitter_tissues(
    rng: np.random.Generator, relative_std: float, pd_relative_std: float
) -> dict[str, TissueParameters]:
    """Per-subject tissue parameters: every T1, T2 and PD times a log-normal factor.

    Args:
      rng: the subject's generator.
      relative_std: std of log(T1) and log(T2).
      pd_relative_std: std of log(PD).

    Returns:
      {compartment: TissueParameters}, same keys as `TISSUES`.
    """
    out = {}
    for name, p in TISSUES.items():
        f1, f2, fpd = np.exp(rng.normal(0.0, [relative_std, relative_std, pd_relative_std]))
        out[name] = TissueParameters(p.t1 * f1, p.t2 * f2, min(1.0, p.pd * fpd))
    return out


def jitter_pathology(
    rng: np.random.Generator, tissues: Mapping[str, TissueParameters], relative_std: float
) -> dict[str, TissueParameters]:
    """The lesion compartments' T1 and T2 times a log-normal factor (std of the log).

    Lesions of one kind differ more between patients than healthy tissue does; the normal
    compartments (`NORMAL_COMPARTMENTS`) are returned unchanged. Draws in `TISSUES` order.
    """
    out = dict(tissues)
    for name in TISSUES:
        if name in NORMAL_COMPARTMENTS:
            continue
        f1, f2 = np.exp(rng.normal(0.0, relative_std, size=2))
        p = tissues[name]
        out[name] = TissueParameters(p.t1 * f1, p.t2 * f2, p.pd)
    return out


def severity_for_flair_contrast(
    signals: Mapping[str, Mapping[str, float]], compartment: str, contrast: float
) -> float:
    """Fraction of pathological tissue that gives WM-embedded lesion FLAIR contrast `contrast`.

    A voxel holding severity s of `compartment` and 1 - s of WM has FLAIR signal
    S_wm (1 + s (S_c / S_wm - 1)); this returns s = contrast / (S_c / S_wm - 1), clipped
    to [0, 1].
    """
    flair = signals["flair"]
    full_contrast = flair[compartment] / flair["wm"] - 1.0
    if full_contrast <= 0.0:
        return 1.0
    return float(np.clip(contrast / full_contrast, 0.0, 1.0))


def mix_signal(
    fractions: Mapping[str, np.ndarray], signals: Mapping[str, float],
    texture: np.ndarray | None = None, wet_signals: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Partial-volume signal: sum over compartments of fraction x compartment signal.

    Args:
      fractions: {compartment: [D, H, W] float32 fraction}.
      signals: {compartment: signal} for one modality.
      texture: optional [D, H, W] float32 field h; GM and WM signals become
        S + h (S_wet - S), a smooth within-tissue variation of water content.
      wet_signals: {compartment: signal} of slightly wetter GM and WM (needed with texture).

    Returns:
      [D, H, W] float32.
    """
    total = None
    for name, fraction in fractions.items():
        term = fraction * np.float32(signals[name])
        if texture is not None and name in ("gm", "wm"):
            term += fraction * texture * np.float32(wet_signals[name] - signals[name])
        total = term if total is None else total + term
    return total.astype(np.float32)


def rician_noise(
    rng: np.random.Generator, signal: np.ndarray, sigma: float
) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise of std `sigma` per channel.

    Args:
      signal: [...] float32, non-negative (any shape, e.g. the brain voxels [N]).

    Returns:
      [...] float32 sqrt((S + n_re)^2 + n_im^2).
    """
    sigma = np.float32(sigma)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imag)
