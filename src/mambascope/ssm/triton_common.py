"""Pieces the 1D and 2D Triton scans share: Δ activation, the linear-recurrence combine, and the two
"carry" kernels that let every tile of a long sequence run in parallel.

A diagonal linear recurrence `h[t] = a[t] h[t-1] + x[t]` with `a[t] = exp(Δ[t] A)` has a cheap
summary over any stretch of positions: the decay over the stretch is `exp(A ΣΔ)` (one exponential per
state, not per position) and the state it leaves behind from a zero start is
`Σ_s exp(A (ΣΔ after s)) x[s]`. `agg_kernel` computes those summaries (one exponential per element,
no scan), `combine_kernel` chains them across stretches with an associative scan, and the main
kernels then start every tile from its exact entering state. The same kernels serve the adjoint
(right-to-left) recurrence of the backward passes; the 2D scans chain their row and column
summaries with `combine_kernel` too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.extra import libdevice
from triton.runtime.driver import driver

from mambascope.errors import ConfigError

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True under Triton's CPU interpreter (`TRITON_INTERPRET=1`), where CPU tensors are allowed."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(u: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if not (u.is_cuda or interpreting()):
        raise ConfigError(
            "the triton scan backend needs CUDA tensors",
            hint="move the inputs to a GPU, set TRITON_INTERPRET=1 for the (slow) CPU interpreter, "
            "or use backend 'torch'",
        )


def as_f32(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A per-channel or per-state parameter as a contiguous float32 tensor (a dummy when absent)."""
    if t is None:
        return torch.empty(1, device=like.device, dtype=torch.float32)
    return t.detach().to(torch.float32).contiguous()


def parameter_grads(dtypes: tuple, was_grouped: bool, dA, dBC, dD, dbias) -> tuple:
    """The autograd wrappers' gradients of (A, B, C, D, delta_bias): float32 results cast back to the
    parameters' dtypes (None stays None). dB and dC come stacked, (2, batch, G, N, ...), and are cast
    together when B and C share a dtype (one operation: at one bag a step the host sets the pace); they
    lose the group axis the wrapper added."""
    if dtypes[1] == dtypes[2]:
        dBC = dBC.to(dtypes[1])
    dB, dC = dBC[0], dBC[1]
    if not was_grouped:
        dB, dC = dB[:, 0], dC[:, 0]
    return tuple(g.to(t) if g is not None else None for g, t in zip((dA, dB, dC, dD, dbias), dtypes, strict=True))


def pow2(n: int) -> int:
    """The smallest power of two >= n (at least 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's sizes. (`triton.cdiv` is a constexpr function in Triton 3.6 and
    costs a few µs a call on the host: the 1D scan's wrapper made 17 calls a forward+backward.)"""
    return -(-a // b)


def specialisation_key(args: tuple) -> tuple:
    """What Triton's specialisation of a kernel reads from each argument: a tensor's dtype and whether
    its address is 16-byte aligned; an integer's width (i32, i64 or u64), whether it is 1 and whether
    16 divides it; a float only as a float; anything else (bools, None) by value. Two calls whose
    arguments agree on these run the same compiled kernel. (One comprehension over the arguments, with
    plain tensors and ints, nearly all of them, told apart by exact type: this runs at every launch.)"""
    return tuple([(a.dtype, a.data_ptr() & 15 == 0) if type(a) is torch.Tensor
                  else _int_specialisation(a) if type(a) is int
                  else _other_specialisation(a) for a in args])


def _int_specialisation(a: int) -> tuple:
    return a == 1, a & 15 == 0, -(2**31) <= a < 2**31, a >= 2**63


def _other_specialisation(arg: object) -> object:
    if isinstance(arg, torch.Tensor):  # a subclass, e.g. a Parameter
        return arg.dtype, arg.data_ptr() & 15 == 0
    if isinstance(arg, int) and not isinstance(arg, bool):
        return _int_specialisation(arg)
    if isinstance(arg, float):
        return float
    return arg


def _no_launch_hooks() -> bool:
    """Whether nothing (a profiler such as Proton) listens to Triton's kernel launches: Triton keeps
    its launch hooks as chains of callables (3.6, 3.8), older versions as one callable or None."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return not any(getattr(hook, "calls", hook) for hook in hooks)


_COMPILED: dict[tuple, tuple] = {}


def launch(kernel: triton.runtime.JITFunction, grid: tuple[int, ...], *args: object, **kwargs: object) -> None:
    """`kernel[grid](*args, **kwargs)`, through the compiled kernel's C launcher once Triton has compiled
    it for these arguments' specialisation (`specialisation_key`).

    Why: Triton binds and specialises every argument again at each launch. For the scans' kernels
    (20-45 arguments) that took 40-100 µs of host time a launch on the H100 machine
    (benchmarks/NOTES_scan.md, version 19), and the compiled kernel's own runner still 30-50 µs, most
    of it building launch metadata for hooks that nobody set: the C launcher alone takes 10-15 µs
    (version 29). A forward and backward of the 1D scan launch seven to nine kernels. `kwargs` are the constexpr
    arguments and launch options, in the caller's order, compared by value. Under the interpreter
    every launch goes through Triton, and so does every launch while a launch hook is set."""
    if interpreting():
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    key = (kernel, device, specialisation_key(args), tuple(kwargs.items()))
    found = _COMPILED.get(key)
    if found is None:
        compiled = kernel[grid](*args, **kwargs)  # Triton's own dispatch: compiles when needed, launches
        _COMPILED[key] = compiled, kernel.arg_names[len(args):]
        return
    compiled, tail_names = found
    tail = [kwargs[name] for name in tail_names]  # the constexprs, which the launcher takes and skips
    grid3 = (*grid, 1, 1)
    if not _no_launch_hooks():
        compiled[grid3[:3]](*args, *tail)
        return
    compiled.run(grid3[0], grid3[1], grid3[2], current_stream(device), compiled.function, compiled.packed_metadata,
                 None, None, None, *args, *tail)  # no launch metadata, no hooks


def current_stream(device: int) -> int:
    """The handle of the device's current CUDA stream (PyTorch's), as Triton's own launches use it."""
    return driver.active.get_current_stream(device)


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap (channel blocks never straddle a
    B/C group)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


@triton.jit
def lin_combine(a1, b1, a2, b2):
    """Compose two steps of `h -> a h + b`: first (a1, b1), then (a2, b2)."""
    return a1 * a2, a2 * b1 + b2


# compiled kernels can call libdevice; the CPU interpreter cannot
_HAS_LIBDEVICE: tl.constexpr = tl.constexpr(not interpreting())


@triton.jit
def exp_sfu(x):
    """exp(x) as one `ex2` of the special-function unit, results below 2^-126 flushed to zero. `tl.exp`
    adds a range check and two rescaling multiplies for such results to every exponential, which no Δ
    or gate needs."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def sigmoid(x, SFU: tl.constexpr):
    """1 / (1 + exp(-x)); SFU: on `exp_sfu` (see `delta_act`)."""
    if SFU:
        return 1.0 / (1.0 + exp_sfu(-x))
    return tl.sigmoid(x)


@triton.jit
def delta_act(raw, bias, SOFTPLUS: tl.constexpr, SFU: tl.constexpr = False):
    """Δ = softplus(delta + bias) (torch's threshold of 20), or delta + bias.

    SFU takes softplus's exponential and log (and `sigmoid`'s exponential) as bare special-function
    unit instructions: `exp_sfu`, and lg2.approx instead of Triton's ~25-instruction log polynomial.
    The log's absolute error (~1e-7) is why small arguments then take a series. The 1D kernels use it
    (the log alone was a tenth of the forward's instructions; `exp_sfu` cut the backward's per-tile
    part by 12%, compiled for sm_90). The 2D kernels do not: the fast log measured 25% slower in
    their forward and `exp_sfu` 2-3% slower in their backward, whose tile kernel then spilled more
    (NOTES_scan.md, versions 23 and 32). The interpreter takes the polynomial."""
    x = raw + bias
    if SOFTPLUS:
        if SFU and _HAS_LIBDEVICE:
            e = exp_sfu(tl.minimum(x, 20.0))
            series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - e * 0.25)))  # e < 2^-5: error < 2e-7
            x = tl.where(x > 20.0, x, tl.where(e < 0.03125, series, libdevice.fast_logf(1.0 + e)))
        else:
            e = tl.exp(tl.minimum(x, 20.0))
            x = tl.where(x > 20.0, x, tl.where(x < -15.0, e, tl.log(1.0 + e)))
    return x


@triton.jit
def delta_act_grad(raw, bias, SOFTPLUS: tl.constexpr, SFU: tl.constexpr = False):
    """dΔ/d(delta) for `delta_act`."""
    x = raw + bias
    g = tl.where(x > 20.0, 1.0, sigmoid(x, SFU)) if SOFTPLUS else tl.full(x.shape, 1.0, tl.float32)
    return g


@triton.jit
def tile_positions(t0, T: tl.constexpr, LS, FLIP: tl.constexpr):
    """The memory positions (T, 1), in the order the tile loads them, of walk positions t0 .. t0 + T - 1
    in a row LS long.

    FLIP = 0 walks the row from its start. FLIP = k > 0 walks it from its end: walk position p is
    stored at LS - 1 - p (the wrapper pads such rows on the left), and the tile reads its memory
    ascending in runs of k positions, k being what one thread loads with one 16-byte load, so the
    loads stay vector loads; `walk_order` then reverses each run inside its thread (descending
    addresses would make every element its own load)."""
    tr = tl.arange(0, T)
    if FLIP:
        return (LS - t0 - FLIP * (tr // FLIP + 1) + tr % FLIP)[:, None]
    return (t0 + tr)[:, None]


@triton.jit
def walk_order(x, FLIP: tl.constexpr):
    """A (T, BD) tile loaded at `tile_positions` put in walk order, or a walk-ordered tile put in the
    order `tile_positions` stores it (reversing each run is its own inverse). Give it float32 values:
    reversing packed 16-bit values costs byte permutes (the bf16 backward measured 20% slower)."""
    if FLIP:
        T: tl.constexpr = x.shape[0]
        return tl.reshape(tl.flip(tl.reshape(x, (T // FLIP, FLIP, x.shape[1])), 1), (T, x.shape[1]))
    return x



@triton.jit
def load_walk(ptr, xoff, FLIP: tl.constexpr):
    """One (T, BD) tile of a padded row, read at its `tile_positions` offsets `xoff`, as float32 in
    walk order (rows are padded, so no mask)."""
    return walk_order(tl.load(ptr + xoff).to(tl.float32), FLIP)

def flip_run(reverse: bool, T: int, element_size: int) -> int:
    """The kernels' FLIP argument: 0 for a walk from the start, else the run of positions one 16-byte
    load holds (`tile_positions`; a longer run crosses lanes and costs shuffles: +2-3% instructions
    for float32 with runs of 8, compiled for sm_90)."""
    return min(T, 16 // element_size) if reverse else 0


@triton.jit
def store_gated(out_ptr, xoff, y, u, Dv, z_ptr, m, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                FLIP: tl.constexpr = 0, SFU: tl.constexpr = False):
    """The forward kernels' output: `(y + D u) * silu(z)` (mamba-ssm's order), stored at xoff (with
    FLIP, offsets from `tile_positions`; y and u in walk order)."""
    if HAS_D:
        y += Dv * u
    if HAS_Z:
        zz = walk_order(tl.load(z_ptr + xoff, mask=m).to(tl.float32), FLIP)  # lanes masked off are never stored
        y = y * zz * sigmoid(zz, SFU)
    tl.store(out_ptr + xoff, walk_order(y, FLIP), mask=m)


@triton.jit
def _next_combine(f1, s1, c1, f2, s2, c2):
    """Monoid of (first, second, count) over a run of positions; in a reverse scan the right part
    comes first (f1, s1, c1) and the part prepended to it second."""
    return f2, tl.where(c2 >= 2, s2, f1), tl.minimum(c1 + c2, 2)


@triton.jit
def shift_next(x, AXIS: tl.constexpr):
    """x[t+1] at position t along AXIS (the last position keeps x[t]); in registers, no memory.
    A reverse scan written as flip, forward scan, flip, since Triton's reverse scans shuffle every
    element (`reverse_lin_scan`); it runs once a tile, so its flips across lanes were left."""
    cnt = tl.full(x.shape, 1, tl.int32)
    y = tl.flip(x, AXIS)
    _, nxt, _ = tl.associative_scan((y, y, cnt), axis=AXIS, combine_fn=_next_combine)
    return tl.flip(nxt, AXIS)


@triton.jit
def reverse_lin_scan(a, b):
    """g with g[t] = b[t] + a[t] g[t+1] along axis 0 of a (T, BD) tile (the adjoint recurrence).

    Each half of the tile is scanned as flip, forward scan, flip, and the right half's first value is
    then carried into the left half. Why halves: Triton 3.8 lowers `associative_scan(...,
    reverse=True)` with warp shuffles for every element even along an axis inside one thread, and a
    tile whose positions span two lanes (16 bf16 or 8 float32: two 16-byte loads) pays one shuffle an
    element for every flip across them; inside a half, flips are register moves, and the carry is one
    shuffle a channel (benchmarks/NOTES_scan.md, versions 15 and 32)."""
    T: tl.constexpr = a.shape[0]
    BD: tl.constexpr = a.shape[1]
    P, gl = tl.associative_scan(
        (tl.flip(tl.reshape(a, (2, T // 2, BD)), 1), tl.flip(tl.reshape(b, (2, T // 2, BD)), 1)),
        axis=1, combine_fn=lin_combine,
    )
    P, gl = tl.flip(P, 1), tl.flip(gl, 1)  # P: the product of a over the rest of the half
    half = tl.arange(0, 2)[:, None, None]
    first = tl.arange(0, T // 2)[None, :, None] == 0
    carry = tl.sum(tl.sum(tl.where((half == 1) & first, gl, 0.0), axis=1), axis=0)[None, None, :]
    return tl.reshape(gl + P * tl.where(half == 0, carry, 0.0), (T, BD))


@triton.jit
def channel_block(pid_d, dpg, bias_ptr, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """The 1D kernels' block of BD channels: channel indices (BD,), their B/C group, the state index
    (NP, 1) and its mask, and the channels' Δ bias (1, BD)."""
    d0 = pid_d * BD
    offs_d = d0 + tl.arange(0, BD)
    nidx = tl.arange(0, NP)[:, None]
    bias = tl.load(bias_ptr + offs_d)[None, :] if HAS_BIAS else 0.0
    return offs_d, d0 // dpg, nidx, nidx < N, bias


@triton.jit(do_not_specialize=["one"])
def agg_kernel(
    v_ptr, dl_ptr, z_ptr, coef_ptr, A_ptr, bias_ptr,
    S_ptr, agg_ptr,
    DIM, dpg, G, Lseq, LS, seg_len, n_seg, one,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr,
    REVERSE: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FLIP: tl.constexpr,
):
    """Summaries (ΣΔ, zero-start state) of one segment of one 1D sequence for BD channels (Lseq
    positions, row stride LS, rows padded with zeros to LS so tiles load unmasked; coef float32 and
    tile-major, (batch, G, LS / T, N, T)).

    Forward (REVERSE False): drive `Δ u B`, the state left at the segment's end, summed over tiles
    from the end so each weight is one exponential of the Δ summed after the position. Adjoint
    (REVERSE True): drive `dout silu(z) C`, the carry `a[first] g[first]` passed left. Layout as in
    the main kernels: (T, BD) tiles, one channel a thread, states unrolled. FLIP (`tile_positions`):
    the walk runs from each row's end; positions here are walk positions.
    """
    pid_d = tl.program_id(0)
    s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d, g, nidx, nmask, bias = channel_block(pid_d, dpg, bias_ptr, N, NP, BD, HAS_BIAS)
    A2 = tl.load(A_ptr + offs_d[None, :] * N + nidx * one, mask=nmask, other=0.0) * 1.4426950408889634
    seq = pid_b * DIM + offs_d  # (BD,)
    zero_d = (offs_d * 0)[None, :]
    cbase = (pid_b * G + g) * N * LS
    tr = tl.arange(0, T)
    H = tl.zeros((NP, BD), dtype=tl.float32)
    run = tl.zeros((1, BD), dtype=tl.float32)  # Δ summed over the tiles already visited
    t_lo = s * seg_len
    n_t = tl.cdiv(tl.minimum(seg_len, Lseq - t_lo), T)
    for k in range(n_t):
        kk = k if REVERSE else n_t - 1 - k
        t0 = t_lo + kk * T
        offs_t = t0 + tr
        tm = (offs_t < Lseq)[:, None]
        xoff = seq[None, :] * LS + tile_positions(t0, T, LS, FLIP)
        raw = load_walk(dl_ptr, xoff, FLIP)
        dt = tl.where(tm, delta_act(raw, bias, SOFTPLUS, SFU=True), 0.0)
        v = load_walk(v_ptr, xoff, FLIP)
        if REVERSE:
            if HAS_Z:
                zz = load_walk(z_ptr, xoff, FLIP)
                v = v * zz * sigmoid(zz, SFU=True)
        else:
            v = dt * v
        cs = tl.cumsum(dt, axis=0)
        tot = tl.sum(dt, axis=0)[None, :]
        e = run + cs if REVERSE else run + (tot - cs)
        for n in tl.static_range(N):
            sel = nidx == n
            An = tl.sum(tl.where(sel, A2, 0.0), axis=0)[None, :]
            cf = tl.load(coef_ptr + cbase + t0 * N + n * T + tr[:, None] + zero_d)  # tile-major, float32
            contrib = tl.sum(tl.exp2(An * e) * v * cf, axis=0)[None, :]
            H = tl.where(sel, H + contrib, H)
        run += tot
    sidx = seq * n_seg + s
    tl.store(S_ptr + sidx[None, :], run)
    tl.store(agg_ptr + sidx[None, :] * N + nidx * one, H, mask=nmask)


@triton.jit
def combine_kernel(
    S_ptr, agg_ptr, A_ptr, init_ptr, out_ptr,
    P, R_rows, DIM, n_seg,
    N: tl.constexpr, NP: tl.constexpr, BP: tl.constexpr, SC: tl.constexpr,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, CHANNEL_LAST: tl.constexpr,
):
    """Chain segment summaries into the state entering every segment of every sequence.

    Sequence p = (b*DIM + d)*R_rows + r; summaries S (P, n_seg), agg (P, n_seg, N). Segments are
    taken SC at a time and chained inside a chunk with an associative scan, so a sequence of many
    segments costs n_seg / SC dependent steps. REVERSE chains right to left (the adjoint). Output
    (P, n_seg, N), or with CHANNEL_LAST (batch, n_seg, N, DIM) (1D only: coalesced per-state loads
    for the main kernels); the final state (P, N) follows the P*n_seg*N entries.
    """
    pid = tl.program_id(0)
    offs_p = (pid * BP + tl.arange(0, BP)).to(tl.int64)
    pm = offs_p < P
    d = (offs_p // R_rows) % DIM
    bb = offs_p // (R_rows * DIM)
    offs_n = tl.arange(0, NP)
    nm = offs_n < N
    pn = pm[:, None] & nm[None, :]
    A2 = tl.load(A_ptr + d[:, None] * N + offs_n[None, :], mask=pn, other=0.0) * 1.4426950408889634
    if HAS_INIT:
        H = tl.load(init_ptr + offs_p[:, None] * N + offs_n[None, :], mask=pn, other=0.0)
    else:
        H = tl.zeros((BP, NP), dtype=tl.float32)
    offs_c = tl.arange(0, SC)
    last = offs_c == (SC - 1)
    first = offs_c == 0
    n_chunks = tl.cdiv(n_seg, SC)
    for k in range(n_chunks):
        c0 = n_seg - (k + 1) * SC if REVERSE else k * SC
        segs = c0 + offs_c
        sm = (segs >= 0) & (segs < n_seg)
        idx = offs_p[:, None] * n_seg + segs[None, :]  # (BP, SC)
        m2 = pm[:, None] & sm[None, :]
        S = tl.load(S_ptr + idx, mask=m2, other=0.0)
        m3 = m2[:, None, :] & nm[None, :, None]
        ag = tl.load(agg_ptr + idx[:, None, :] * N + offs_n[None, :, None], mask=m3, other=0.0)
        dec = tl.exp2(A2[:, :, None] * S[:, None, :])
        ap, bp = tl.associative_scan((dec, ag), axis=2, combine_fn=lin_combine, reverse=REVERSE)
        states = ap * H[:, :, None] + bp  # inclusive: the state after each segment
        if REVERSE:
            target = segs - 1
            ok = m3 & (target >= 0)[None, None, :]
            H = tl.sum(tl.where(first[None, None, :], states, 0.0), axis=2)
        else:
            target = segs + 1
            ok = m3 & (target < n_seg)[None, None, :]
            H = tl.sum(tl.where(last[None, None, :], states, 0.0), axis=2)
        if CHANNEL_LAST:
            oidx = ((bb[:, None, None] * n_seg + target[None, None, :]) * N + offs_n[None, :, None]) * DIM + d[:, None, None]
        else:
            oidx = (offs_p[:, None, None] * n_seg + target[None, None, :]) * N + offs_n[None, :, None]
        tl.store(out_ptr + oidx, states, mask=ok)
    # the sequence's first segment (last, when REVERSE) enters with the initial state
    if HAS_INIT:
        H0 = tl.load(init_ptr + offs_p[:, None] * N + offs_n[None, :], mask=pn, other=0.0)
    else:
        H0 = tl.zeros((BP, NP), dtype=tl.float32)
    edge = n_seg - 1 if REVERSE else 0
    if CHANNEL_LAST:
        eidx = ((bb[:, None] * n_seg + edge) * N + offs_n[None, :]) * DIM + d[:, None]
    else:
        eidx = (offs_p[:, None] * n_seg + edge) * N + offs_n[None, :]
    tl.store(out_ptr + eidx, H0, mask=pn)
    tl.store(out_ptr + P * n_seg * N + offs_p[:, None] * N + offs_n[None, :], H, mask=pn)


def chain_segments(
    S: torch.Tensor, agg: torch.Tensor, A32: torch.Tensor, rows_per_channel: int, dim: int,
    reverse: bool, init: torch.Tensor | None = None, channel_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entering state of every segment, final state (P, N)) from the summaries S (P, n_seg) and
    agg (P, n_seg, N); the entering states are (P, n_seg, N), or (batch, n_seg, N, dim) with
    channel_last."""
    P, n_seg, N = agg.shape
    buf = torch.empty(P * n_seg * N + P * N, device=agg.device, dtype=torch.float32)
    NP = pow2(N)
    SC = min(32, pow2(n_seg))
    BP = max(1, min(8, 2048 // (NP * SC)))
    launch(combine_kernel, (cdiv(P, BP),),
        S, agg, A32, init if init is not None else S, buf,
        P, rows_per_channel, dim, n_seg,
        N=N, NP=NP, BP=BP, SC=SC, REVERSE=reverse, HAS_INIT=init is not None, CHANNEL_LAST=channel_last,
        num_warps=4,
    )
    entering = buf[: P * n_seg * N]
    entering = entering.view(P // dim, n_seg, N, dim) if channel_last else entering.view(P, n_seg, N)
    return entering, buf[P * n_seg * N:].view(P, N)
