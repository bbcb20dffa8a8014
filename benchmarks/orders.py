"""Walks in place against walks on copies: the reversed 1D scan, and the blocks that walk several ways.

    python benchmarks/orders.py [--device cuda] [--quick]

The scans walk a sequence from its end inside the Triton kernels (`selective_scan(..., reverse=True)`:
reversed loads and stores, no copies), and the blocks build their walks on that:

- scan: the 1D headline shapes walked from the end, checked against float64, timed against the same
  scan run forward on flipped copies (flip in, flip out: what a scan without a reverse walk needs, and
  mamba-ssm's kernel, when it is available, on those copies), and against the forward walk alone (what
  walking back costs in the kernels);
- SS2D (VMamba, Microscopic-Mamba): the four walks as one stack of rows and columns scanned both ways,
  against `cross_scan`'s four copies, one grouped scan and `cross_merge`;
- bidirectional Mamba (Vim, MambaMIL): the reverse path in place, against flipped tokens in and out;
- SegMamba's tri-orientated layer: the reverse mixer in place and the inter-slice walk as a transposed
  copy, against index gathers of the tokens in each order and scatters back.

Each block runs forward + backward (bf16 autocast on CUDA) both ways with the same weights; the
float32 outputs are checked to agree first. Times are medians (CUDA events through Triton's
`do_bench` on the GPU, wall clock on the CPU, where the torch backend runs), taken `--rounds` times
with the variants alternated, and the median round is printed (a shared or cold GPU moved single
timings by up to 50% here); the ratio is copies / in place.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import scan as scan_bench
import torch
import torch.nn.functional as F

from mambascope.models.seg.encoder import TriOrientedMamba
from mambascope.ssm import SS2D, Mamba, cross_merge, cross_scan, selective_scan, tri_orientation_orders

WALKED = ("u", "delta", "B", "C", "z")  # the scan inputs along L


def ss2d_on_copies(block: SS2D, hidden: torch.Tensor) -> torch.Tensor:
    """SS2D's forward with its four walks as `cross_scan` copies, one grouped scan, `cross_merge`."""
    batch, H, W, _ = hidden.shape
    x, z = block.in_proj(hidden).chunk(2, dim=-1)
    x = F.silu(block.conv2d(x.permute(0, 3, 1, 2).contiguous()))
    d, L = block.d_inner, H * W
    xs = cross_scan(x)
    proj = torch.einsum("bkdl,kcd->bkcl", xs, block.x_proj_weight)
    dts, Bs, Cs = proj.split([block.dt_rank, block.d_state, block.d_state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, block.dt_projs_weight)
    y = selective_scan(xs.reshape(batch, 4 * d, L), dts.reshape(batch, 4 * d, L), -torch.exp(block.A_logs.float()),
                       Bs.contiguous(), Cs.contiguous(), block.Ds.float(),
                       delta_bias=block.dt_projs_bias.reshape(-1).float(), delta_softplus=True, backend=block.backend)
    y = cross_merge(y.view(batch, 4, d, L), H, W).transpose(1, 2).reshape(batch, H, W, d)
    return block.out_proj(block.out_norm(y) * F.silu(z))


def bidirectional_on_copies(block: Mamba, hidden: torch.Tensor) -> torch.Tensor:
    """Bidirectional Mamba with the reverse path run forward on flipped tokens and flipped back."""
    x, z = block.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    y = block._scan_path(x, z, block.conv1d, block.x_proj, block.dt_proj, block.A_log, block.D, False)
    y = y + block._scan_path(x.flip(-1), z.flip(-1), block.conv1d_b, block.x_proj_b, block.dt_proj_b,
                             block.A_b_log, block.D_b, False).flip(-1)
    return block.out_proj(y.transpose(1, 2))


def tri_orientation_on_copies(layer: TriOrientedMamba, causal: list[Mamba], x: torch.Tensor) -> torch.Tensor:
    """The ToM layer as causal mixers on the tokens gathered in each order and scattered back."""
    b, c, d, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    normed = layer.norm(tokens)
    orders = [(p.to(x.device), i.to(x.device)) for p, i in tri_orientation_orders(d, h, w)]
    mixed = sum(m(normed[:, p])[:, i] for m, (p, i) in zip(causal, orders, strict=True))
    return (tokens + mixed / 3).transpose(1, 2).reshape(b, c, d, h, w)


def alternated(fns: list, rounds: int) -> list:
    """Each of fns() (a number or a tuple of numbers) run `rounds` times, the fns alternated; the
    median of each number over the rounds."""
    results = [[fn() for fn in fns] for _ in range(rounds)]
    medians = []
    for i in range(len(fns)):
        runs = [r[i] for r in results]
        if isinstance(runs[0], tuple):
            medians.append(tuple(statistics.median(v[j] for v in runs) for j in range(len(runs[0]))))
        else:
            medians.append(statistics.median(runs))
    return medians


def compare_blocks(name: str, in_place, on_copies, x: torch.Tensor, device: str, repeats: int, rounds: int) -> None:
    """Check that the two forms agree in float32, then time forward + backward of each."""
    with torch.no_grad():
        err = scan_bench.rel_err(in_place(x), on_copies(x))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    x = x.detach().requires_grad_(True)

    def step(fn):
        def run():
            with amp:
                out = fn(x)
            out.float().square().mean().backward()
        return run

    ms_in, ms_copies = alternated([lambda: scan_bench.bench(step(in_place), device, repeats),
                                   lambda: scan_bench.bench(step(on_copies), device, repeats)], rounds)
    ok = "ok" if err < 1e-4 else "MISMATCH"
    print(f"{name:44s} in place {ms_in:8.3f} ms  copies {ms_copies:8.3f} ms  "
          f"copies / in place {ms_copies / ms_in:5.2f}x  (outputs agree to {err:.1e}: {ok})", flush=True)


def scan_rows(device: str, quick: bool, repeats: int, rounds: int) -> None:
    """The reversed 1D scan: float64 check, then timed against forward scans on flipped copies."""
    shapes = [(1, 1024, 16384, torch.bfloat16), (1, 1024, 16384, torch.float32), (64, 384, 3136, torch.bfloat16)]
    mamba = None
    if device == "cuda":
        kind, _ = scan_bench.use_mamba_ssm(False, scan_bench.ROOT / ".whl")
        mamba = scan_bench.mamba_on_dict(kind) if kind else None
    if device != "cuda":  # the torch backend flips copies itself: only a smoke run
        shapes = [(1, 64, 1024, torch.float32)]
    for batch, dim, L, dtype in shapes[:1] if quick else shapes:
        inputs = scan_bench.inputs_1d(batch, dim, L, 16, dtype, device, 11)

        def in_place(d, backend="auto"):
            return selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"], True,
                                  reverse=True, backend=backend)

        def on_copies(scan):
            def run(d):
                flipped = {k: (v.flip(-1) if k in WALKED else v) for k, v in d.items()}
                return scan(flipped).flip(-1)
            return run

        shape = f"{batch}x{dim}x{L} {str(dtype).split('.')[-1]}"
        if device == "cuda":
            e_out, e_grad, _ = scan_bench.check(in_place, lambda d: in_place(d, "reference"),
                                                lambda d: in_place(d, "torch"), inputs)
            print(f"check reverse scan {shape}: out {e_out:.1e} grads {e_grad:.1e}", flush=True)
        forward = scan_bench.scan_1d("auto")
        rows = [("in place", in_place), ("forward scan on copies", on_copies(forward)),
                ("forward scan, no walk back", forward)]
        if mamba is not None:
            rows.append(("mamba-ssm on copies", on_copies(mamba)))
        timings = alternated([lambda fn=fn, x=inputs: scan_bench.measure(fn, x, device, reps=repeats)[:2]
                              for _, fn in rows], rounds)
        base = timings[0]
        for (label, _), (fwd, both) in zip(rows, timings, strict=True):
            print(f"reverse scan {shape:22s} {label:24s} fwd {fwd:8.3f} ms  f+b {both:8.3f} ms  "
                  f"/ in place {fwd / base[0]:5.2f}x / {both / base[1]:5.2f}x", flush=True)
        del inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the first scan shape only")
    p.add_argument("--only", choices=["scan", "blocks"], help="only the scans or only the blocks")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="alternated timing rounds (median printed)")
    args = p.parse_args()
    device, cpu = args.device, args.device == "cpu"
    torch.manual_seed(0)
    if args.only != "blocks":
        scan_rows(device, args.quick, args.repeats, args.rounds)
    if args.only == "scan":
        return

    timing = (device, args.repeats, args.rounds)
    ss2d = SS2D(96).to(device)
    shape = (16, 56, 56, 96) if not cpu else (2, 16, 16, 96)
    compare_blocks(f"SS2D {shape}", lambda x: ss2d(x), lambda x: ss2d_on_copies(ss2d, x),
                   torch.randn(*shape, device=device), *timing)
    bidir = Mamba(512, bidirectional=True).to(device)
    shape = (1, 16384 if not cpu else 2048, 512)
    compare_blocks(f"bidirectional Mamba {shape}", lambda x: bidir(x), lambda x: bidirectional_on_copies(bidir, x),
                   torch.randn(*shape, device=device), *timing)
    tom = TriOrientedMamba(96).to(device)
    causal = [Mamba(96).to(device) for _ in range(3)]
    for mixer, twin in zip(tom.mixers, causal, strict=True):
        twin.load_state_dict(mixer.state_dict())
    size = 32 if not cpu else 12
    compare_blocks(f"SegMamba ToM (1, 96, {size}, {size}, {size})", lambda x: tom(x),
                   lambda x: tri_orientation_on_copies(tom, causal, x),
                   torch.randn(1, 96, size, size, size, device=device), *timing)


if __name__ == "__main__":
    main()
