"""Where the UNet's time goes on this CPU, convolution by convolution: the evidence behind
docs/performance.md's "Why 1.5x over MONAI is out of reach on this CPU".

    pip install -e ".[bench]"                          # torch, for the PyTorch side
    python -m benchmarks.conv_kernels --part=peaks      # fp32 / bf16 matmul and conv peaks
    python -m benchmarks.conv_kernels --part=shapes     # the CPU UNet's 3x3 convs, XLA vs PyTorch
    python -m benchmarks.conv_kernels --part=alternatives   # Winograd, weight-gradient rewrites

- peaks: GFLOP/s of a 4096^2 matmul and of a 3x3 convolution (8x96x96x128 -> 128, a
  paper-UNet layer) in float32 and bfloat16, in JAX (XLA:CPU with uadjax's flags) and in
  PyTorch (oneDNN).
- shapes: forward, forward + both gradients, and the kernel gradient alone of each 3x3
  stride-1 convolution of the CPU-config UNet at batch 16 (traced from the network, with its
  number of calls per forward), XLA against PyTorch (NCHW and channels-last), and their
  calls-weighted sum.
- alternatives: the rewrites that would cut the FLOPs or the layout work, each checked
  against `lax.conv_general_dilated` (max relative error printed) and timed: Winograd
  F(2x2, 3x3) (2.25x fewer multiplications), and the kernel gradient as nine shifted
  contractions or as im2col + one matmul.
Medians over `--steps` calls after two warm-up calls.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import uadjax  # noqa: F401 - sets the XLA:CPU flags the package runs with

PAPER_LAYER = (8, 96, 96, 128, 128)  # [B, H, W, C_in, C_out] of a paper-UNet 3x3 conv


def _conv_equations(jaxpr):
    """Every conv_general_dilated equation of a jaxpr, nested calls included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _conv_equations(inner)


def unet_conv_shapes(size: str = "cpu", batch: int = 16) -> tuple[list, float]:
    """The convolutions of the DDPM UNet `configs/ddpm.py:<size>`, traced from its forward.

    Returns:
      ([((B, H, W, C_in, C_out), calls), ...] for its 3x3 stride-1 convolutions, largest
      FLOP share first; the share of all the UNet's convolution FLOPs they make up).
    """
    from collections import Counter

    from flax import nnx

    from benchmarks.unet_speed import jax_unet, unet_config

    config, m = unet_config(size)
    graphdef, params = jax_unet(m)
    x = jnp.zeros((batch, *config.data.image_size, m.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, x, t: nnx.merge(graphdef, p)(x, t))(params, x, t).jaxpr
    counts, total = Counter(), 0.0
    for eqn in _conv_equations(jaxpr):
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape  # NHWC, HWIO
        out = eqn.outvars[0].aval.shape
        total += 2.0 * np.prod(out) * np.prod(rhs[:3])
        if rhs[:2] == (3, 3) and tuple(eqn.params["window_strides"]) == (1, 1):
            counts[(*lhs, rhs[3])] += 1
    shapes = sorted(counts.items(), key=lambda kv: -kv[1] * conv_flops(*kv[0]))
    return shapes, sum(c * conv_flops(*s) for s, c in shapes) / total


def _wait(out):
    """Blocks until JAX results are computed (PyTorch CPU results already are)."""
    return jax.tree.map(lambda a: a.block_until_ready() if isinstance(a, jax.Array) else a, out)


def median_seconds(fn, steps: int, *args) -> float:
    """Median wall time of `fn(*args)` over `steps` calls after two warm-up calls."""
    _wait(fn(*args))
    _wait(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _wait(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def conv_flops(b, h, w, c, d) -> float:
    return 2.0 * b * h * w * c * d * 9


def conv3x3(x: jax.Array, k: jax.Array) -> jax.Array:
    """[B, H, W, C] * [3, 3, C, D] -> [B, H, W, D], stride 1, zero padding 1 (XLA's conv)."""
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# --------------------------------------------------------------------------- alternatives

# Winograd F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A per 4x4 tile.
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
WINOGRAD_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def _combine(terms: list, matrix: np.ndarray) -> list:
    """[sum_j matrix[i, j] * terms[j] for each row i], skipping zero coefficients."""
    out = []
    for row in matrix:
        acc = None
        for coef, term in zip(row, terms, strict=True):
            if coef:
                acc = coef * term if acc is None else acc + coef * term
        out.append(acc)
    return out


def winograd_conv3x3(x: jax.Array, k: jax.Array) -> jax.Array:
    """The same convolution as `conv3x3` by Winograd F(2x2, 3x3): 16 multiplications instead
    of 36 per 2x2 output tile and (C, D) channel pair, as 16 batched [tiles, C] x [C, D]
    matmuls between cheap input and output transforms."""
    b, h, w, _ = x.shape
    th, tw = -(-h // 2), -(-w // 2)  # output tiles of 2x2
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    rows = _combine([xp[:, r:r + 2 * th:2] for r in range(4)], WINOGRAD_BT)
    tiles = [t for row in rows for t in _combine([row[:, :, c:c + 2 * tw:2] for c in range(4)],
                                                 WINOGRAD_BT)]
    v = jnp.stack(tiles)  # [16, B, th, tw, C]
    u = jnp.einsum("ai,ijcd,bj->abcd", WINOGRAD_G, k, WINOGRAD_G).reshape(16, *k.shape[2:])
    m = jnp.einsum("xnhwc,xcd->xnhwd", v, u)
    cols = [_combine([m[4 * a + j] for j in range(4)], WINOGRAD_AT) for a in range(4)]
    y = [_combine([cols[a][q] for a in range(4)], WINOGRAD_AT) for q in range(2)]  # y[q][p]
    out = jnp.stack([jnp.stack([y[q][p] for q in range(2)], axis=3) for p in range(2)], axis=2)
    return out.reshape(b, 2 * th, 2 * tw, -1)[:, :h, :w]


def kernel_grad_xla(x: jax.Array, dy: jax.Array) -> jax.Array:
    """d(sum(conv3x3(x, k) * dy)) / dk as XLA differentiates it: [3, 3, C, D]."""
    k0 = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
    return jax.vjp(lambda k: conv3x3(x, k), k0)[1](dy)[0]


def kernel_grad_shifted(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The kernel gradient as nine contractions of shifted inputs with dy."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.stack([jnp.einsum("nhwc,nhwd->cd", xp[:, i:i + h, j:j + w], dy)
                                 for j in range(3)]) for i in range(3)])


def kernel_grad_im2col(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The kernel gradient as one matmul of the [BHW, 9C] patch matrix with dy."""
    _, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
    return (patches.reshape(-1, 9 * c).T @ dy.reshape(-1, dy.shape[-1])).reshape(3, 3, c, -1)


def _relative_error(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


def _inputs(shape, dtype=jnp.float32):
    b, h, w, c, d = shape
    kx, kk, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, h, w, c)).astype(dtype)
    k = (jax.random.normal(kk, (3, 3, c, d)) / np.sqrt(9 * c)).astype(dtype)
    dy = jax.random.normal(kd, (b, h, w, d)).astype(dtype)
    return x, k, dy


def fwd_and_grads(conv):
    """jit of (x, k, dy) -> (y, dx, dk): one layer's forward and both gradients (the output
    is returned, else XLA drops the forward of a linear map as dead code)."""

    def run(x, k, dy):
        y, vjp = jax.vjp(conv, x, k)
        return (y, *vjp(dy))

    return jax.jit(run)


def alternatives(shapes, steps: int) -> list[str]:
    lines = [("| shape BxHxWxC->D | conv fwd / fwd+bwd ms: XLA | Winograd F(2,3) (error) | "
              "kernel grad ms: XLA | 9 shifted contractions (error) | im2col + matmul (error) |"),
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        x, k, dy = _inputs(shape)
        cells = []
        ref_y, ref_g = jax.jit(conv3x3)(x, k), fwd_and_grads(conv3x3)(x, k, dy)
        for conv in (conv3x3, winograd_conv3x3):
            fwd, both = jax.jit(conv), fwd_and_grads(conv)
            err = max(_relative_error(ref_y, fwd(x, k)),
                      *(_relative_error(a, b) for a, b in zip(ref_g, both(x, k, dy))))
            t_f = median_seconds(fwd, steps, x, k)
            t_b = median_seconds(both, steps, x, k, dy)
            cells.append(f"{t_f * 1e3:.1f} / {t_b * 1e3:.1f}"
                         + ("" if conv is conv3x3 else f" ({err:.0e})"))
        ref_k = jax.jit(kernel_grad_xla)(x, dy)
        for grad in (kernel_grad_xla, kernel_grad_shifted, kernel_grad_im2col):
            fn = jax.jit(grad)
            t = median_seconds(fn, steps, x, dy)
            err = _relative_error(ref_k, fn(x, dy))
            cells.append(f"{t * 1e3:.1f}" + ("" if grad is kernel_grad_xla else f" ({err:.0e})"))
        lines.append(f"| {'x'.join(map(str, shape[:4]))}->{shape[4]} | " + " | ".join(cells)
                     + " |")
        print(lines[-1], flush=True)
    return lines


# --------------------------------------------------------------------------- XLA vs PyTorch


def _torch_forward(x, k):
    import torch

    with torch.no_grad():
        return torch.nn.functional.conv2d(x, k, padding=1)


def _torch_both(x, k, dy):
    import torch

    return torch.autograd.grad(torch.nn.functional.conv2d(x, k, padding=1), (x, k), dy)


def _torch_conv(x, k):
    import torch

    return torch.nn.functional.conv2d(x, k, padding=1)


def shapes_table(shapes, steps: int) -> list[str]:
    """shapes: [((B, H, W, C_in, C_out), calls per forward), ...]; a last row sums
    calls x time, the UNet's 3x3 convolutions in one forward + backward."""
    import torch

    lines = [("| shape BxHxWxC->D | calls | XLA fwd ms | XLA fwd+bwd ms | XLA kernel grad ms | "
              "PyTorch fwd ms | PyTorch fwd+bwd ms (NCHW) | PyTorch fwd+bwd ms (channels-last) | "
              "XLA / PyTorch-CL fwd+bwd |"), "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    totals = np.zeros(6)
    for shape, calls in shapes:
        b, h, w, c, d = shape
        x, k, dy = _inputs(shape)
        fwd, both, kgrad = jax.jit(conv3x3), fwd_and_grads(conv3x3), jax.jit(kernel_grad_xla)
        row = [median_seconds(fwd, steps, x, k), median_seconds(both, steps, x, k, dy),
               median_seconds(kgrad, steps, x, dy)]
        for layout in (torch.contiguous_format, torch.channels_last):
            xt = torch.randn(b, c, h, w).contiguous(memory_format=layout).requires_grad_()
            kt = torch.randn(d, c, 3, 3).contiguous(memory_format=layout).requires_grad_()
            dyt = torch.randn(b, d, h, w).contiguous(memory_format=layout)
            if layout is torch.contiguous_format:
                row.append(median_seconds(_torch_forward, steps, xt, kt))
            row.append(median_seconds(_torch_both, steps, xt, kt, dyt))
        totals += calls * np.asarray(row)
        lines.append(f"| {b}x{h}x{w}x{c}->{d} | {calls} | "
                     + " | ".join(f"{v * 1e3:.2f}" for v in row) + f" | {row[1] / row[5]:.2f} |")
        print(lines[-1], flush=True)
    lines.append("| **sum of calls x time** | | "
                 + " | ".join(f"**{v * 1e3:.1f}**" for v in totals)
                 + f" | **{totals[1] / totals[5]:.2f}** |")
    print(lines[-1], flush=True)
    return lines


def peaks_table(steps: int) -> list[str]:
    import torch

    lines = [("| framework | dtype | 4096^2 matmul GFLOP/s (bf16: JAX accumulates and returns "
              "fp32, PyTorch returns bf16) | 3x3 conv 8x96x96x128->128 GFLOP/s |"),
             "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    b, h, w, c, d = PAPER_LAYER
    for dtype in (jnp.float32, jnp.bfloat16):
        a = jax.random.normal(jax.random.key(0), (4096, 4096)).astype(dtype)
        mm = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
        t_mm = median_seconds(mm, steps, a)
        x, k, _ = _inputs(PAPER_LAYER, dtype)
        conv = jax.jit(conv3x3)
        t_conv = median_seconds(conv, steps, x, k)
        lines.append(f"| JAX {jax.__version__} (XLA:CPU) | {jnp.dtype(dtype).name} | "
                     f"{2 * 4096 ** 3 / t_mm / 1e9:.0f} | {conv_flops(*PAPER_LAYER) / t_conv / 1e9:.0f} |")
        print(lines[-1], flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(4096, 4096).to(dtype)
        xt, kt = torch.randn(b, c, h, w).to(dtype), torch.randn(d, c, 3, 3).to(dtype)
        with torch.no_grad():
            t_mm = median_seconds(torch.matmul, steps, a, a)
            t_conv = median_seconds(_torch_conv, steps, xt, kt)
        lines.append(f"| PyTorch {torch.__version__} ({torch.get_num_threads()} threads) | "
                     f"{str(dtype).removeprefix('torch.')} | {2 * 4096 ** 3 / t_mm / 1e9:.0f} | "
                     f"{conv_flops(*PAPER_LAYER) / t_conv / 1e9:.0f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", choices=("all", "peaks", "shapes", "alternatives"))
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--shapes", default="",
                   help="comma-separated BxHxWxCxD (default: every 3x3 convolution of the "
                        "CPU UNet, traced; alternatives: its 3 largest and a paper-UNet layer)")
    args = p.parse_args(argv)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
              if args.shapes else None)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    if args.part in ("all", "peaks"):
        peaks_table(args.steps)
        print()
    if shapes is None:
        unet, share = unet_conv_shapes("cpu", 16)
        print(f"configs/ddpm.py:cpu at batch 16: {len(unet)} distinct 3x3 stride-1 "
              f"convolutions, {share:.0%} of the UNet's convolution FLOPs\n")
    if args.part in ("all", "shapes"):
        shapes_table([(s, 1) for s in shapes] if shapes else unet, args.steps)
        print()
    if args.part in ("all", "alternatives"):
        alternatives(shapes or [s for s, _ in unet[:3]] + [PAPER_LAYER], args.steps)


if __name__ == "__main__":
    main()
