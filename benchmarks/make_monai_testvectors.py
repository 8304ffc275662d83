"""Regenerates tests/data/monai_schedulers.json from MONAI's own schedulers (PyTorch).

    pip install -e ".[bench]"      # torch + monai: only for this script, never for the tests
    python -m benchmarks.make_monai_testvectors [--out tests/data/monai_schedulers.json]

The tests (`tests/test_diffusion_schedules.py`, `tests/test_diffusion_samplers.py`) check
our schedules and samplers against these vectors without PyTorch. For each schedule
(`linear_beta`: betas linspace 1e-4..2e-2; `cosine`: Nichol & Dhariwal, s = 0.008), T = 1000:
- `betas`, `alphas_cumprod` (length T);
- `add_noise` at t = 10 and 500, one per batch item;
- three `ddpm_step`s (t = 999, 500, 1; epsilon prediction, fixed_small variance, no
  clipping) with the variance noise MONAI drew (a generator re-seeded identically records
  it: MONAI adds it only for t > 0);
- three `ddim_step`s of the 50-step DDIM schedule (eta 0, no clipping, alpha at t < 0 = 1),
  and that schedule's timesteps.
Inputs are seeded, so a rerun with the same MONAI gives the same file; arrays are nested
lists in NCHW order [2, 1, 4, 4]. The file is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SCHEDULES = ("linear_beta", "cosine")
T = 1000
SHAPE = (2, 1, 4, 4)
ADD_NOISE_T = (10, 500)
DDPM_T = (999, 500, 1)
DDIM_STEPS = 50
DDIM_T = (999, 489, 0)
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "monai_schedulers.json"


def case(schedule: str, *, betas, alphas_cumprod, add_noise: dict, ddpm_steps: list[dict],
         ddim_steps: list[dict], ddim_timesteps) -> dict:
    """One schedule's entry of the file (the layout the tests read), from plain lists."""
    return {"schedule": schedule, "T": T, "betas": list(betas),
            "alphas_cumprod": list(alphas_cumprod), "add_noise": add_noise,
            "ddpm_step": ddpm_steps, "ddim_step": ddim_steps,
            "ddim_timesteps_50": list(ddim_timesteps)}


def monai_case(schedule: str, seed: int) -> dict:
    import torch
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    def draw(k):
        return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed * 100 + k))

    def listed(x):
        return x.detach().cpu().numpy().astype("float32").tolist()

    ddpm = DDPMScheduler(num_train_timesteps=T, schedule=schedule, variance_type="fixed_small",
                         clip_sample=False, prediction_type="epsilon")
    x0, noise = draw(0), draw(1)
    t = torch.tensor(ADD_NOISE_T)
    add_noise = {"x0": listed(x0), "noise": listed(noise), "t": list(ADD_NOISE_T),
                 "x_t": listed(ddpm.add_noise(x0, noise, t))}
    ddpm_steps = []
    for i, step in enumerate(DDPM_T):
        eps, sample = draw(10 + 2 * i), draw(11 + 2 * i)
        noise_seed = seed * 100 + 50 + i
        prev, pred_x0 = ddpm.step(eps, step, sample,
                                  generator=torch.Generator().manual_seed(noise_seed))
        variance_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(noise_seed))
        ddpm_steps.append({"t": step, "model_output_eps": listed(eps), "sample": listed(sample),
                           "pred_original_sample": listed(pred_x0), "prev_sample": listed(prev),
                           "variance_noise": listed(variance_noise),
                           "variance_type": "fixed_small"})
    ddim = DDIMScheduler(num_train_timesteps=T, schedule=schedule, clip_sample=False,
                         prediction_type="epsilon")
    ddim.set_timesteps(DDIM_STEPS)
    ddim_steps = []
    for i, step in enumerate(DDIM_T):
        eps, sample = draw(30 + 2 * i), draw(31 + 2 * i)
        prev, pred_x0 = ddim.step(eps, step, sample, eta=0.0)
        ddim_steps.append({"t": step, "num_inference_steps": DDIM_STEPS, "eta": 0.0,
                           "model_output_eps": listed(eps), "sample": listed(sample),
                           "pred_original_sample": listed(pred_x0), "prev_sample": listed(prev)})
    return case(schedule, betas=listed(ddpm.betas), alphas_cumprod=listed(ddpm.alphas_cumprod),
                add_noise=add_noise, ddpm_steps=ddpm_steps, ddim_steps=ddim_steps,
                ddim_timesteps=[int(s) for s in ddim.timesteps])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    try:
        import monai
    except ImportError as err:
        raise SystemExit(f"this script needs MONAI and PyTorch: pip install -e \".[bench]\" "
                         f"({err})") from None
    from uadjax import atomic

    data = {"source": f"MONAI {monai.__version__} networks.schedulers",
            "cases": [monai_case(s, seed) for seed, s in enumerate(SCHEDULES)]}
    atomic.write_json(args.out, data)
    print(f"wrote {args.out} ({data['source']})")


if __name__ == "__main__":
    main()
