"""The fused depthwise conv + bias + SiLU in front of the scans, against PyTorch's conv and SiLU.

    python benchmarks/conv.py [--rounds 3]

Needs a GPU (the fused kernels are Triton's). Shapes are the convs the models run:

- Mamba's causal 1D conv of width 4 on MambaMIL bags (1 × 1024 channels × 2,000 or 8,000 patches) and on a
  long batch of sequences (2 × 384 × 32,768), walked from the start and from the end (`reverse`: the
  look-ahead conv of a bidirectional block);
- the 3 × 3 "same" conv of Mamba2D on a 2DMamba-MIL grid (256 channels, 128 × 128 cells), and two shapes
  of SS2D's conv, which stays on PyTorch (its rows show why: on 56-wide planes the fused backward gains
  little): Microscopic-Mamba's first stage (16 images × 4 chunks, 24 channels, 56 × 56) and a VMamba-T-sized
  first stage (16 × 192 × 56 × 56).

Both are reached through `depthwise_conv_silu` with the backend `torch` (PyTorch's conv, the slice or flip
around it for the 1D walks, then SiLU) or `triton` (one kernel forward, two backward), in float32 and under
bf16 autocast (where PyTorch takes cuDNN's bf16 conv). Each variant is checked against the other first, then
its forward and its forward + backward (gradients of input, weight and bias) are captured in a CUDA graph
and replayed, so the host's launch time is not counted. Times are medians over `--rounds` rounds with the
two backends alternated; the ratio is PyTorch / fused.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from mambascope.ssm.dispatch import depthwise_conv_silu

SHAPES_1D = ((1, 1024, 2000), (1, 1024, 8000), (2, 384, 32768))
SHAPES_2D = ((1, 256, 128, 128), (64, 24, 56, 56), (16, 192, 56, 56))


def replay_ms(fn, replays: int = 50) -> float:
    """Mean ms of one replay of `fn` captured in a CUDA graph (after warm-up runs that compile it)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def case(shape: tuple[int, ...], dtype: torch.dtype, reverse: bool, rounds: int) -> dict:
    """Forward and forward + backward ms of both backends on one shape, median over alternated rounds."""
    channels = shape[1]
    if len(shape) == 3:
        conv = nn.Conv1d(channels, channels, 4, padding=3, groups=channels)
    else:
        conv = nn.Conv2d(channels, channels, 3, padding="same", groups=channels)
    conv = conv.cuda()
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    autocast = dtype == torch.bfloat16

    def forward(backend: str) -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            return depthwise_conv_silu(conv, x, backend, reverse=reverse)

    def step(backend: str) -> None:
        torch.autograd.grad(forward(backend), (x, conv.weight, conv.bias), dy)

    with torch.no_grad():  # no autograd graph left alive: a capture would wait on its default-stream nodes
        want, got = forward("torch").float(), forward("triton").float()
    error = ((got - want).norm() / want.norm()).item()
    assert error < (1e-2 if autocast else 1e-5), f"{shape} {dtype}: fused conv off by {error:.2e}"
    times = {key: [] for key in ("torch fwd", "triton fwd", "torch f+b", "triton f+b")}
    for round_ in range(rounds):
        for backend in ("torch", "triton") if round_ % 2 == 0 else ("triton", "torch"):
            with torch.no_grad():
                times[f"{backend} fwd"].append(replay_ms(lambda b=backend: forward(b)))
            times[f"{backend} f+b"].append(replay_ms(lambda b=backend: step(b)))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("conv.py needs a CUDA GPU: the fused conv is a Triton kernel")
    print(f"device: {torch.cuda.get_device_name()}; ms per call, CUDA-graph replays, median of {args.rounds} rounds")
    print(f"{'shape':>22} {'dtype':>9} {'walk':>8} | {'torch fwd':>9} {'fused':>7} {'ratio':>6} | "
          f"{'torch f+b':>9} {'fused':>7} {'ratio':>6}")
    rows = [(s, r) for s in SHAPES_1D for r in (False, True)] + [(s, False) for s in SHAPES_2D]
    for shape, reverse in rows:
        for dtype in (torch.float32, torch.bfloat16):
            t = case(shape, dtype, reverse, args.rounds)
            walk = "-" if len(shape) == 4 else ("reverse" if reverse else "forward")
            name = " x ".join(map(str, shape))
            print(f"{name:>22} {str(dtype)[6:]:>9} {walk:>8} | {t['torch fwd']:9.4f} {t['triton fwd']:7.4f} "
                  f"{t['torch fwd'] / t['triton fwd']:5.2f}x | {t['torch f+b']:9.4f} {t['triton f+b']:7.4f} "
                  f"{t['torch f+b'] / t['triton f+b']:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
