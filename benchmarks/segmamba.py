"""SegMamba against MONAI's SwinUNETR and SegResNet: parameters, forward / backward time, peak memory.

The issue's setting is one 4-channel 128³ BraTS patch on a GPU (the default). On a CPU use a smaller
size, e.g.

    python benchmarks/segmamba.py --device cpu --size 64 --repeats 2

Each model runs in its own process so its peak memory is its own (CUDA: `max_memory_allocated`; CPU: the
process's peak resident set minus what it held before building the model). A step is forward + loss
(sigmoid BCE on 3 channels) + backward, with bf16 autocast on the GPU (`--fp32` turns it off); forward
alone is timed under `torch.no_grad()`. Times are medians over `--repeats` after `--warmup` steps.
Ratios are SegMamba's cost divided by each peer's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time

from isolated import run_each_in_process

MODELS = ("segmamba", "swinunetr", "segresnet")


def build(name: str, args: argparse.Namespace):
    """The three models at their published BraTS settings (4 modalities in, TC/WT/ET out)."""
    from monai.networks.nets import SegResNet, SwinUNETR

    from mambascope.models import create_model

    if name == "segmamba":
        return create_model("segmamba", in_channels=4, out_channels=3, base_channels=args.base_channels,
                            gradient_checkpointing=args.checkpointing, backend=args.backend)
    if name == "swinunetr":
        return SwinUNETR(in_channels=4, out_channels=3, feature_size=48, use_checkpoint=args.checkpointing)
    return SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=16, blocks_down=(1, 2, 2, 4),
                     blocks_up=(1, 1, 1))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_one(name: str, args: argparse.Namespace, queue) -> None:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    before = _peak_rss_mib()
    model = build(name, args).to(device).train()
    x = torch.randn(args.batch, 4, args.size, args.size, args.size, device=device)
    target = (torch.rand(args.batch, 3, args.size, args.size, args.size, device=device) > 0.9).float()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.fp32)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        with amp:
            logits = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        model.zero_grad(set_to_none=True)
        loss.backward()

    def forward() -> None:
        with torch.no_grad(), amp:
            model(x)

    def timed(step) -> float:
        times = []
        for i in range(args.warmup + args.repeats):
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(train_step)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else _peak_rss_mib() - before)
    forward_s = timed(forward)
    queue.put({"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "forward_s": forward_s, "train_step_s": step_s, "peak_mib": peak})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="Cubic input size (multiple of 32 for SwinUNETR).")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--base-channels", type=int, default=48, help="SegMamba width (paper: 48).")
    parser.add_argument("--backend", default="auto", help="SegMamba scan backend.")
    parser.add_argument("--checkpointing", action="store_true", help="Gradient checkpointing in every model.")
    parser.add_argument("--fp32", action="store_true", help="No bf16 autocast on the GPU.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error("--size must be a multiple of 32 (SwinUNETR downsamples 32x)")

    names = args.models.split(",")
    if "swinunetr" in names and importlib.util.find_spec("einops") is None:
        print("swinunetr: skipped (MONAI's SwinUNETR needs the einops package: pip install einops)",
              file=sys.stderr)
        names.remove("swinunetr")
    results = run_each_in_process(names, _run_one, args)

    print(f"input 1x4x{args.size}³ x{args.batch} on {args.device}"
          f"{'' if args.device == 'cpu' or args.fp32 else ' (bf16 autocast)'}")
    print(f"{'model':<11}{'params (M)':>12}{'forward (s)':>13}{'fwd+bwd (s)':>13}{'peak (MiB)':>12}")
    for r in results:
        print(f"{r['model']:<11}{r['params_m']:>12.2f}{r['forward_s']:>13.3f}{r['train_step_s']:>13.3f}"
              f"{r['peak_mib']:>12.0f}")
    ours = next((r for r in results if r["model"] == "segmamba"), None)
    if ours is not None:
        for peer in (r for r in results if r["model"] != "segmamba"):
            print(f"segmamba / {peer['model']}: forward {ours['forward_s'] / peer['forward_s']:.2f}x, "
                  f"fwd+bwd {ours['train_step_s'] / peer['train_step_s']:.2f}x, "
                  f"peak memory {ours['peak_mib'] / max(peer['peak_mib'], 1e-9):.2f}x, "
                  f"params {ours['params_m'] / peer['params_m']:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
