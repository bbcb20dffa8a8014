"""The 1D selective scan as Triton kernels (the `triton` backend of `selective_scan`).

Layout: a channel per lane, a tile of T positions (8, or 16 for 16-bit inputs when training:
`_tile`) held by one thread where its 16-byte loads cover it (8 bf16) and by two otherwise (Triton
splits the positions when a thread's load is 4 float32 or 8 of 16 bf16), states unrolled. The scan
along the tile and the sum over states then run in registers. Rows are padded with zeros to a multiple
of 16 positions, so tiles load without masks. B and C are float32 and tile-major (`_tile_major`).
`reverse` walks each row from its end: rows are padded on the left, each tile reads its memory
ascending in 16-byte runs and reverses them in registers (`tile_positions`, `walk_order`), B and C
are reversed by their tile-major conversion and dB, dC flipped back on the host.

Forward: the sequence is cut into segments so that batch 1 still fills the GPU; `agg_kernel`
summarises the segments (ΣΔ and the state each leaves from a zero start), `chain_segments` turns the
summaries into each segment's entering state, and `_fwd_kernel` walks its segment tile by tile:
exponentials, the scan along the tile from the carried state, C·h, D skip, z gate. B and C are loaded
once per tile for the whole block of channels; the next tile's u and Δ are loaded while this one is worked
on (except where that measured slower: `_prefetch`). With SAVE it stores the state entering every
tile ((batch, tiles, N, dim) float32) for the backward.

Backward: cut into segments like the forward. The adjoint carry entering every segment from the right
comes from the same summary + chain kernels run right to left on `dout silu(z) C` (with the last
state's gradient as the initial carry). `_bwd_kernel` walks its segment tile by tile from the right
for BD channels, passing the adjoint carry between tiles in registers: it recomputes each tile's
states from the saved ones, runs the adjoint scan `g[t] = c[t] + a[t+1] g[t+1]`, forms every
gradient and writes the block's partial dB/dC (summed over its channels across the warp); the host
sums the partials — deterministic, no atomics.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambascope.ssm.triton_common import (
    agg_kernel,
    as_f32,
    cdiv,
    chain_segments,
    channel_block,
    check_device,
    delta_act,
    delta_act_grad,
    flip_run,
    interpreting,
    largest_pow2_divisor,
    launch,
    lin_combine,
    load_walk,
    parameter_grads,
    pow2,
    reverse_lin_scan,
    shift_next,
    sigmoid,
    store_gated,
    tile_positions,
    walk_order,
)


@dataclasses.dataclass(frozen=True)
class Scan1DConfig:
    """Tile sizes. T: positions per tile, also the spacing of the states saved for the backward (0:
    `_tile` picks); BD: channels per forward program (one a thread, warps = BD / 32); programs:
    programs wanted per pass (the sequence is cut into segments until there are this many); BD_BWD,
    warps_bwd, programs_bwd: the same for the backward; regs, regs_bwd: the register cap ptxas gets
    for the forward and backward kernels (None: its own choice)."""

    T: int = 0
    BD: int = 32
    programs: int = 2048
    warps: int = 1
    BD_BWD: int = 32
    warps_bwd: int = 1
    programs_bwd: int = 2048
    regs: int | None = None
    regs_bwd: int | None = None


def default_config(batch: int, dim: int) -> Scan1DConfig:
    """Measured on an H100 (benchmarks/NOTES_scan.md): few channels (batch 1 WSI bags) run best as
    one-warp programs over ~2048 long segments, many batches x channels as 4-warp programs over more,
    shorter segments. The forward is bound by the latency of its loads, not by its instructions:
    with a register cap of 255 (168 for 4-warp programs) ptxas keeps more of them in flight than on
    its own (118 registers), 0.38 -> 0.32 ms on 1 x 1024 x 16384 bf16."""
    if interpreting():
        return Scan1DConfig(T=4, BD=2, programs=8, warps=1, BD_BWD=2, warps_bwd=1, programs_bwd=8)
    if batch * dim >= 16384:
        return Scan1DConfig(BD=128, programs=8192, warps=4, programs_bwd=8192, regs=168)
    return Scan1DConfig(regs=255)


@triton.jit(do_not_specialize=["one"])
def _fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, carry_ptr, hs_ptr, last_ptr,
    DIM, dpg, G, L, LS, seg_len, n_seg, n_tiles, one,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_CARRY: tl.constexpr, SAVE: tl.constexpr, WRITE_LAST: tl.constexpr, PREFETCH: tl.constexpr,
    FLIP: tl.constexpr,
):
    # Tiles are (T, BD): each thread owns whole channels and the T positions of a tile (one 16-byte
    # load), so the scan along T runs inside the thread and the sum over states is a register sum.
    # States are unrolled (static loop over n); the per-channel state vector is an (NP, BD) tensor
    # whose NP values also live in the owning thread. `one` (== 1, never specialised) hides the
    # contiguity of n from the compiler so those small loads keep that layout. Positions are walk
    # positions; with FLIP the walk runs from each row's end (`tile_positions`, `walk_order`).
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d, g, nidx, nmask, bias = channel_block(pid_d, dpg, bias_ptr, N, NP, BD, HAS_BIAS)
    A2 = tl.load(A_ptr + offs_d[None, :] * N + nidx * one, mask=nmask, other=0.0) * 1.4426950408889634
    Dv = tl.load(D_ptr + offs_d)[None, :] if HAS_D else 0.0
    seq = pid_b * DIM + offs_d
    state_off = seq[None, :] * N + nidx * one  # (NP, BD) offsets of (seq, n)
    if HAS_CARRY:
        H = tl.load(carry_ptr + ((pid_b * n_seg + pid_s) * N + nidx) * DIM + offs_d[None, :] * one, mask=nmask, other=0.0)
    else:
        H = tl.zeros((NP, BD), dtype=tl.float32)
    tr = tl.arange(0, T)
    first = (tr == 0)[:, None]
    lastr = (tr == T - 1)[:, None]
    zero_d = (offs_d * 0)[None, :]
    bc_base = (pid_b * G + g) * N * LS  # B and C are tile-major: (batch, G, LS / T, N, T)
    t_lo = pid_s * seg_len
    t_end = tl.minimum(t_lo + seg_len, L)
    n_t = tl.cdiv(t_end - t_lo, T)
    # PREFETCH: Δ and u of the next tile are loaded before this tile's states are worked out, so
    # their latency hides behind that work (`tl.range` with `num_stages` made the loop 10x slower).
    # A tile that starts before the segment's end lies inside the padded row, so one flag a tile
    # masks the loads (a mask per position kept reversed walks' loads from being vector loads).
    if PREFETCH:
        mem = tile_positions(t_lo, T, LS, FLIP)
        raw_next = tl.load(dl_ptr + seq[None, :] * LS + mem, mask=t_lo < t_end, other=0.0)
        u_next = tl.load(u_ptr + seq[None, :] * LS + mem, mask=t_lo < t_end, other=0.0)
    for k in range(n_t):
        t0 = t_lo + k * T
        offs_t = t0 + tr
        tm = (offs_t < L)[:, None]
        if SAVE:
            tl.store(hs_ptr + ((pid_b * n_tiles + t0 // T) * N + nidx) * DIM + offs_d[None, :] * one, H, mask=nmask)
        xoff = seq[None, :] * LS + tile_positions(t0, T, LS, FLIP)
        if PREFETCH:
            raw = walk_order(raw_next.to(tl.float32), FLIP)
            u = walk_order(u_next.to(tl.float32), FLIP)
            mem = tile_positions(t0 + T, T, LS, FLIP)
            raw_next = tl.load(dl_ptr + seq[None, :] * LS + mem, mask=t0 + T < t_end, other=0.0)
            u_next = tl.load(u_ptr + seq[None, :] * LS + mem, mask=t0 + T < t_end, other=0.0)
        else:
            raw = load_walk(dl_ptr, xoff, FLIP)
            u = load_walk(u_ptr, xoff, FLIP)
        dt = tl.where(tm, delta_act(raw, bias, SOFTPLUS, SFU=True), 0.0)
        dtu = dt * u
        y = tl.zeros((T, BD), dtype=tl.float32)
        bc_off = bc_base + t0 * N + tr[:, None] + zero_d  # + n * T: an offset the loads encode
        for n in tl.static_range(N):
            sel = nidx == n
            An = tl.sum(tl.where(sel, A2, 0.0), axis=0)[None, :]
            Hn = tl.sum(tl.where(sel, H, 0.0), axis=0)[None, :]
            Bn = tl.load(B_ptr + bc_off + n * T)
            Cn = tl.load(C_ptr + bc_off + n * T)
            a = tl.exp2(dt * An)
            x = dtu * Bn + tl.where(first, a * Hn, 0.0)
            _, h = tl.associative_scan((a, x), axis=0, combine_fn=lin_combine)
            y += Cn * h
            H = tl.where(sel, tl.sum(tl.where(lastr, h, 0.0), axis=0)[None, :], H)
        store_gated(out_ptr, xoff, y, u, Dv, z_ptr, None, HAS_D, HAS_Z, FLIP, SFU=True)
    if WRITE_LAST:
        tl.store(last_ptr + state_off, H, mask=nmask & (pid_s == n_seg - 1))


@triton.jit(do_not_specialize=["one"])
def _bwd_kernel(
    u_ptr, dl_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
    hs_ptr, wc_ptr,
    du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, par_ptr,
    DIM, dpg, G, L, LS, seg_len, n_seg, n_tiles, n_dblk, one,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FLIP: tl.constexpr,
):
    # One segment of tiles for BD channels, walked right to left, same layout as the forward. The
    # adjoint carry W (NP, BD) enters from the segment's right end (chained segment summaries) and
    # is passed from tile to tile in registers; the state entering each tile is the one the forward
    # saved. Per state n (a plain loop, to keep registers low): the forward scan, the adjoint scan
    # `g[t] = c[t] + a[t+1] g[t+1]`, then the gradients. dB and dC are summed over the BD channels
    # (a reduction across the warp's lanes) and written as this channel block's partial; dA, dD and
    # dbias are summed over the segment in registers and written once, as the rows 0..N-1, N and N+1
    # of the segment's (N + 2, DIM) partial, so the host sums all three in one reduction. (An
    # inline-PTX reduce-scatter of dB and dC over the lanes served 8-position tiles; 16-position tiles
    # without it were faster, NOTES_scan.md version 23.)
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d, g, nidx, nmask, bias = channel_block(pid_d, dpg, bias_ptr, N, NP, BD, HAS_BIAS)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d)[None, :]
    seq = pid_b * DIM + offs_d
    tr = tl.arange(0, T)
    first = (tr == 0)[:, None]
    lastr = (tr == T - 1)[:, None]
    zero_d = (offs_d * 0)[None, :]
    cidx = ((pid_b * n_seg + pid_s) * N + nidx) * DIM + offs_d[None, :] * one  # (batch, seg, N, DIM)
    part_base = ((pid_b * n_dblk + pid_d) * N) * LS  # this channel block's dB/dC partial planes
    bc_base = (pid_b * G + g) * N * LS  # B and C are tile-major, as in the forward
    W = tl.load(wc_ptr + cidx, mask=nmask, other=0.0)
    dA_acc = tl.zeros((NP, BD), dtype=tl.float32)
    dD_acc = tl.zeros((1, BD), dtype=tl.float32)
    db_acc = tl.zeros((1, BD), dtype=tl.float32)
    t_lo = pid_s * seg_len
    n_t = tl.cdiv(tl.minimum(seg_len, L - t_lo), T)
    for k in range(n_t):
        t0 = t_lo + (n_t - 1 - k) * T
        offs_t = t0 + tr
        tm = (offs_t < L)[:, None]
        xoff = seq[None, :] * LS + tile_positions(t0, T, LS, FLIP)
        raw = load_walk(dl_ptr, xoff, FLIP)
        dt = tl.where(tm, delta_act(raw, bias, SOFTPLUS, SFU=True), 0.0)
        dt_next = shift_next(dt, 0)
        u = load_walk(u_ptr, xoff, FLIP)
        dout = load_walk(dout_ptr, xoff, FLIP)
        if HAS_Z:
            zz = load_walk(z_ptr, xoff, FLIP)
            sz = sigmoid(zz, SFU=True)
            dy = dout * zz * sz
        else:
            dy = dout
        dtu = dt * u
        sidx = (pid_b * n_tiles + t0 // T) * N * DIM + (offs_d * one)[None, :]  # + n*DIM
        y = tl.zeros((T, BD), dtype=tl.float32)
        gB = tl.zeros((T, BD), dtype=tl.float32)
        qA = tl.zeros((T, BD), dtype=tl.float32)
        bc_off = bc_base + t0 * N + tr[:, None] + zero_d
        p_off = part_base + offs_t
        for n in range(N):
            sel = nidx == n
            An = tl.load(At_ptr + n * DIM + offs_d)[None, :]
            A2n = An * 1.4426950408889634
            Hn = tl.load(hs_ptr + sidx + n * DIM)
            Wn = tl.sum(tl.where(sel, W, 0.0), axis=0)[None, :]
            Bn = tl.load(B_ptr + bc_off + n * T)
            Cn = tl.load(C_ptr + bc_off + n * T)
            a = tl.exp2(dt * A2n)
            x = dtu * Bn
            _, h = tl.associative_scan((a, x + tl.where(first, a * Hn, 0.0)), axis=0, combine_fn=lin_combine)
            y += Cn * h
            a_next = tl.where(lastr, 0.0, tl.exp2(dt_next * A2n))
            c = dy * Cn + tl.where(lastr, Wn, 0.0)
            gg = reverse_lin_scan(a_next, c)
            W = tl.where(sel, tl.sum(tl.where(first, a * gg, 0.0), axis=0)[None, :], W)
            q = gg * (h - x)
            gB += gg * Bn
            qA += q * An
            dA_acc = tl.where(sel, dA_acc + tl.sum(q * dt, axis=0)[None, :], dA_acc)
            tl.store(dBp_ptr + p_off + n * LS, tl.sum(gg * dtu, axis=1), mask=offs_t < L)
            tl.store(dCp_ptr + p_off + n * LS, tl.sum(dy * h, axis=1), mask=offs_t < L)
        # u, Δ, dout and z are loaded again rather than kept through the state loop, which then
        # spills less (NOTES_scan.md, version 28)
        u = load_walk(u_ptr, xoff, FLIP)
        raw = load_walk(dl_ptr, xoff, FLIP)
        du = dt * gB
        if HAS_D:
            du += Dv * dy
            y += Dv * u
            dD_acc += tl.sum(dy * u, axis=0)[None, :]
        if HAS_Z:
            dout = load_walk(dout_ptr, xoff, FLIP)
            zz = load_walk(z_ptr, xoff, FLIP)
            sz = sigmoid(zz, SFU=True)
            tl.store(dz_ptr + xoff, walk_order(dout * y * sz * (1.0 + zz * (1.0 - sz)), FLIP))
        ddt = tl.where(tm, u * gB + qA, 0.0) * delta_act_grad(raw, bias, SOFTPLUS, SFU=True)
        db_acc += tl.sum(ddt, axis=0)[None, :]
        tl.store(du_ptr + xoff, walk_order(du, FLIP))
        tl.store(ddl_ptr + xoff, walk_order(ddt, FLIP))
    prow = par_ptr + (pid_b * n_seg + pid_s) * (N + 2) * DIM  # this segment's (N + 2, DIM) partial
    tl.store(prow + nidx * DIM + offs_d[None, :] * one, dA_acc, mask=nmask)
    if HAS_D:
        tl.store(prow + N * DIM + offs_d[None, :], dD_acc)
    if HAS_BIAS:
        tl.store(prow + (N + 1) * DIM + offs_d[None, :], db_acc)


@triton.jit
def _pad_rows_kernel(
    a_ptr, b_ptr, c_ptr, pa_ptr, pb_ptr, pc_ptr, L, LS, DIM,
    sa_b, sa_d, sa_l, sb_b, sb_d, sb_l, sc_b, sc_d, sc_l,
    BLOCK: tl.constexpr, LEFT: tl.constexpr,
):
    # Program (row b * DIM + d, block of BLOCK padded positions, which tensor): copies the row's L values
    # from the source's strides into the padded row, zeros around them, in the source's dtype.
    row = tl.program_id(0).to(tl.int64)
    which = tl.program_id(2)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = offs - (LS - L) if LEFT else offs
    m = (src >= 0) & (src < L)
    bb, d = row // DIM, row % DIM
    dst = row * LS + offs
    if which == 0:
        tl.store(pa_ptr + dst, tl.load(a_ptr + bb * sa_b + d * sa_d + src * sa_l, mask=m, other=0.0), mask=offs < LS)
    elif which == 1:
        tl.store(pb_ptr + dst, tl.load(b_ptr + bb * sb_b + d * sb_d + src * sb_l, mask=m, other=0.0), mask=offs < LS)
    else:
        tl.store(pc_ptr + dst, tl.load(c_ptr + bb * sc_b + d * sc_d + src * sc_l, mask=m, other=0.0), mask=offs < LS)


def _padded(tensors: tuple[Tensor | None, ...], LS: int, flip: bool) -> list[Tensor | None]:
    """Up to three (batch, dim, L) tensors, contiguous, with the last axis padded with zeros to LS (the
    kernels' row stride, a multiple of 16 so that every thread's tile is one aligned vector load): on the
    right, or on the left for a walk from the end (`flip`), so the walk's first L positions are the row's
    values. Tensors already in that form pass through; the rest are copied by one launch, at their
    strides (for unaligned bag lengths torch's pads were three operations each, NOTES_scan.md version 29)."""
    needs = [t is not None and (t.shape[-1] != LS or not t.is_contiguous()) for t in tensors]
    todo = [t for t, need in zip(tensors, needs, strict=True) if need]
    if not todo:
        return list(tensors)
    batch, dim, L = todo[0].shape
    padded = [torch.empty(batch, dim, LS, device=t.device, dtype=t.dtype) for t in todo]
    slots = (todo + todo[:1] * 2)[:3]  # unused slots repeat the first tensor (their programs do not run)
    outs = (padded + padded[:1] * 2)[:3]
    BLOCK = min(1024, pow2(LS))
    launch(_pad_rows_kernel, (batch * dim, cdiv(LS, BLOCK), len(todo)),
        *slots, *outs, L, LS, dim, *(stride for t in slots for stride in t.stride()),
        BLOCK=BLOCK, LEFT=flip,
        num_warps=4,
    )
    copies = iter(padded)
    return [next(copies) if need else t for t, need in zip(tensors, needs, strict=True)]


def _unpadded(t: Tensor, L: int, flip: bool) -> Tensor:
    """The L real positions of a row padded by `_padded`."""
    return t[..., t.shape[-1] - L:] if flip else t[..., :L]


@triton.jit
def _tile_major_kernel(
    b_ptr, c_ptr, out_ptr, L, LS, G,
    sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
    N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BL: tl.constexpr, FLIP: tl.constexpr,
):
    # Program (b * G + g, block of BL walk positions, B or C): reads the block at the source's strides
    # (reversed when FLIP), writes it as float32 tiles (LS / T, N, T) with zeros past L.
    bg = tl.program_id(0).to(tl.int64)
    which = tl.program_id(2)
    offs_l = tl.program_id(1) * BL + tl.arange(0, BL)[:, None]
    offs_n = tl.arange(0, NP)[None, :]
    src_l = L - 1 - offs_l if FLIP else offs_l
    m = (offs_l < L) & (offs_n < N)
    b, g = bg // G, bg % G
    if which == 0:
        v = tl.load(b_ptr + b * sb_b + g * sb_g + offs_n * sb_n + src_l * sb_l, mask=m, other=0.0).to(tl.float32)
    else:
        v = tl.load(c_ptr + b * sc_b + g * sc_g + offs_n * sc_n + src_l * sc_l, mask=m, other=0.0).to(tl.float32)
    dst = out_ptr + (which * tl.num_programs(0) + bg) * N * LS + (offs_l // T) * (N * T) + offs_n * T + offs_l % T
    tl.store(dst, v, mask=(offs_l < LS) & (offs_n < N))


def _tile_major(B: Tensor, C: Tensor, LS: int, T: int, flip: bool) -> tuple[Tensor, Tensor]:
    """B and C (batch, G, N, L), any strides and float dtype, as the kernels read them: float32,
    zero-padded to LS positions, tile-major (batch, G, LS / T, N, T), and reversed along L for a walk
    from the end. One tile's values for all states are then one contiguous block, and a state's place in
    it is a constant offset that the loads encode, where (N, L) planes needed an address computed per
    state and load; and 16-bit values are converted once here, not by every thread of every tile
    (together 17% of the forward's instructions, NOTES_scan.md). One launch converts both (the copies,
    pads and flips it replaces were 4-8 operations of host time, NOTES_scan.md version 29)."""
    batch, G, N, L = B.shape
    out = torch.empty(2, batch, G, LS // T, N, T, device=B.device, dtype=torch.float32)
    BL = 128
    launch(_tile_major_kernel, (batch * G, cdiv(LS, BL), 2),
        B, C, out, L, LS, G, *B.stride(), *C.stride(),
        N=N, NP=pow2(N), T=T, BL=BL, FLIP=flip,
        num_warps=4,
    )
    return out[0], out[1]


def _segments(batch: int, n_dblk: int, n_tiles: int, T: int, programs: int) -> tuple[int, int]:
    """(segments per sequence, positions per segment): cut each sequence into whole tiles until
    there are about `programs` programs. Segments are a multiple of 16 positions long: Triton then
    knows every segment start is 16-aligned and keeps the 16-byte loads (a segment of 504 bf16
    positions made the kernels 2-6x slower, NOTES_scan.md)."""
    step = 16 // math.gcd(T, 16)
    n_seg = max(1, min(n_tiles, math.ceil(programs / (batch * n_dblk))))
    seg_tiles = cdiv(cdiv(n_tiles, n_seg), step) * step
    return cdiv(n_tiles, seg_tiles), seg_tiles * T


def _tile(u: Tensor, cfg: Scan1DConfig, save: bool) -> int:
    """cfg.T, or 16 positions for 16-bit inputs whose states are saved for the backward and 8
    otherwise. Measured on an H100 (NOTES_scan.md, version 23): longer tiles halve the per-state
    work done once a tile and the saved states; the backward gained (1 x 1024 x 16384 bf16
    forward+backward 1.74 -> 1.56 ms; float32 2.83 -> 1.93 ms at 8 positions against 4), while a
    16-position forward alone was slower on 8 x 1024 x 4096 (0.58 -> 0.62 ms)."""
    return cfg.T or (16 if save and u.element_size() == 2 else 8)


def _prefetch(u: Tensor, save: bool) -> bool:
    """Whether the forward loads the next tile's inputs early. Measured on an H100 (A/B in one run,
    benchmarks/NOTES_scan.md version 18): forward alone -3 to -4%; with the saved states for the
    backward, float32 forward+backward -3% but 16-bit +5% (1 x 1024 x 16384 bf16 1.83 -> 1.92 ms)."""
    return not save or u.element_size() == 4


def _forward(u, delta, A32, Bg, Cg, D32, z, bias32, softplus, save, want_last, L, T, flip, cfg):
    batch, dim, LS = u.shape
    G, N = Bg.shape[1], A32.shape[1]
    dpg = dim // G
    BD = largest_pow2_divisor(dpg, cfg.BD)
    n_tiles = cdiv(L, T)
    n_dblk = dim // BD
    n_seg, seg_len = _segments(batch, n_dblk, n_tiles, T, cfg.programs)
    NP = pow2(N)
    f32 = dict(device=u.device, dtype=torch.float32)
    flags = dict(HAS_Z=z is not None, HAS_BIAS=bias32 is not None, SOFTPLUS=softplus)
    dummy = A32
    carry = dummy
    if n_seg > 1:
        S = torch.empty(batch * dim, n_seg, **f32)
        agg = torch.empty(batch * dim, n_seg, N, **f32)
        launch(agg_kernel, (n_dblk, n_seg, batch),
            u, delta, dummy, Bg, A32, bias32 if bias32 is not None else dummy,
            S, agg,
            dim, dpg, G, L, LS, seg_len, n_seg, 1,
            N=N, NP=NP, BD=BD, T=T, REVERSE=False, **flags, FLIP=flip,
            num_warps=cfg.warps,
        )
        carry, _ = chain_segments(S, agg, A32, 1, dim, reverse=False, channel_last=True)
    out = torch.empty_like(u)
    hs = torch.empty(batch, n_tiles, N, dim, **f32) if save else dummy
    last = torch.empty(batch, dim, N, **f32) if want_last else dummy
    launch(_fwd_kernel, (n_dblk, n_seg, batch),
        u, delta, A32, Bg, Cg, D32 if D32 is not None else dummy, z if z is not None else dummy,
        bias32 if bias32 is not None else dummy,
        out, carry, hs, last,
        dim, dpg, G, L, LS, seg_len, n_seg, n_tiles, 1,
        N=N, NP=NP, BD=BD, T=T, HAS_D=D32 is not None, HAS_CARRY=n_seg > 1, SAVE=save,
        WRITE_LAST=want_last, **flags, PREFETCH=_prefetch(u, save), FLIP=flip,
        num_warps=cfg.warps, maxnreg=cfg.regs,
    )
    return out, (last if want_last else None), (hs if save else None)


def _backward(dout, dlast, u, delta, A32, Bg, Cg, D32, z, bias32, softplus, hs, L, T, flip, cfg):
    """(du, dΔ, dA, dB and dC stacked as (2, batch, G, N, L), dD, dz, dbias): the gradients of `_forward`'s
    inputs, unpadded, dB and dC in float32."""
    batch, dim, LS = u.shape
    G, N = Bg.shape[1], A32.shape[1]
    dpg = dim // G
    n_tiles = cdiv(L, T)
    NP = pow2(N)
    f32 = dict(device=u.device, dtype=torch.float32)
    flags = dict(HAS_Z=z is not None, HAS_BIAS=bias32 is not None, SOFTPLUS=softplus)
    dummy = A32
    zt = z if z is not None else dummy
    bt = bias32 if bias32 is not None else dummy
    # the adjoint carry entering every segment from the right: segment summaries, chained
    BD = largest_pow2_divisor(dpg, cfg.BD_BWD)
    n_dblk = dim // BD
    n_seg, seg_len = _segments(batch, n_dblk, n_tiles, T, cfg.programs_bwd)
    S = torch.empty(batch * dim, n_seg, **f32)
    agg = torch.empty(batch * dim, n_seg, N, **f32)
    launch(agg_kernel, (n_dblk, n_seg, batch),
        dout, delta, zt, Cg, A32, bt,
        S, agg,
        dim, dpg, G, L, LS, seg_len, n_seg, 1,
        N=N, NP=NP, BD=BD, T=T, REVERSE=True, **flags, FLIP=flip,
        num_warps=cfg.warps_bwd,
    )
    init = None if dlast is None else dlast.to(torch.float32).reshape(batch * dim, N).contiguous()
    wc, _ = chain_segments(S, agg, A32, 1, dim, reverse=True, init=init, channel_last=True)
    del S, agg
    du = torch.empty_like(u)
    ddl = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else dummy
    # the per-block dB and dC partials, and the per-segment dA, dD, dbias partials, each in one buffer
    # so one reduction sums each (at one sequence a step the host's launches, not the GPU, set the pace)
    dBCp = torch.empty(2, batch, n_dblk, N, LS, **f32)
    par = torch.empty(batch * n_seg, N + 2, dim, **f32)
    launch(_bwd_kernel, (n_dblk, n_seg, batch),
        u, delta, A32.t().contiguous(), Bg, Cg, D32 if D32 is not None else dummy, zt, bt, dout,
        hs, wc,
        du, ddl, dz, dBCp[0], dBCp[1], par,
        dim, dpg, G, L, LS, seg_len, n_seg, n_tiles, n_dblk, 1,
        N=N, NP=NP, BD=BD, T=T, HAS_D=D32 is not None, **flags, FLIP=flip,
        num_warps=cfg.warps_bwd, maxnreg=cfg.regs_bwd,
    )
    # the dB/dC partials are in walk order
    dBC = dBCp.view(2, batch, G, n_dblk // G, N, LS)[..., :L].sum(3)
    if flip:
        dBC = dBC.flip(-1)
    sums = par.sum(0)
    return (
        _unpadded(du, L, flip), _unpadded(ddl, L, flip), sums[:N].t(), dBC,
        sums[N] if D32 is not None else None,
        _unpadded(dz, L, flip) if z is not None else None,
        sums[N + 1] if bias32 is not None else None,
    )


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse, cfg):
        L = u.shape[-1]
        LS = cdiv(L, 16) * 16
        uc, dc, zc = _padded((u, delta, z), LS, reverse)
        cfg = cfg or default_config(u.shape[0], u.shape[1])
        save = any(ctx.needs_input_grad[:8])
        T = _tile(u, cfg, save)
        # B and C are converted anyway (`_tile_major`), so a reversed walk reads them reversed there
        Bg, Cg = (t.unsqueeze(1) if t.dim() == u.dim() else t for t in (B, C))
        Bg, Cg = _tile_major(Bg, Cg, LS, T, reverse)
        A32, D32 = as_f32(A, u), (as_f32(D, u) if D is not None else None)
        b32 = as_f32(delta_bias, u) if delta_bias is not None else None
        flip = flip_run(reverse, T, u.element_size())
        out, last, hs = _forward(uc, dc, A32, Bg, Cg, D32, zc, b32, delta_softplus, save, return_last_state, L, T,
                                 flip, cfg)
        if save:
            ctx.save_for_backward(uc, dc, A32, Bg, Cg, D32, zc, b32, hs)
            ctx.meta = (delta_softplus, cfg, L, T, flip, B.dim() != u.dim(),
                        tuple(t.dtype if t is not None else None for t in (A, B, C, D, delta_bias)))
        out = _unpadded(out, L, reverse)
        if return_last_state:
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *rest):
        uc, dc, A32, Bg, Cg, D32, zc, b32, hs = ctx.saved_tensors
        softplus, cfg, L, T, flip, was_grouped, dtypes = ctx.meta
        dlast = rest[0] if rest else None
        du, ddl, dA, dBC, dD, dz, db = _backward(
            _padded((dout,), uc.shape[-1], bool(flip))[0], dlast, uc, dc, A32, Bg, Cg, D32, zc, b32, softplus, hs, L, T,
            flip, cfg,
        )
        dA, dB, dC, dD, db = parameter_grads(dtypes, was_grouped, dA, dBC, dD, db)
        return du, ddl, dA, dB, dC, dD, dz, db, None, None, None, None


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
    config: Scan1DConfig | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`selective_scan` on the Triton kernels: same arguments, results and gradients as the reference
    (float32 state and accumulation; out in u's dtype; last state in float32). `reverse` walks each
    sequence from its end inside the kernels: no flipped copies of the inputs or outputs."""
    check_device(u)
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse,
                                config)
