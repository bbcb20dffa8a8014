"""Time the selective-scan backends side by side and check them against float64.

    python benchmarks/scan.py --device cuda [--build-mamba-ssm] [--sweep] [--gpu-time] [--json out.json]
    python benchmarks/scan.py --device cpu
    python benchmarks/scan.py --device cuda --host   # short bags, eager: host against wall time

Shapes are the issue's: WSI-like 1D scans (batch 1, dim 1024, L 16k–64k, N 16, bf16 and fp32, plus
two batched shapes) and 2D grids (217×387 dim 256, 128×128 dim 256, 256×256 dim 512; fp32, N 16,
B and C shared by all channels, a tissue-like mask). Every backend present is timed forward and
forward+backward (median of CUDA-event timings; on CUDA the backends take turns for --rounds rounds,
and each number is the median over the rounds), with its peak extra memory, and with --gpu-time the
forward+backward's GPU time (its kernels summed by the profiler, which the host's pace does not move).
On CUDA the Triton kernels are first checked on every shape against a float64 computation with fresh
random inputs and outputs poisoned with NaN beforehand. Ratios are against mamba-ssm measured in the
same run when it is available (installed, or built here with --build-mamba-ssm from the sdist in
.whl/), else against the issue's quoted H100 numbers, marked "quoted". The 2D rows also time
mamba-ssm's (or Triton's) 1D scan over the same number of tokens, and compare with the quoted 2DMamba
CUDA kernel.

On CPU only the reference (tiny shape) and torch backends run; the headline is the torch backend's
batch 1, dim 256, L 16384 forward time.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from mambascope.ssm import selective_scan, selective_scan_2d

ROOT = Path(__file__).resolve().parents[1]

# The H100 numbers: mamba-ssm 2.3.2 selective_scan_fn with z, D, delta_bias, softplus (ms).
QUOTED_MAMBA = {
    (1, 1024, 16384, 16, "bf16"): (0.418, 2.01),
    (1, 1024, 65536, 16, "bf16"): (1.558, 7.20),
    (8, 1024, 4096, 16, "bf16"): (0.639, 3.13),
    (64, 384, 3136, 16, "bf16"): (2.856, 13.7),
    (1, 1024, 16384, 16, "fp32"): (0.818, 2.59),
}
# 2DMamba's released CUDA 2D scan (fp32, batch 1, N 16, shared B/C) and mamba-ssm 1D on the same tokens.
QUOTED_2DMAMBA = {
    (217, 387, 256): (4.51, 20.4, 1.33, 4.53),
    (128, 128, 256): (0.80, 3.34, 0.27, 0.86),
    (256, 256, 512): (3.47, 15.0, 1.90, 6.28),
}
TARGETS = {"1d_fwd": 0.17, "1d_fwdbwd": 1.0, "2d_fwd": 1.5, "2d_fwdbwd": 5.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4}


@dataclasses.dataclass
class Row:
    kind: str
    shape: str
    dtype: str
    backend: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_mib: float | None = None
    err_fwd: float | None = None
    err_grad: float | None = None
    note: str = ""
    gpu_fwdbwd_ms: float | None = None


# ----------------------------------------------------------------------------------------- inputs
def inputs_1d(batch, dim, L, N, dtype, device, seed, groups=1):
    """Mamba-like inputs: Δ = softplus(delta + bias) around 1e-3..0.1, S4D-real-like A."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    u = rnd(batch, dim, L)
    delta = rnd(batch, dim, L, scale=0.5)
    z = rnd(batch, dim, L)
    B = rnd(batch, groups, N, L)
    C = rnd(batch, groups, N, L)
    A = (-torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1) * (0.5 + torch.rand(dim, N, generator=g)))
    dt0 = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = dt0 + torch.log(-torch.expm1(-dt0))  # inverse softplus
    D = torch.randn(dim, generator=g)
    return dict(u=u, delta=delta, A=A.to(device), B=B, C=C, D=D.to(device), z=z, delta_bias=bias.to(device))


def inputs_2d(H, W, dim, N, dtype, device, seed, batch=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = inputs_1d(batch, dim, H * W, N, dtype, device, seed)
    shaped = {k: (v.reshape(*v.shape[:-1], H, W) if k in ("u", "delta", "z", "B", "C") else v) for k, v in d.items()}
    shaped["B"] = shaped["B"][:, 0]
    shaped["C"] = shaped["C"][:, 0]
    # tissue-like mask: an ellipse of real cells with ragged edges (padding outside)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    mask = (yy**2 + xx**2 + 0.15 * torch.rand(H, W, generator=g)) < 1.0
    shaped["mask"] = mask.expand(batch, H, W).contiguous().to(device)
    return shaped


def with_grad(d):
    return {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------- backends
_MAMBA_EXT = None


def load_mamba_ssm_extension(build: bool, sdist_dir: Path) -> tuple[object | None, str]:
    """mamba-ssm's selective scan: the installed package, a prebuilt .so in .whl/, or a fresh build."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401

        return "package", "mamba-ssm package"
    except Exception:
        pass
    so = sorted(glob.glob(str(sdist_dir / "selective_scan_cuda*.so")))
    packed = sorted(glob.glob(str(sdist_dir / "selective_scan_cuda*.so.xz")))
    if not so and packed:
        import lzma

        so = ["/tmp/selective_scan_cuda.so"]
        Path(so[0]).write_bytes(lzma.decompress(Path(packed[0]).read_bytes()))
    if so:
        import importlib.machinery
        import importlib.util

        loader = importlib.machinery.ExtensionFileLoader("selective_scan_cuda", so[0])
        spec = importlib.util.spec_from_loader("selective_scan_cuda", loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        return mod, f"prebuilt {Path(so[0]).name}"
    if build:
        return build_mamba_ssm(sdist_dir), "built from sdist"
    return None, "not available"


def use_mamba_ssm(build: bool, sdist_dir: Path) -> tuple[str | None, str]:
    """(the kind `mamba_on_dict` takes, or None when mamba-ssm's kernel cannot be had; how it was found).
    A loaded extension is kept for `_MambaExtScan`."""
    global _MAMBA_EXT
    try:
        ext, how = load_mamba_ssm_extension(build, sdist_dir)
    except Exception as e:
        return None, f"failed: {e!r}"[:300]
    if ext is None:
        return None, how
    if ext != "package":
        _MAMBA_EXT = ext
    return ("package" if ext == "package" else "ext"), how


def _mamba_sources(sdist_dir: Path) -> Path:
    tars = sorted(sdist_dir.glob("mamba_ssm-*.tar.gz"))
    if not tars:
        raise FileNotFoundError(f"no mamba_ssm-*.tar.gz in {sdist_dir} (pip download --no-deps --no-binary :all: mamba-ssm)")
    dest = Path("/tmp/mamba_ssm_src")
    if not dest.exists():
        with tarfile.open(tars[-1]) as tf:
            tf.extractall(dest, filter="data")
    return next(dest.glob("mamba_ssm-*")) / "csrc" / "selective_scan"


def build_mamba_ssm(sdist_dir: Path):
    """Compile mamba-ssm's selective_scan_cuda for this GPU's architecture only (its own flags)."""
    from torch.utils.cpp_extension import load

    src = _mamba_sources(sdist_dir)
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    names = ["selective_scan.cpp"] + [f"selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")] + [
        f"selective_scan_bwd_{t}_{k}.cu" for t in ("fp32", "fp16", "bf16") for k in ("real", "complex")
    ]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    build_dir = Path("/tmp/mamba_ssm_build")
    build_dir.mkdir(exist_ok=True)
    return load(
        name="selective_scan_cuda",
        sources=[str(src / n) for n in names],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[
            "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
            "-gencode", f"arch=compute_{arch},code=sm_{arch}",
        ],
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        verbose=False,
    )


class _MambaExtScan(torch.autograd.Function):
    """mamba-ssm's compiled fwd/bwd, called the way its selective_scan_fn calls them."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        out, x, *rest = _MAMBA_EXT.fwd(u, delta, A, B, C, D, z, delta_bias, softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        ctx.softplus = softplus
        return rest[0] if z is not None else out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias, *rest = _MAMBA_EXT.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), x, out, None, ctx.softplus, False
        )
        return du, ddelta, dA, dB, dC, dD, (rest[0] if z is not None else None), dbias, None


def mamba_ssm_fn(kind):
    if kind == "package":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return lambda u, delta, A, B, C, D, z, delta_bias, softplus: selective_scan_fn(
            u, delta, A, B, C, D, z, delta_bias, softplus)
    return lambda u, delta, A, B, C, D, z, delta_bias, softplus: _MambaExtScan.apply(
        u, delta, A, B, C, D, z, delta_bias, softplus)


def mamba_on_dict(kind):
    m = mamba_ssm_fn(kind)
    return lambda x: m(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)


def scan_1d(backend, config=None):
    if backend == "triton" and config is not None:
        from mambascope.ssm.triton_scan import selective_scan_triton

        return lambda d: selective_scan_triton(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"],
                                               d["delta_bias"], True, config=config)
    return lambda d: selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"],
                                    True, backend=backend)


def scan_2d(backend, config=None):
    if backend == "triton" and config is not None:
        from mambascope.ssm.triton_scan2d import selective_scan_2d_triton

        return lambda d: selective_scan_2d_triton(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"],
                                                  d["delta_bias"], True, d["mask"], config=config)
    return lambda d: selective_scan_2d(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"],
                                       d["delta_bias"], True, d["mask"], backend=backend)


# ----------------------------------------------------------------------------------------- measuring
def bench(fn, device, reps=20) -> float:
    """Median milliseconds: CUDA-event timing through triton's do_bench on GPU, wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(sorted(times)[len(times) // 2])


def forward_backward(f, inputs):
    """One forward+backward of `f` on leaf copies of `inputs` (gradients returned, not accumulated)."""
    leaves_of = with_grad(inputs)
    leaves = [v for v in leaves_of.values() if v.is_floating_point()]
    grad = torch.randn_like(f(leaves_of))
    return lambda: torch.autograd.grad(f(leaves_of), leaves, grad)


def gpu_ms(step, reps: int = 10) -> float:
    """Milliseconds of GPU work in one call of `step`: its kernels' durations summed (torch profiler),
    without the host's time between launches. Why: a forward+backward of the headline 1D shape is about
    1.4 ms of kernels, close to what the Python wrapper, autograd and the launches take on the host, so
    its CUDA-event time moved with the host (1.38-1.87 ms in one process) while its kernels did not
    (NOTES_scan.md, version 32)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / reps / 1e3


def measure(f, inputs, device, backward=True, reps=5, gpu_time=False):
    """(fwd ms, fwd+bwd ms, peak extra MiB over the inputs for one fwd+bwd, fwd+bwd GPU ms with
    `gpu_time` on CUDA else None)."""
    with torch.no_grad():
        fwd = bench(lambda: f(inputs), device, reps)
    if not backward:
        return fwd, None, None, None
    step = forward_backward(f, inputs)
    both = bench(step, device, reps)
    peak = gpu = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        if gpu_time:
            gpu = gpu_ms(step)
    return fwd, both, peak, gpu


def measure_alternated(cands: list, rounds: int, gpu_time: bool = False) -> dict:
    """{name: (fwd ms, fwd+bwd ms, peak MiB, fwd+bwd GPU ms or None)} for (name, f, inputs) candidates on
    CUDA, each measured `rounds` times in turn, the order reversed every other round, and the median of
    each kept. Why: a shape's first timing, right after its float64 check, has come out up to 45% slow
    (NOTES_scan.md, version 28); the median drops such a round, and taking turns gives every backend the
    same drift."""
    runs: dict[str, list] = {name: [] for name, _, _ in cands}
    for r in range(rounds):
        for name, f, inputs in (cands if r % 2 == 0 else cands[::-1]):
            runs[name].append(measure(f, inputs, "cuda", gpu_time=gpu_time))

    def median(values):
        values = [v for v in values if v is not None]
        return sorted(values)[len(values) // 2] if values else None

    return {name: tuple(median([x[k] for x in got]) for k in range(4)) for name, got in runs.items()}


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def poison():
    """Fill freed allocator blocks with NaN so an output element the kernel never writes shows up."""
    junk = torch.empty(2**28, device="cuda", dtype=torch.float32).fill_(float("nan"))
    del junk


def check(f, ref_fwd, ref_grad, inputs):
    """Relative errors of f's output and of every gradient against float64 computations."""
    poison()
    gi = with_grad(inputs)
    out = f(gi)
    grad = torch.randn_like(out)
    leaves = {k: v for k, v in gi.items() if v.is_floating_point()}
    got = torch.autograd.grad(out, list(leaves.values()), grad)
    f64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        want_out = ref_fwd(f64)
    g64 = with_grad(f64)
    want = torch.autograd.grad(ref_grad(g64), [g64[k] for k in leaves], grad.double())
    errs = {k: rel_err(a, b) for k, a, b in zip(leaves, got, want, strict=True)}
    return rel_err(out, want_out), max(errs.values()), errs


# ----------------------------------------------------------------------------------------- runs
def run_cpu(rows):
    torch.manual_seed(0)
    tiny = inputs_1d(1, 64, 256, 16, torch.float32, "cpu", 0)
    for backend in ("reference", "torch"):
        fwd, both, _, _ = measure(scan_1d(backend), tiny, "cpu", backward=backend != "reference", reps=3)
        rows.append(Row("1d", "1x64x256 N16", "fp32", backend, fwd, both))
    big = inputs_1d(1, 256, 16384, 16, torch.float32, "cpu", 1)
    fwd, both, _, _ = measure(scan_1d("torch"), big, "cpu", backward=False, reps=5)
    rows.append(Row("1d", "1x256x16384 N16", "fp32", "torch", fwd, both, note="issue 3: fwd < 1000 ms on 2 cores"))
    tiny2 = inputs_2d(16, 24, 32, 16, torch.float32, "cpu", 2)
    for backend in ("reference", "torch"):
        fwd, both, _, _ = measure(scan_2d(backend), tiny2, "cpu", backward=backend != "reference", reps=3)
        rows.append(Row("2d", "16x24 dim32 N16", "fp32", backend, fwd, both))
    grid = inputs_2d(64, 64, 64, 16, torch.float32, "cpu", 3)
    fwd, both, _, _ = measure(scan_2d("torch"), grid, "cpu", backward=False, reps=3)
    rows.append(Row("2d", "64x64 dim64 N16", "fp32", "torch", fwd, both))


def timed_rows(rows, kind, shape, dtype, cands, rounds, check, gpu_time=False) -> None:
    """One row per (name, f, inputs) candidate, timed in turns (`measure_alternated`); the "triton" row
    carries the float64 check (error of the output, worst gradient error, passed)."""
    e_out, e_grad, ok = check
    for name, (fwd, both, peak, gpu) in measure_alternated(cands, rounds, gpu_time).items():
        checked = (e_out, e_grad, "" if ok else "CHECK FAILED") if name == "triton" else ()
        rows.append(Row(kind, shape, dtype, name, fwd, both, peak, *checked, gpu_fwdbwd_ms=gpu))


def run_gpu(args, rows, mamba_kind):
    seed = int(time.time()) % 100000
    shapes_1d = list(QUOTED_MAMBA)
    shapes_2d = list(QUOTED_2DMAMBA)
    if args.quick:
        shapes_1d, shapes_2d = shapes_1d[:1], shapes_2d[:1]
    if args.only == "1d":
        shapes_2d = []
    if args.only == "2d":
        shapes_1d = []
    ref1 = scan_1d("reference")
    ref1_grad = scan_1d("torch")
    for i, (b, d, L, N, dt) in enumerate(shapes_1d):
        shape = f"{b}x{d}x{L} N{N}"
        inputs = inputs_1d(b, d, L, N, DTYPES[dt], "cuda", seed + i)
        e_out, e_grad, errs = check(scan_1d("triton"), ref1, ref1_grad, inputs)
        ok = e_out < TOL[dt] and e_grad < TOL[dt]
        print(f"check 1d {shape} {dt}: out {e_out:.2e} grads {' '.join(f'{k}={v:.1e}' for k, v in errs.items())}"
              f" {'OK' if ok else 'FAIL'}", flush=True)
        cands = [("triton", scan_1d("triton"), inputs)]
        if mamba_kind is not None:
            cands.append(("mamba_ssm", mamba_on_dict(mamba_kind), inputs))
        if args.torch_gpu:
            cands.append(("torch", scan_1d("torch"), inputs))
        timed_rows(rows, "1d", shape, dt, cands, args.rounds, (e_out, e_grad, ok), args.gpu_time)
        del inputs
        torch.cuda.empty_cache()
    ref2 = scan_2d("reference")
    ref2_grad = scan_2d("torch")
    for i, (H, W, d) in enumerate(shapes_2d):
        shape = f"{H}x{W} dim{d} N16"
        inputs = inputs_2d(H, W, d, 16, torch.float32, "cuda", seed + 100 + i)
        e_out, e_grad, errs = check(scan_2d("triton"), ref2, ref2_grad, inputs)
        ok = e_out < TOL["fp32"] and e_grad < TOL["fp32"]
        print(f"check 2d {shape}: out {e_out:.2e} grads {' '.join(f'{k}={v:.1e}' for k, v in errs.items())}"
              f" {'OK' if ok else 'FAIL'}", flush=True)
        # the 1D scan over the same tokens, for scale
        flat = inputs_1d(1, d, H * W, 16, torch.float32, "cuda", seed + 200 + i)
        cands = [("triton", scan_2d("triton"), inputs), ("triton-1d-same-tokens", scan_1d("triton"), flat)]
        if mamba_kind is not None:
            cands.append(("mamba_ssm-1d-same-tokens", mamba_on_dict(mamba_kind), flat))
        timed_rows(rows, "2d", shape, "fp32", cands, args.rounds, (e_out, e_grad, ok), args.gpu_time)
        del inputs, flat
        torch.cuda.empty_cache()


# Short MIL bags, where the host sets the pace of an eager forward+backward (--host).
HOST_SHAPES = [(1, 1024, 2000, "bf16"), (1, 1024, 2001, "bf16"), (1, 1024, 8000, "bf16"), (1, 256, 16384, "fp32")]


def eager_host_and_wall(step, iters: int = 40, rounds: int = 3) -> tuple[float, float]:
    """(host ms, wall ms) of one eager call of `step`: `iters` calls are queued without a sync (host), then
    the GPU is waited for (wall); medians over `rounds`. Where host >= wall the GPU waited on the host."""
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    hosts, walls = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        hosts.append((t1 - t0) / iters * 1e3)
        walls.append((time.perf_counter() - t0) / iters * 1e3)
    return sorted(hosts)[rounds // 2], sorted(walls)[rounds // 2]


def run_host(mamba_kind) -> None:
    """Eager forward+backward of the short-bag shapes: host and wall time a call, Triton against mamba-ssm."""
    print(f"\n{'eager f+b (short bags)':<24}{'dtype':<6}{'backend':<11}{'host ms':>9}{'wall ms':>9}  wall vs mamba-ssm")
    for b, d, L, dt in HOST_SHAPES:
        inputs = inputs_1d(b, d, L, 16, DTYPES[dt], "cuda", 0)
        cands = [("triton", scan_1d("triton"))] + ([("mamba_ssm", mamba_on_dict(mamba_kind))] if mamba_kind else [])
        times = {name: eager_host_and_wall(forward_backward(f, inputs)) for name, f in cands}
        for name, (host, wall) in times.items():
            ratio = ""
            if name == "triton" and "mamba_ssm" in times:
                r = times["mamba_ssm"][1] / wall
                ratio = f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"
            print(f"{f'{b}x{d}x{L}':<24}{dt:<6}{name:<11}{host:>9.3f}{wall:>9.3f}  {ratio}", flush=True)


def run_sweep(rows, only):
    """Time several Triton tile configurations on the headline shapes (for tuning the defaults)."""
    from mambascope.ssm.triton_scan import Scan1DConfig
    from mambascope.ssm.triton_scan2d import Scan2DConfig

    cases = [
        ("1d", "1x1024x16384 N16", "bf16", lambda: inputs_1d(1, 1024, 16384, 16, torch.bfloat16, "cuda", 7),
         lambda cfg: scan_1d("triton", Scan1DConfig(**cfg)), SWEEP_1D),
        ("2d", "217x387 dim256 N16", "fp32", lambda: inputs_2d(217, 387, 256, 16, torch.float32, "cuda", 8),
         lambda cfg: scan_2d("triton", Scan2DConfig(**cfg)), SWEEP_2D),
    ]
    for kind, shape, dtype, make_inputs, make_scan, configs in cases:
        if only not in (None, kind):
            continue
        inputs = make_inputs()
        for cfg in configs:
            try:
                fwd, both, peak, _ = measure(make_scan(cfg), inputs, "cuda")
            except Exception as e:  # a configuration that does not compile is reported, not fatal
                print(f"sweep {kind}", cfg, "failed:", repr(e)[:200])
                continue
            rows.append(Row(f"sweep{kind}", shape, dtype, "triton " + json.dumps(cfg), fwd, both, peak))
        del inputs


SWEEP_1D = [
    dict(regs=255),  # the default for batch 1
    dict(),  # ptxas's own register choice
    dict(regs=168),
    dict(regs=255, programs=1024),
    dict(regs=255, programs=4096),
    dict(regs=255, programs_bwd=4096),
    dict(regs=255, regs_bwd=224),
    dict(regs=255, T=8),  # 8-position tiles when training too
]
SWEEP_2D = [
    dict(),
    dict(WB=16, WB_BWD=32),
    dict(WB=64, WB_BWD=64),
    dict(programs=512),
    dict(CH=16),
    dict(warps_bwd=4),
    dict(walk=2),
    dict(walk=4),
]


def run_profile(only):
    """Per-kernel CUDA time of one forward+backward on the headline 1D and 2D shapes."""
    from torch.profiler import ProfilerActivity, profile

    cases = [("1d 1x1024x16384 bf16", scan_1d("triton"), lambda: inputs_1d(1, 1024, 16384, 16, torch.bfloat16, "cuda", 5)),
             ("2d 217x387 dim256 fp32", scan_2d("triton"), lambda: inputs_2d(217, 387, 256, 16, torch.float32, "cuda", 6))]
    for name, f, make_inputs in cases:
        if only is not None and not name.startswith(only):
            continue
        gi = with_grad(make_inputs())
        for _ in range(3):
            f(gi).backward(torch.ones_like(f(gi)))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f(gi).backward(torch.ones_like(f(gi)))
            torch.cuda.synchronize()
        print(f"\nprofile {name} (5 x (2 fwd + 1 bwd)):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


# ----------------------------------------------------------------------------------------- report
def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(rows, quoted_only):
    by_key = {(r.kind, r.shape, r.dtype, r.backend): r for r in rows}
    gpu = any(r.gpu_fwdbwd_ms is not None for r in rows)
    print()
    print(f"{'kind':8s} {'shape':22s} {'dtype':5s} {'backend':28s} {'fwd ms':>8s} {'f+b ms':>8s} "
          + (f"{'f+b GPU':>8s} " if gpu else "")
          + f"{'peak MiB':>9s} {'err fwd':>8s} {'err grad':>8s}  ratio vs mamba-ssm (fwd / f+b"
          + (" / f+b GPU)" if gpu else ")"))
    for r in rows:
        ratio = ""
        if r.kind == "1d" and r.backend in ("triton", "torch"):
            m = by_key.get(("1d", r.shape, r.dtype, "mamba_ssm"))
            b, d, L = (int(v) for v in r.shape.split()[0].split("x"))
            q = QUOTED_MAMBA.get((b, d, L, 16, r.dtype))
            if m is not None:
                ratio = f"{m.fwd_ms / r.fwd_ms:.2f}x / {m.fwdbwd_ms / r.fwdbwd_ms:.2f}x"
                if m.gpu_fwdbwd_ms and r.gpu_fwdbwd_ms:
                    ratio += f" / {m.gpu_fwdbwd_ms / r.gpu_fwdbwd_ms:.2f}x"
                ratio += " faster"
            elif q is not None:
                ratio = f"{q[0] / r.fwd_ms:.2f}x / {q[1] / r.fwdbwd_ms:.2f}x faster (quoted)"
        if r.kind == "2d" and r.backend == "triton":
            H, W = (int(v) for v in r.shape.split()[0].split("x"))
            dim = int(r.shape.split()[1][3:])
            q = QUOTED_2DMAMBA[(H, W, dim)]
            m = by_key.get(("2d", r.shape, r.dtype, "mamba_ssm-1d-same-tokens"))
            ratio = f"vs 2DMamba (quoted) {q[0] / r.fwd_ms:.2f}x / {q[1] / r.fwdbwd_ms:.2f}x faster"
            if m is not None:
                ratio += f"; vs mamba-ssm 1D same tokens {m.fwd_ms / r.fwd_ms:.2f}x / {m.fwdbwd_ms / r.fwdbwd_ms:.2f}x"
        print(f"{r.kind:8s} {r.shape:22s} {r.dtype:5s} {r.backend:28s} {fmt(r.fwd_ms):>8s} {fmt(r.fwdbwd_ms):>8s} "
              + (f"{fmt(r.gpu_fwdbwd_ms):>8s} " if gpu else "")
              + f"{fmt(r.peak_mib, 0):>9s} {fmt(r.err_fwd, 6) if r.err_fwd is None else f'{r.err_fwd:.1e}':>8s} "
              f"{'-' if r.err_grad is None else f'{r.err_grad:.1e}':>8s}  {ratio} {r.note}")
    if quoted_only:
        print("\nmamba-ssm was not available in this run: ratios use the issue's quoted H100 numbers.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--build-mamba-ssm", action="store_true", help="compile mamba-ssm's kernel from the sdist in .whl/")
    p.add_argument("--sdist-dir", type=Path, default=ROOT / ".whl")
    p.add_argument("--sweep", action="store_true", help="also time several Triton tile configurations")
    p.add_argument("--rounds", type=int, default=3, help="GPU timings: rounds of the backends in turn (median)")
    p.add_argument("--quick", action="store_true", help="only the first 1D and 2D shape")
    p.add_argument("--only", choices=["1d", "2d"], help="only the 1D or only the 2D scans (checks, timings, sweep, profile)")
    p.add_argument("--torch-gpu", action="store_true", help="also time the torch backend on the GPU")
    p.add_argument("--profile", action="store_true", help="print per-kernel CUDA times of the Triton scans")
    p.add_argument("--gpu-time", action="store_true",
                   help="also report each forward+backward's GPU time (its kernels summed, no host gaps)")
    p.add_argument("--host", action="store_true",
                   help="only the eager forward+backward of short bags: host and wall time, against mamba-ssm")
    p.add_argument("--json", type=Path, help="write all rows here")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_only:
        build_mamba_ssm(args.sdist_dir)
        return 0
    rows: list[Row] = []
    mamba_kind = None
    if args.device == "cpu":
        run_cpu(rows)
    else:
        builder = None
        if args.build_mamba_ssm and not glob.glob(str(args.sdist_dir / "selective_scan_cuda*.so*")):
            # compile on the CPUs while the GPU runs the Triton checks
            builder = subprocess.Popen([sys.executable, __file__, "--build-only", "--sdist-dir", str(args.sdist_dir)])
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        if args.profile:
            run_profile(args.only)
        if args.sweep:
            run_sweep(rows, args.only)
        if builder is not None:
            t0 = time.time()
            code = builder.wait()
            print(f"mamba-ssm build finished (rc {code}), waited {time.time() - t0:.0f} s", flush=True)
        mamba_kind, how = use_mamba_ssm(args.build_mamba_ssm, args.sdist_dir)
        print("mamba-ssm:", how, flush=True)
        if args.host:
            run_host(mamba_kind)
            return 0
        run_gpu(args, rows, mamba_kind)
    print_table(rows, quoted_only=args.device == "cuda" and mamba_kind is None)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    failed = [r for r in rows if r.note == "CHECK FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
