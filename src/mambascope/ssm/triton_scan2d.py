"""The 2DMamba grid scan as Triton kernels (the `triton` backend of `selective_scan_2d`).

Recurrence per channel and state: row pass `r[i,j] = a[i,j] r[i,j-1] + Δ B u`, column pass
`h[i,j] = a[i,j] h[i-1,j] + r[i,j]`, `a = exp(Δ A)`, `y = C·h + D u`, z gate; masked cells have Δ = 0.

Layout of the forward kernels: a warp spans a column block of WB columns for 128 / WB channels, a
thread holds 4 adjacent columns (one aligned 16-byte load: the width is padded to a multiple of 16)
and all N states of one channel. The sum C·h and the column step stay in the thread; the row scan is
4 steps in the thread plus a few shuffles between the lanes of the block.

Forward:
1. `_row_carry_kernel`: one warp per row walks the column blocks left to right and stores the row
   state entering each (N/WB of the input, float32).
2. When batch × channels × column blocks gives too few programs to fill the GPU, the grid is cut
   into row blocks: `_fwd_kernel` in summary mode gives each row block's bottom column state from a
   zero top, and `chain_segments` turns those into the column state entering every row block.
3. `_fwd_kernel`: one warp per (channels, column block, row block) walks its rows top to bottom,
   scans each row from the stored row carry, keeps the column state of its columns in registers,
   writes y. Every R·walk rows it stores that column state (N/(R·walk) of the input, float32) for the
   backward.

Backward, three launches plus a small chain:
1. `_vrev_kernel` walks rows bottom to top per column block, running the adjoint of the column pass
   `gh[i] = c[i] + a[i+1] gh[i+1]` (c = dy C); it stores the column adjoint every R rows and, per
   row and column block, the summary of the row adjoint, which `chain_segments` turns into the
   row-adjoint carry entering each column block from the right.
2. `_bwd_kernel`: one program per (`walk` tiles of R rows × WB columns down one column block, CH
   channels); with all four carries (left, top, bottom, right) known it recomputes r and h in a
   tile, runs both adjoint scans and forms every gradient. The column state entering the first tile
   is the one the forward saved; each tile hands its bottom row's state to the next through the
   column-adjoint slot it has just read (so the forward saves `walk` times fewer states and the
   backward allocates nothing for it). B and C are loaded once per tile and dB, dC are summed over
   the CH channels in registers: shared B/C get exact gradients from a deterministic sum of
   partials, no atomics. The two adjoint scans run backwards; they are done as forward scans on the
   mirrored tile.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambascope.ssm.triton_common import (
    as_f32,
    cdiv,
    chain_segments,
    check_device,
    delta_act,
    delta_act_grad,
    interpreting,
    largest_pow2_divisor,
    launch,
    lin_combine,
    parameter_grads,
    pow2,
    store_gated,
)


@dataclasses.dataclass(frozen=True)
class Scan2DConfig:
    """WB: columns per forward column block (a multiple of 4, at most 128: one warp spans it with 4
    columns a thread and takes 128 / WB channels; also the spacing of the stored row carries);
    programs: forward programs wanted (the grid is cut into row blocks until there are this many);
    WB_BWD: columns per column-adjoint block and backward tile (a multiple of WB); R: rows per
    backward tile; CH, warps_bwd: channels and warps per backward tile program; walk: tiles a
    backward program walks down its column block, carrying the column state from tile to tile. The
    forward saves that state every R·walk rows, so a longer walk trades time for memory (measured,
    NOTES_scan.md version 27: walk 4 on 256 x 256 x 512 saved 384 MiB at the same time; on
    217 x 387 x 256 it saved 256 MiB and cost 8%)."""

    WB: int = 32
    programs: int = 1024
    WB_BWD: int = 32
    R: int = 4
    CH: int = 32
    warps_bwd: int = 2
    walk: int = 1


def default_config() -> Scan2DConfig:
    """Measured on an H100 (benchmarks/NOTES_scan.md, version 18): backward tiles on 2 warps with 32
    channels beat 4 warps on every benchmark grid (217 x 387 x 256 -3%, the MIL grid -5%,
    256 x 256 x 512 -9%), although they spill a little: the 4-warp tile's cross-warp state sums and
    2 programs a SM left it waiting; 32 channels halve the dB/dC partials. The same for every grid
    (the interpreter takes small tiles)."""
    if interpreting():
        return Scan2DConfig(WB=4, programs=8, WB_BWD=8, R=2, CH=2, warps_bwd=1)
    return Scan2DConfig()


@triton.jit
def _block_setup(pid_d, dpg, A_ptr, bias_ptr, one, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr,
                 WB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Index vectors of a (NP, WB, BD) block (channels, B/C group, states, columns) and the
    channels' A (log2 units) and Δ bias."""
    d0 = pid_d * BD
    offs_d = (d0 + tl.arange(0, BD))[None, None, :]
    nidx = tl.arange(0, NP)[:, None, None]
    nmask = nidx < N
    A2 = tl.load(A_ptr + offs_d * N + nidx * one, mask=nmask, other=0.0) * 1.4426950408889634
    bias = tl.load(bias_ptr + offs_d) if HAS_BIAS else 0.0
    return offs_d, d0 // dpg, nidx, nmask, tl.arange(0, WB)[None, :, None], A2, bias


@triton.jit
def _row_inputs(u_ptr, dl_ptr, mask_ptr, xoff, moff, cm, bias, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Δ (zero on masked cells and beyond the width) and u of one row of a column block, as float32.
    The forward kernels read inputs padded to the mask's width, so one column mask serves every
    load (a second mask for unpadded inputs cost the forward kernel registers it does not have: at
    255 it was 1.5x slower)."""
    valid = cm
    if HAS_MASK:
        mk = tl.load(mask_ptr + moff, mask=cm, other=0)
        valid = valid & (mk != 0)
    raw = tl.load(dl_ptr + xoff, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + xoff, mask=cm, other=0.0).to(tl.float32)
    return tl.where(valid, delta_act(raw, bias, SOFTPLUS), 0.0), u


@triton.jit
def _row_scan(dt, dtu, A2, Hl, B_ptr, boff, cm, sel, first):
    """For state `sel`: the decay a and the row state r across the block's columns, starting from
    the row carry Hl entering the block."""
    An = tl.sum(tl.where(sel, A2, 0.0), axis=0, keep_dims=True)
    Hn = tl.sum(tl.where(sel, Hl, 0.0), axis=0, keep_dims=True)
    Bn = tl.load(B_ptr + boff, mask=cm, other=0.0).to(tl.float32)
    a = tl.exp2(dt * An)
    x = dtu * Bn + tl.where(first, a * Hn, 0.0)
    _, r = tl.associative_scan((a, x), axis=1, combine_fn=lin_combine)
    return a, r


@triton.jit(do_not_specialize=["one", "sd"])
def _row_carry_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, bias_ptr, mask_ptr, rowc_ptr,
    sb, sd, sh, sw,
    DIM, dpg, G, H, W, n_cb, one,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, WB: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr,
):
    # One warp: one row, BD channels, walking the column blocks left to right in `_fwd_kernel`'s
    # layout; stores the row state entering every block (channel-last) and carries the state
    # leaving each block (its last column, gathered across the lanes) into the next.
    pid_d = tl.program_id(0)
    i = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d, g, nidx, nmask, tr, A2, bias = _block_setup(pid_d, dpg, A_ptr, bias_ptr, one, N, NP, BD, WB, HAS_BIAS)
    first = tr == 0
    lastc = tr == WB - 1
    zero_d = offs_d * 0
    bc_row = (pid_b * G + g) * N * H * W + i * W
    Hl = tl.zeros((NP, 1, BD), dtype=tl.float32)
    for cb in range(n_cb):
        tl.store(rowc_ptr + (((pid_b * H + i) * n_cb + cb) * N + nidx) * DIM + offs_d * one, Hl, mask=nmask)
        col = cb * WB + tr
        cm = col < W
        dt, u = _row_inputs(u_ptr, dl_ptr, mask_ptr, pid_b * sb + offs_d * sd + i * sh + col * sw,
                            (pid_b * H + i) * W + col + zero_d, cm, bias, SOFTPLUS, HAS_MASK)
        dtu = dt * u
        for n in tl.static_range(N):
            sel = nidx == n
            _, r = _row_scan(dt, dtu, A2, Hl, B_ptr, bc_row + n * H * W + col + zero_d, cm, sel, first)
            Hl = tl.where(sel, tl.sum(tl.where(lastc, r, 0.0), axis=1, keep_dims=True), Hl)


@triton.jit(do_not_specialize=["one", "sd"])
def _fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, mask_ptr,
    rowc_ptr, top_ptr, out_ptr, S_ptr, agg_ptr, htop_ptr,
    sb, sd, sh, sw,
    DIM, dpg, G, H, W, n_cb, n_sv, save_rows, RH, n_rs, one,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, WB: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_MASK: tl.constexpr, SUMMARY: tl.constexpr, HAS_TOP: tl.constexpr, SAVE: tl.constexpr,
):
    # One warp: BD channels x WB columns (one column block), RH rows, top to bottom. Values are
    # (NP, WB, BD) tensors: a thread holds 4 adjacent columns (one aligned 16-byte load; the wrapper
    # pads the width to a multiple of 16) of one channel and all NP states, the lanes span the
    # columns and the channels. So y = C.h sums in the thread, the column step is in the thread,
    # and the row scan is 4 steps in the thread plus a few shuffles across the lanes of a row.
    # States are unrolled; their offsets are multiplied by `one` (never specialised) and the
    # channel stride is not specialised, so the compiler keeps them off the lanes.
    # SUMMARY: no output; the column state left at the block's bottom from a zero top, and ΣΔ per
    # column, for the column carries between row blocks. Otherwise the top carry comes from `top`
    # (chained summaries) and, with SAVE, the column state entering every `save_rows`-th row is stored.
    pid_d = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rb = pid_t // n_cb
    cb = pid_t % n_cb
    offs_d, g, nidx, nmask, tr, A2, bias = _block_setup(pid_d, dpg, A_ptr, bias_ptr, one, N, NP, BD, WB, HAS_BIAS)
    first = tr == 0
    zero_d = offs_d * 0
    Dv = tl.load(D_ptr + offs_d) if HAS_D else 0.0
    seq = pid_b * DIM + offs_d
    row0 = rb * RH
    n_rows = tl.minimum(RH, H - row0)
    bc_base = (pid_b * G + g) * N * H * W
    col = cb * WB + tr
    cm = col < W
    cidx = (seq * W + col) * n_rs + rb
    if HAS_TOP:
        V = tl.load(top_ptr + cidx * N + nidx * one, mask=nmask & cm, other=0.0)
    else:
        V = tl.zeros((NP, WB, BD), dtype=tl.float32)
    colsum = tl.zeros((1, WB, BD), dtype=tl.float32)
    for ii in range(n_rows):
        i = row0 + ii
        if SAVE:
            sptr = htop_ptr + ((seq * n_sv + i // save_rows) * N + nidx * one) * W + col
            tl.store(sptr, V, mask=nmask & cm & (i % save_rows == 0))
        xoff = pid_b * sb + offs_d * sd + i * sh + col * sw
        dt, u = _row_inputs(u_ptr, dl_ptr, mask_ptr, xoff, (pid_b * H + i) * W + col + zero_d, cm, bias, SOFTPLUS,
                            HAS_MASK)
        colsum += dt
        dtu = dt * u
        Hl = tl.load(rowc_ptr + (((pid_b * H + i) * n_cb + cb) * N + nidx) * DIM + offs_d * one, mask=nmask, other=0.0)
        y = tl.zeros((1, WB, BD), dtype=tl.float32)
        for n in tl.static_range(N):
            sel = nidx == n
            boff = bc_base + n * H * W + i * W + col + zero_d
            a, r = _row_scan(dt, dtu, A2, Hl, B_ptr, boff, cm, sel, first)
            Vn = a * tl.sum(tl.where(sel, V, 0.0), axis=0, keep_dims=True) + r
            V = tl.where(sel, Vn, V)
            if not SUMMARY:
                Cn = tl.load(C_ptr + boff, mask=cm, other=0.0).to(tl.float32)
                y += Cn * Vn
        if not SUMMARY:
            store_gated(out_ptr, xoff, y, u, Dv, z_ptr, cm, HAS_D, HAS_Z)
    if SUMMARY:
        tl.store(S_ptr + cidx, colsum, mask=cm)
        tl.store(agg_ptr + cidx * N + nidx * one, V, mask=nmask & cm)


@triton.jit(do_not_specialize=["one"])
def _vrev_kernel(
    dout_ptr, dl_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, mask_ptr,
    gbot_ptr, S_ptr, agg_ptr,
    DIM, dpg, G, H, W, WR, n_cb, n_rb, one,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, WB: tl.constexpr, R: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MASK: tl.constexpr,
):
    # The column adjoint, in `_fwd_kernel`'s layout: one warp per (BD channels, column block) walks
    # the rows bottom to top with the carry a[i+1] gh[i+1] of its columns in registers, stores it
    # at the bottom row of every R-row tile, and summarises each row's adjoint over the block
    # (ΣΔ and Σ_j exp(A Σ_{k<=j} Δ_k) gh_j) for the row-adjoint chain.
    pid_d = tl.program_id(0)
    cb = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d, g, nidx, nmask, tr, A2, bias = _block_setup(pid_d, dpg, A_ptr, bias_ptr, one, N, NP, BD, WB, HAS_BIAS)
    zero_d = offs_d * 0
    seq = pid_b * DIM + offs_d
    col = cb * WB + tr
    cm = col < W
    cx = col < WR
    bc_base = (pid_b * G + g) * N * H * W
    Wv = tl.zeros((NP, WB, BD), dtype=tl.float32)
    # The next row's inputs are loaded before this row is worked on, so their latency hides behind
    # it (measured: forward+backward -1% on 217 x 387 x 256, -3% on the MIL grid). Row H-1-k sits k
    # rows above the bottom row's offsets.
    xlast = (seq * H + H - 1) * WR + col
    mlast = (pid_b * H + H - 1) * W + col + zero_d
    raw_next = tl.load(dl_ptr + xlast, mask=cx, other=0.0)
    dout_next = tl.load(dout_ptr + xlast, mask=cx, other=0.0)
    if HAS_Z:
        z_next = tl.load(z_ptr + xlast, mask=cx, other=0.0)
    if HAS_MASK:
        mask_next = tl.load(mask_ptr + mlast, mask=cm, other=0)
    for k in range(H):
        i = H - 1 - k
        block_end = (i % R == R - 1) | (i == H - 1)
        gptr = gbot_ptr + ((seq * n_rb + i // R) * N + nidx * one) * W + col
        tl.store(gptr, Wv, mask=nmask & cm & block_end)
        valid = cx
        if HAS_MASK:
            valid = valid & (mask_next != 0)
        dt = tl.where(valid, delta_act(raw_next.to(tl.float32), bias, SOFTPLUS), 0.0)
        dy = dout_next.to(tl.float32)
        if HAS_Z:
            zz = z_next.to(tl.float32)
            dy = dy * zz * tl.sigmoid(zz)
        next_in = cx & (i > 0)
        raw_next = tl.load(dl_ptr + xlast - (k + 1) * WR, mask=next_in, other=0.0)
        dout_next = tl.load(dout_ptr + xlast - (k + 1) * WR, mask=next_in, other=0.0)
        if HAS_Z:
            z_next = tl.load(z_ptr + xlast - (k + 1) * WR, mask=next_in, other=0.0)
        if HAS_MASK:
            mask_next = tl.load(mask_ptr + mlast - (k + 1) * W, mask=cm & (i > 0), other=0)
        cs = tl.cumsum(dt, axis=1)
        wagg = tl.zeros((NP, 1, BD), dtype=tl.float32)
        for n in tl.static_range(N):
            sel = nidx == n
            An = tl.sum(tl.where(sel, A2, 0.0), axis=0, keep_dims=True)
            Cn = tl.load(C_ptr + bc_base + n * H * W + i * W + col + zero_d, mask=cm, other=0.0).to(tl.float32)
            gh = dy * Cn + tl.sum(tl.where(sel, Wv, 0.0), axis=0, keep_dims=True)
            Wv = tl.where(sel, tl.exp2(dt * An) * gh, Wv)
            wagg = tl.where(sel, tl.sum(tl.exp2(An * cs) * gh, axis=1, keep_dims=True), wagg)
        row = seq * H + i
        tl.store(S_ptr + row * n_cb + cb, tl.sum(dt, axis=1, keep_dims=True))
        tl.store(agg_ptr + (row * n_cb + cb) * N + nidx * one, wagg, mask=nmask)


@triton.jit
def _mirror(x):
    """An (states, rows, columns) tile with its rows and columns reversed."""
    return tl.flip(tl.flip(x, 2), 1)


@triton.jit
def _bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, mask_ptr, dout_ptr,
    hrl_ptr, htop_ptr, gbot_ptr, ghr_ptr,
    du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, par_ptr,
    DIM, dpg, G, H, W, WR, n_cb, n_rb, n_sv, n_chblk, n_cbf, cbf_step,
    N: tl.constexpr, NP: tl.constexpr, WB: tl.constexpr, R: tl.constexpr, CH: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_MASK: tl.constexpr, WALK: tl.constexpr,
):
    # One program: CH channels, column block cb, the WALK tiles sv*WALK ... from the top (unrolled:
    # a loop over tiles made ptxas spill twice as much). Each tile but the last leaves its bottom
    # row's column state, per channel, in the column-adjoint slot (gbot) it has read, where the next
    # tile finds its top carry; a barrier after that read and one after the tile order the slot's
    # reuse across the program's threads.
    pid_c = tl.program_id(0)
    pid_w = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    sv = pid_w // n_cb
    cb = pid_w % n_cb
    cols = cb * WB + tl.arange(0, WB)
    cm = cols < W
    cx = cols < WR
    # The adjoint scans run right to left and bottom to top. They run as forward scans on the tile
    # mirrored (both axes reversed: row R-1-i, column WB-1-j at index (i, j)), whose inputs are
    # loaded mirrored and whose results are mirrored back (`_mirror`): Triton lowers
    # `associative_scan(..., reverse=True)` on this tile with 352-416 shuffles where the forward scan
    # takes 32-96, and the flips cost less than the difference (217 x 387 x 256 f+b -2%).
    mcols = cb * WB + (WB - 1) - tl.arange(0, WB)
    offs_n = tl.arange(0, NP)
    nm = offs_n < N
    g = (pid_c * CH) // dpg
    first_row = (tl.arange(0, R) == 0)[None, :, None]
    last_row = (tl.arange(0, R) == R - 1)[None, :, None]
    first_col = (tl.arange(0, WB) == 0)[None, None, :]
    for k in tl.static_range(WALK):
        rb = sv * WALK + k
        if rb < n_rb:
            rows = rb * R + tl.arange(0, R)
            rm = rows < H
            inside = rm[:, None] & cm[None, :]  # B, C, the saved states and the partials: padded width W
            in_x = rm[:, None] & cx[None, :]  # u, delta, z, dout and their gradients: their own width WR
            cell = rows[:, None] * W + cols[None, :]
            xcell = rows[:, None] * WR + cols[None, :]
            mrows = rb * R + (R - 1) - tl.arange(0, R)
            m_down_in = (mrows + 1 < H)[:, None] & (mcols < WR)[None, :]
            m_right_in = (mrows < H)[:, None] & (mcols + 1 < WR)[None, :]
            mcell = mrows[:, None] * W + mcols[None, :]
            mxcell = mrows[:, None] * WR + mcols[None, :]
            valid = in_x
            valid_dn = m_down_in
            valid_rt = m_right_in
            if HAS_MASK:
                mbase = mask_ptr + pid_b * H * W
                valid = valid & (tl.load(mbase + cell, mask=in_x, other=0) != 0)
                valid_dn = valid_dn & (tl.load(mbase + mcell + W, mask=m_down_in, other=0) != 0)
                valid_rt = valid_rt & (tl.load(mbase + mcell + 1, mask=m_right_in, other=0) != 0)
            bc_off = ((pid_b * G + g) * N + offs_n[:, None, None]) * H * W + cell[None, :, :]
            bc_mask = nm[:, None, None] & inside[None, :, :]
            Bt = tl.load(B_ptr + bc_off, mask=bc_mask, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc_off, mask=bc_mask, other=0.0).to(tl.float32)
            dB_acc = tl.zeros((NP, R, WB), dtype=tl.float32)
            dC_acc = tl.zeros((NP, R, WB), dtype=tl.float32)
            # this tile's row of parameter partials: dA (DIM, N), then dD (DIM), then dbias (DIM)
            par_row = par_ptr + ((pid_b * n_rb + rb) * n_cb + cb) * (DIM * (N + 2))
            for dd in range(CH):
                d = pid_c * CH + dd
                An = tl.load(A_ptr + d * N + offs_n, mask=nm, other=0.0)
                A2 = (An * 1.4426950408889634)[:, None, None]
                bias = tl.load(bias_ptr + d) if HAS_BIAS else 0.0
                seq = pid_b * DIM + d
                xoff = seq * H * WR + xcell
                raw = tl.load(dl_ptr + xoff, mask=in_x, other=0.0).to(tl.float32)
                dt = tl.where(valid, delta_act(raw, bias, SOFTPLUS), 0.0)
                mxoff = seq * H * WR + mxcell
                raw_dn = tl.load(dl_ptr + mxoff + WR, mask=m_down_in, other=0.0).to(tl.float32)
                dt_dn = tl.where(valid_dn, delta_act(raw_dn, bias, SOFTPLUS), 0.0)
                raw_rt = tl.load(dl_ptr + mxoff + 1, mask=m_right_in, other=0.0).to(tl.float32)
                dt_rt = tl.where(valid_rt, delta_act(raw_rt, bias, SOFTPLUS), 0.0)
                u = tl.load(u_ptr + xoff, mask=in_x, other=0.0).to(tl.float32)
                dout = tl.load(dout_ptr + xoff, mask=in_x, other=0.0).to(tl.float32)
                dtu = dt * u
                dA = tl.exp2(dt[None, :, :] * A2)
                x = dtu[None, :, :] * Bt
                # recompute the row states r and the column states h of the tile
                hl_idx = (((pid_b * H + rows[None, :]) * n_cbf + cb * cbf_step) * N + offs_n[:, None]) * DIM + d
                hl = tl.load(hrl_ptr + hl_idx, mask=nm[:, None] & rm[None, :], other=0.0)
                ap, bp = tl.associative_scan((dA, x), axis=2, combine_fn=lin_combine)
                hr = ap * hl[:, :, None] + bp
                slot = ((seq * n_rb + rb) * N + offs_n[:, None]) * W  # this tile's column-adjoint slot
                slot_mask = nm[:, None] & cm[None, :]
                if k == 0:
                    ht = tl.load(htop_ptr + ((seq * n_sv + sv) * N + offs_n[:, None]) * W + cols[None, :],
                                 mask=slot_mask, other=0.0)
                else:  # the slot of the tile above holds its bottom row's column state
                    ht = tl.load(gbot_ptr + slot - N * W + cols[None, :], mask=slot_mask, other=0.0)
                ap2, bp2 = tl.associative_scan((dA, hr), axis=1, combine_fn=lin_combine)
                h = ap2 * ht[:, None, :] + bp2
                y = tl.sum(Ct * h, axis=0)
                if HAS_D:
                    Dv = tl.load(D_ptr + d)
                    y += Dv * u
                if HAS_Z:
                    zz = tl.load(z_ptr + xoff, mask=in_x, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(zz)
                    dy = dout * zz * sz
                    tl.store(dz_ptr + xoff, dout * y * sz * (1.0 + zz * (1.0 - sz)), mask=in_x)
                else:
                    dy = dout
                # adjoint of the column pass, then of the row pass, on the mirrored tile (the decay of the
                # first mirrored row / column is never used by the scan)
                gb = tl.load(gbot_ptr + slot + mcols[None, :], mask=nm[:, None] & (mcols < W)[None, :], other=0.0)
                c1 = _mirror(dy[None, :, :] * Ct) + tl.where(first_row, gb[:, None, :], 0.0)
                if k < WALK - 1:
                    # the bottom row's column state, for the next tile: each thread stores its own cells
                    # of that row, once every thread has read the slot
                    tl.debug_barrier()
                    tl.store(gbot_ptr + (slot + cols[None, :])[:, None, :] + 0 * rows[None, :, None], h,
                             mask=slot_mask[:, None, :] & last_row)
                _, gh = tl.associative_scan((tl.exp2(dt_dn[None, :, :] * A2), c1), axis=1, combine_fn=lin_combine)
                gr = tl.load(ghr_ptr + ((seq * H + mrows[None, :]) * n_cb + cb) * N + offs_n[:, None],
                             mask=nm[:, None] & (mrows < H)[None, :], other=0.0)
                c2 = gh + tl.where(first_col, gr[:, :, None], 0.0)
                _, ghr = tl.associative_scan((tl.exp2(dt_rt[None, :, :] * A2), c2), axis=2, combine_fn=lin_combine)
                gh = _mirror(gh)
                ghr = _mirror(ghr)
                # q = a * dL/da: the decay feeds both passes
                q = gh * (h - hr) + ghr * (hr - x)
                dB_acc += ghr * dtu[None, :, :]
                dC_acc += dy[None, :, :] * h
                gB = tl.sum(ghr * Bt, axis=0)
                qA = tl.sum(q * An[:, None, None], axis=0)
                tl.store(par_row + d * N + offs_n, tl.sum(tl.sum(q * dt[None, :, :], axis=2), axis=1), mask=nm)
                du = dt * gB
                if HAS_D:
                    du += Dv * dy
                    tl.store(par_row + DIM * N + d, tl.sum(tl.sum(dy * u, axis=1), axis=0))
                ddt = tl.where(valid, u * gB + qA, 0.0) * delta_act_grad(raw, bias, SOFTPLUS)
                if HAS_BIAS:
                    tl.store(par_row + DIM * (N + 1) + d, tl.sum(tl.sum(ddt, axis=1), axis=0))
                tl.store(du_ptr + xoff, du, mask=in_x)
                tl.store(ddl_ptr + xoff, ddt, mask=in_x)
            poff = ((pid_b * n_chblk + pid_c) * N + offs_n[:, None, None]) * H * W + cell[None, :, :]
            tl.store(dBp_ptr + poff, dB_acc, mask=bc_mask)
            tl.store(dCp_ptr + poff, dC_acc, mask=bc_mask)
            if k < WALK - 1:
                tl.debug_barrier()


def _row_carries(u, delta, A32, Bg, bias32, softplus, mask8, cfg):
    """The row state entering every column block of every row, channel-last: (batch, H, n_cb, N, dim)."""
    batch, dim, H, W = u.shape
    G, N = Bg.shape[1], A32.shape[1]
    dpg = dim // G
    BD = largest_pow2_divisor(dpg, max(1, 128 // cfg.WB))
    n_cb = cdiv(W, cfg.WB)
    rowc = torch.empty(batch, H, n_cb, N, dim, device=u.device, dtype=torch.float32)
    dummy = A32
    launch(_row_carry_kernel, (dim // BD, H, batch),
        u, delta, A32, Bg, bias32 if bias32 is not None else dummy, mask8 if mask8 is not None else dummy, rowc,
        *u.stride(),
        dim, dpg, G, H, W, n_cb, 1,
        N=N, NP=pow2(N), BD=BD, WB=cfg.WB,
        HAS_BIAS=bias32 is not None, SOFTPLUS=softplus, HAS_MASK=mask8 is not None,
        num_warps=1,
    )
    return rowc


def _row_blocks(batch: int, n_dblk: int, n_cb: int, H: int, cfg: Scan2DConfig) -> tuple[int, int]:
    """(rows per block, blocks): the grid is cut into row blocks until there are about
    `cfg.programs` programs, but only into 4 or more (measured: a split into 2 or 3 costs its
    summary pass and gains too little parallelism); a block is a whole number of R rows."""
    want = max(1, min(cdiv(H, cfg.R), cfg.programs // max(1, batch * n_dblk * n_cb)))
    if want < 4:
        return H, 1
    rows = cdiv(cdiv(H, want), cfg.R) * cfg.R
    return rows, cdiv(H, rows)


@dataclasses.dataclass(frozen=True)
class _BackwardGrid:
    """How the backward tile kernel covers a grid. Worked out once in the forward, which saves the
    column states the walks start from, and kept for the backward."""

    CH: int  # channels a program
    n_chblk: int  # channel blocks
    n_cb: int  # column blocks (WB_BWD wide)
    n_rb: int  # tiles down a column block (R rows each)
    walk: int  # tiles a program walks
    n_sv: int  # programs down a column block, and column states saved for each

    @staticmethod
    def of(dim: int, dpg: int, H: int, W: int, cfg: Scan2DConfig) -> _BackwardGrid:
        CH = largest_pow2_divisor(dpg, cfg.CH)
        n_chblk, n_cb, n_rb = dim // CH, cdiv(W, cfg.WB_BWD), cdiv(H, cfg.R)
        walk = max(1, min(cfg.walk, n_rb))
        return _BackwardGrid(CH, n_chblk, n_cb, n_rb, walk, cdiv(n_rb, walk))


def _forward(u, delta, A32, Bg, Cg, D32, z, bias32, softplus, mask8, grid, cfg):
    """y, and with the backward's `grid` (None: no backward to come) the row carries and the column
    state entering every R·walk-th row for it."""
    batch, dim, H, W = u.shape
    G, N = Bg.shape[1], A32.shape[1]
    dpg = dim // G
    BD = largest_pow2_divisor(dpg, max(1, 128 // cfg.WB))
    n_cb = cdiv(W, cfg.WB)
    RH, n_rs = _row_blocks(batch, dim // BD, n_cb, H, cfg)
    n_sv, walk = (grid.n_sv, grid.walk) if grid else (1, 1)
    f32 = dict(device=u.device, dtype=torch.float32)
    dummy = A32
    rowc = _row_carries(u, delta, A32, Bg, bias32, softplus, mask8, cfg)

    def sweep(top, out, S, agg, htop, summary):
        launch(_fwd_kernel, (dim // BD, n_rs * n_cb, batch),
            u, delta, A32, Bg, Cg, D32 if D32 is not None else dummy, z if z is not None else dummy,
            bias32 if bias32 is not None else dummy, mask8 if mask8 is not None else dummy,
            rowc, top, out, S, agg, htop,
            *u.stride(),
            dim, dpg, G, H, W, n_cb, n_sv, cfg.R * walk, RH, n_rs, 1,
            N=N, NP=pow2(N), BD=BD, WB=cfg.WB,
            HAS_D=D32 is not None, HAS_Z=z is not None, HAS_BIAS=bias32 is not None, SOFTPLUS=softplus,
            HAS_MASK=mask8 is not None, SUMMARY=summary, HAS_TOP=top is not dummy, SAVE=htop is not dummy,
            num_warps=1,
        )

    top = dummy
    if n_rs > 1:
        S = torch.empty(batch * dim * W, n_rs, **f32)
        agg = torch.empty(batch * dim * W, n_rs, N, **f32)
        sweep(dummy, dummy, S, agg, dummy, summary=True)
        top, _ = chain_segments(S, agg, A32, W, dim, reverse=False)
        del S, agg
    out = torch.empty_like(u)
    htop = torch.empty(batch * dim, n_sv, N, W, **f32) if grid else dummy
    sweep(top, out, dummy, dummy, htop, summary=False)
    return out, (rowc if grid else None), (htop if grid else None)


def _backward(dout, u, delta, A32, Bg, Cg, D32, z, bias32, softplus, mask8, hrl, htop, grid, cfg):
    """dout, u, delta and z (and du, ddelta, dz) at their own width WR, contiguous; B, C, the mask, the
    saved states and dB, dC (stacked, (2, batch, G, N, H, W)) at the forward's padded width W."""
    batch, dim, H, W = Bg.shape[0], u.shape[1], *Bg.shape[-2:]
    WR = u.shape[-1]
    G, N = Bg.shape[1], A32.shape[1]
    dpg = dim // G
    NP = pow2(N)
    n_cb, n_rb = grid.n_cb, grid.n_rb
    f32 = dict(device=u.device, dtype=torch.float32)
    dummy = A32
    zt = z if z is not None else dummy
    bt = bias32 if bias32 is not None else dummy
    mt = mask8 if mask8 is not None else dummy
    flags = dict(HAS_Z=z is not None, HAS_BIAS=bias32 is not None, SOFTPLUS=softplus, HAS_MASK=mask8 is not None)
    BD = largest_pow2_divisor(dpg, max(1, 128 // cfg.WB_BWD))
    gbot = torch.empty(batch * dim, n_rb, N, W, **f32)
    S = torch.empty(batch * dim * H, n_cb, **f32)
    agg = torch.empty(batch * dim * H, n_cb, N, **f32)
    launch(_vrev_kernel, (dim // BD, n_cb, batch),
        dout, delta, A32, Cg, zt, bt, mt,
        gbot, S, agg,
        dim, dpg, G, H, W, WR, n_cb, n_rb, 1,
        N=N, NP=NP, BD=BD, WB=cfg.WB_BWD, R=cfg.R, **flags,
        num_warps=1,
    )
    ghr, _ = chain_segments(S, agg, A32, H, dim, reverse=True)
    del S, agg
    n_chblk = grid.n_chblk
    n_tiles = n_rb * n_cb
    du = torch.empty_like(u)
    ddl = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else dummy
    # one buffer each for the (B, C) partials and the per-tile parameter partials, so each is summed
    # by one reduction
    dBCp = torch.empty(2, batch, n_chblk, N, H, W, **f32)
    par = torch.empty(batch * n_tiles, dim * (N + 2), **f32)
    launch(_bwd_kernel, (n_chblk, grid.n_sv * n_cb, batch),
        u, delta, A32, Bg, Cg, D32 if D32 is not None else dummy, zt, bt, mt, dout,
        hrl, htop, gbot, ghr,
        du, ddl, dz, dBCp[0], dBCp[1], par,
        dim, dpg, G, H, W, WR, n_cb, n_rb, grid.n_sv, n_chblk, cdiv(W, cfg.WB), cfg.WB_BWD // cfg.WB,
        N=N, NP=NP, WB=cfg.WB_BWD, R=cfg.R, CH=grid.CH, HAS_D=D32 is not None, **flags, WALK=grid.walk,
        num_warps=cfg.warps_bwd,
    )
    dBC = dBCp.view(2, batch, G, n_chblk // G, N, H, W).sum(3)
    dA, dD, db = par.sum(0).split([dim * N, dim, dim])
    return (
        du, ddl, dA.view(dim, N), dBC,
        dD if D32 is not None else None,
        dz if z is not None else None,
        db if bias32 is not None else None,
    )


def _pad_width(t: Tensor, pad: int) -> Tensor:
    """t contiguous, with `pad` zero (False) columns added on the right. Only the new columns are
    zeroed (`F.pad` fills the whole copy first: a third of the forward's padding time)."""
    if not pad:
        return t.contiguous()
    padded = t.new_empty(*t.shape[:-1], t.shape[-1] + pad)
    padded[..., : t.shape[-1]] = t
    padded[..., t.shape[-1]:] = 0
    return padded


class _SelectiveScan2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, mask, cfg):
        # Zero columns on the right change no real cell (the row pass runs left to right and each
        # column's pass stays in its column) and make every row start 16-element aligned. The
        # forward kernels read padded copies of u, delta and z; the backward reads them at their own
        # width (masked loads), so only the unpadded tensors are saved (the copies cost the backward
        # ~0.45 ms and ~350 MiB on 217 x 387 x 256).
        pad = -u.shape[-1] % 16
        uc, dc = u.contiguous(), delta.contiguous()
        zc = z.contiguous() if z is not None else None
        Bg = _pad_width(B.unsqueeze(1) if B.dim() == u.dim() else B, pad)
        Cg = _pad_width(C.unsqueeze(1) if C.dim() == u.dim() else C, pad)
        mask = _pad_width(mask, pad) if mask is not None else None
        A32, D32 = as_f32(A, u), (as_f32(D, u) if D is not None else None)
        b32 = as_f32(delta_bias, u) if delta_bias is not None else None
        mask8 = mask.view(torch.uint8) if mask is not None else None  # contiguous already
        cfg = cfg or default_config()
        save = any(ctx.needs_input_grad[:8])
        grid = _BackwardGrid.of(u.shape[1], u.shape[1] // Bg.shape[1], *Bg.shape[-2:], cfg) if save else None
        out, hrl, htop = _forward(_pad_width(uc, pad), _pad_width(dc, pad), A32, Bg, Cg, D32,
                                  _pad_width(zc, pad) if zc is not None else None, b32, delta_softplus, mask8, grid,
                                  cfg)
        if save:
            ctx.save_for_backward(uc, dc, A32, Bg, Cg, D32, zc, b32, mask8, hrl, htop)
            dtypes = tuple(t.dtype if t is not None else None for t in (A, B, C, D, delta_bias))
            ctx.meta = (delta_softplus, cfg, grid, B.dim() != u.dim(), dtypes)
        ctx.pad = pad
        return out[..., : u.shape[-1]] if pad else out

    @staticmethod
    def backward(ctx, dout):
        uc, dc, A32, Bg, Cg, D32, zc, b32, mask8, hrl, htop = ctx.saved_tensors
        softplus, cfg, grid, was_grouped, dtypes = ctx.meta
        pad = ctx.pad
        du, ddl, dA, dBC, dD, dz, db = _backward(
            dout.contiguous(), uc, dc, A32, Bg, Cg, D32, zc, b32, softplus, mask8, hrl, htop, grid, cfg,
        )
        dA, dB, dC, dD, db = parameter_grads(dtypes, was_grouped, dA, dBC[..., :-pad] if pad else dBC, dD, db)
        return du, ddl, dA, dB, dC, dD, dz, db, None, None, None


def selective_scan_2d_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    mask: Tensor | None = None,
    config: Scan2DConfig | None = None,
) -> Tensor:
    """`selective_scan_2d` on the Triton kernels: same arguments, result and gradients as the
    reference (float32 state and accumulation; out in u's dtype)."""
    check_device(u)
    return _SelectiveScan2D.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, mask, config)
