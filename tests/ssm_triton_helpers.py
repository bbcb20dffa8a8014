"""Runs the Triton scan kernels under Triton's CPU interpreter and reports their errors as JSON.

`tests/test_ssm_triton.py` starts this file in a subprocess with TRITON_INTERPRET=1 set before Triton
is imported (the variable is read at import time, so it cannot be switched on inside a pytest process
that may already have imported Triton). Each case draws random inputs, runs the kernels forward and
backward on tiny shapes, and compares with the float64 reference backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

CASE_NAMES = (
    "1d_grouped_all_options", "1d_plain_segments", "1d_length_one", "1d_bare", "1d_bf16", "1d_fp16", "1d_bf16_tile16",
    "1d_dispatch", "1d_reverse_all_options", "1d_reverse_bf16_tile16", "1d_strided_bc_reverse", "2d_mask_nonsquare", "2d_grouped", "2d_single_cell", "2d_aligned_width", "2d_padding_ignored", "2d_bare", "2d_walk_memory",
    "dwconv_3x3", "dwconv_5x5_bf16", "dwconv1d_causal", "dwconv1d_reverse", "dwconv1d_reverse_bf16",
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def scan_inputs(gen, batch, dim, spatial, n_state, groups, grouped, dtype=torch.float32):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    bc_shape = (batch, groups, n_state, *spatial) if grouped else (batch, n_state, *spatial)
    return dict(
        u=rnd(batch, dim, *spatial), delta=rnd(batch, dim, *spatial, scale=0.5),
        A=-torch.rand(dim, n_state, generator=gen) * 2 - 0.1, B=rnd(*bc_shape), C=rnd(*bc_shape),
        D=torch.randn(dim, generator=gen), z=rnd(batch, dim, *spatial),
        delta_bias=torch.randn(dim, generator=gen) * 0.3,
    )


def compare(fn, ref, inputs):
    """Relative errors of the output (and last state) and of every input's gradient (the loss weights
    are seeded too, so a case gives the same errors on every run)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None and v.is_floating_point()}
    args = {k: leaves.get(k, v) for k, v in inputs.items()}
    ref_args = {k: (v.detach().double().requires_grad_(True) if k in leaves else v) for k, v in args.items()}
    got, want = fn(**args), ref(**ref_args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    gen = torch.Generator().manual_seed(1234)
    weights = [torch.randn(g.shape, dtype=torch.float64, generator=gen) for g in got]
    loss_got = sum((g.double() * w).sum() for g, w in zip(got, weights, strict=True))
    loss_want = sum((g * w).sum() for g, w in zip(want, weights, strict=True))
    grads_got = torch.autograd.grad(loss_got, list(leaves.values()))
    grads_want = torch.autograd.grad(loss_want, [ref_args[k] for k in leaves])
    out = {f"out{i}": rel(g, w) for i, (g, w) in enumerate(zip(got, want, strict=True))}
    out.update({f"d{k}": rel(a, b) for k, a, b in zip(leaves, grads_got, grads_want, strict=True)})
    out["dtypes_ok"] = all(g.dtype == leaves[k].dtype for k, g in zip(leaves, grads_got, strict=True))
    return out


def dwconv_case(gen, shape: tuple[int, ...], kernel: int, dtype: torch.dtype, reverse: bool = False) -> dict:
    """The fused depthwise conv + SiLU against PyTorch's conv and SiLU in float64: output and gradients.
    Planes (B, C, H, W) get the "same" K×K conv; sequences (B, C, L) Mamba's causal conv, or with `reverse`
    the conv of a walk from the end (PyTorch: the sequence flipped in and out)."""
    import torch.nn.functional as F

    from mambascope.ssm.triton_dwconv import depthwise_conv_silu_triton

    channels, planes = shape[1], len(shape) == 4
    x = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(channels, 1, *(kernel,) * (2 if planes else 1), generator=gen) * 0.3
    b = torch.randn(channels, generator=gen)
    dy = torch.randn(shape, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = depthwise_conv_silu_triton(*leaves, reverse=reverse)
    out.backward(dy)
    wide = [t.double().requires_grad_() for t in (x, w, b)]
    if planes:
        ref = F.silu(F.conv2d(wide[0], wide[1], wide[2], padding=kernel // 2, groups=channels))
    else:
        seq = wide[0].flip(-1) if reverse else wide[0]
        ref = F.silu(F.conv1d(seq, wide[1], wide[2], padding=kernel - 1, groups=channels)[..., : shape[-1]])
        ref = ref.flip(-1) if reverse else ref
    ref.backward(dy.double())
    result = {"out0": rel(out, ref)}
    result.update({key: rel(leaf.grad, w64.grad) for key, leaf, w64 in zip(("dx", "dw", "db"), leaves, wide, strict=True)})
    result["dtypes_ok"] = out.dtype == dtype and all(t.grad.dtype == t.dtype for t in leaves)
    return result


def run_case(name: str) -> dict:
    from mambascope.ssm import selective_scan, selective_scan_2d
    from mambascope.ssm.reference import selective_scan_2d_reference, selective_scan_reference
    from mambascope.ssm.triton_scan import Scan1DConfig, selective_scan_triton
    from mambascope.ssm.triton_scan2d import Scan2DConfig, selective_scan_2d_triton

    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "dwconv_3x3":  # several row and column blocks, a partial last block each way
        return dwconv_case(gen, (2, 3, 37, 70), 3, torch.float32)
    if name == "dwconv_5x5_bf16":
        return dwconv_case(gen, (1, 2, 5, 7), 5, torch.bfloat16)
    if name in ("dwconv1d_causal", "dwconv1d_reverse"):  # three 512-position blocks, the last partial
        return dwconv_case(gen, (2, 3, 1100), 4, torch.float32, reverse=name == "dwconv1d_reverse")
    if name == "dwconv1d_reverse_bf16":
        return dwconv_case(gen, (1, 2, 9), 4, torch.bfloat16, reverse=True)
    # T=4 tiles, 2 channels a program, few programs wanted: short sequences still get several tiles,
    # several segments (the summary + chain path) and several backward channel blocks.
    cfg1 = Scan1DConfig(T=4, BD=2, programs=8, warps=1, BD_BWD=2, warps_bwd=1)
    cfg2 = Scan2DConfig(WB=4, programs=32, WB_BWD=8, R=2, CH=2, warps_bwd=1, walk=2)

    def tri1(**kw):
        return selective_scan_triton(**kw, config=cfg1)

    def tri2(**kw):
        return selective_scan_2d_triton(**kw, config=cfg2)

    if name == "1d_grouped_all_options":
        x = scan_inputs(gen, 2, 4, (19,), 3, 2, True)
        return compare(lambda **k: tri1(**k, delta_softplus=True, return_last_state=True),
                       lambda **k: selective_scan_reference(**k, delta_softplus=True, return_last_state=True), x)
    if name == "1d_plain_segments":
        x = scan_inputs(gen, 1, 8, (37,), 4, 1, False)
        return compare(lambda **k: tri1(**k, delta_softplus=True),
                       lambda **k: selective_scan_reference(**k, delta_softplus=True), x)
    if name == "1d_length_one":
        x = scan_inputs(gen, 1, 2, (1,), 2, 1, False)
        return compare(lambda **k: tri1(**k, delta_softplus=True, return_last_state=True),
                       lambda **k: selective_scan_reference(**k, delta_softplus=True, return_last_state=True), x)
    if name == "1d_bare":
        x = scan_inputs(gen, 2, 2, (13,), 4, 1, False)
        x.update(D=None, z=None, delta_bias=None)
        x["delta"] = x["delta"].abs()
        return compare(tri1, selective_scan_reference, x)
    if name in ("1d_bf16", "1d_fp16"):
        dtype = torch.bfloat16 if name == "1d_bf16" else torch.float16
        x = scan_inputs(gen, 1, 4, (21,), 4, 2, True, dtype=dtype)
        return compare(lambda **k: tri1(**k, delta_softplus=True),
                       lambda **k: selective_scan_reference(**k, delta_softplus=True), x)
    if name == "1d_bf16_tile16":  # the 16-position tiles 16-bit inputs get when training; padded, 3 segments
        x = scan_inputs(gen, 1, 4, (45,), 4, 1, False, dtype=torch.bfloat16)
        cfg16 = Scan1DConfig(T=16, BD=2, programs=8, warps=1, BD_BWD=2, warps_bwd=1)
        return compare(lambda **k: selective_scan_triton(**k, delta_softplus=True, config=cfg16),
                       lambda **k: selective_scan_reference(**k, delta_softplus=True), x)
    if name == "1d_reverse_all_options":  # walked from the end: padded on the left, several segments
        x = scan_inputs(gen, 2, 4, (19,), 3, 2, True)
        return compare(lambda **k: tri1(**k, delta_softplus=True, return_last_state=True, reverse=True),
                       lambda **k: selective_scan(**k, delta_softplus=True, return_last_state=True, reverse=True,
                                                  backend="reference"), x)
    if name == "1d_strided_bc_reverse":  # strided B, C (as a projection gives them) and z, read in place

        def columns_of_one_projection(B, C):
            wide = torch.cat([torch.zeros_like(B[:, :1]), B, C], dim=1).transpose(1, 2)  # (batch, L, 1 + 2N)
            n = B.shape[1]
            return wide[..., 1:1 + n].transpose(1, 2), wide[..., 1 + n:].transpose(1, 2)

        def strided(**k):
            k["B"], k["C"] = columns_of_one_projection(k["B"], k["C"])
            k["z"] = k["z"].transpose(1, 2).contiguous().transpose(1, 2)  # channel-last, as a gate can come
            assert not (k["B"].is_contiguous() or k["z"].is_contiguous())
            return tri1(**k, delta_softplus=True, return_last_state=True, reverse=True)

        x = scan_inputs(gen, 2, 4, (23,), 3, 1, False)
        return compare(strided, lambda **k: selective_scan(**k, delta_softplus=True, return_last_state=True,
                                                           reverse=True, backend="reference"), x)
    if name == "1d_reverse_bf16_tile16":  # 16-position tiles: two runs of 8 reversed a tile
        x = scan_inputs(gen, 1, 4, (45,), 4, 1, False, dtype=torch.bfloat16)
        cfg16 = Scan1DConfig(T=16, BD=2, programs=8, warps=1, BD_BWD=2, warps_bwd=1)
        return compare(lambda **k: selective_scan_triton(**k, delta_softplus=True, reverse=True, config=cfg16),
                       lambda **k: selective_scan(**k, delta_softplus=True, reverse=True, backend="reference"), x)
    if name == "1d_dispatch":
        x = scan_inputs(gen, 1, 4, (11,), 2, 1, False)
        return compare(lambda **k: selective_scan(**k, delta_softplus=True, backend="triton"),
                       lambda **k: selective_scan_reference(**k, delta_softplus=True), x)
    if name == "2d_mask_nonsquare":
        x = scan_inputs(gen, 2, 4, (5, 7), 3, 1, False)
        x["mask"] = torch.rand(2, 5, 7, generator=gen) > 0.3
        return compare(lambda **k: tri2(**k, delta_softplus=True),
                       lambda **k: selective_scan_2d_reference(**k, delta_softplus=True), x)
    if name == "2d_grouped":
        x = scan_inputs(gen, 1, 4, (3, 9), 2, 2, True)
        return compare(lambda **k: selective_scan_2d(**k, delta_softplus=True, backend="triton"),
                       lambda **k: selective_scan_2d_reference(**k, delta_softplus=True), x)
    if name == "2d_single_cell":
        x = scan_inputs(gen, 1, 2, (1, 1), 2, 1, False)
        return compare(lambda **k: tri2(**k, delta_softplus=True),
                       lambda **k: selective_scan_2d_reference(**k, delta_softplus=True), x)
    if name == "2d_aligned_width":
        # a width of 16 needs no padding columns; 4 column blocks, 4 row blocks (summary + chain)
        x = scan_inputs(gen, 1, 2, (8, 16), 3, 1, False)
        x["mask"] = torch.rand(1, 8, 16, generator=gen) > 0.2
        return compare(lambda **k: tri2(**k, delta_softplus=True),
                       lambda **k: selective_scan_2d_reference(**k, delta_softplus=True), x)
    if name == "2d_bare":
        # no D, z or Δ bias: the backward's per-tile parameter partials then hold dA alone
        x = scan_inputs(gen, 2, 4, (3, 6), 3, 1, False)
        for k in ("D", "z", "delta_bias"):
            x[k] = None
        x["mask"] = torch.rand(2, 3, 6, generator=gen) > 0.3
        return compare(tri2, selective_scan_2d_reference, x)
    if name == "2d_walk_memory":
        # 8 rows = 4 tiles of 2 rows: walking 2 tiles a program saves the column state for 2 of them
        x = scan_inputs(gen, 1, 4, (8, 16), 3, 1, False)
        runs = {}
        for walk in (1, 2):
            cfg = dataclasses.replace(cfg2, walk=walk)
            leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
            saved: list[int] = []

            def pack(t, saved=saved):
                saved.append(t.nbytes)
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = selective_scan_2d_triton(**leaves, delta_softplus=True, config=cfg)
            out.backward(torch.ones_like(out))
            runs[walk] = (sum(saved), [out.detach()] + [v.grad for v in leaves.values()])
        return {"saved_bytes_walk1": runs[1][0], "saved_bytes_walk2": runs[2][0],
                "max_rel_diff": max(rel(a, b) for a, b in zip(runs[1][1], runs[2][1], strict=True))}
    if name == "2d_padding_ignored":
        x = scan_inputs(gen, 1, 2, (4, 5), 2, 1, False)
        mask = torch.rand(1, 4, 5, generator=gen) > 0.4
        mask[0, 0, 0] = True
        out1 = tri2(**x, delta_softplus=True, mask=mask)
        pad = ~mask
        y = dict(x)
        for k in ("u", "delta", "z"):
            y[k] = torch.where(pad[:, None], torch.randn(x[k].shape, generator=gen) * 5, x[k])
        for k in ("B", "C"):
            y[k] = torch.where(pad[:, None], torch.randn(x[k].shape, generator=gen) * 5, x[k])
        out2 = tri2(**y, delta_softplus=True, mask=mask)
        real = mask[:, None].expand_as(out1)
        return {"real_cells_changed": rel(out2[real], out1[real]), "padded_cells_changed": rel(out2[~real], out1[~real])}
    raise KeyError(name)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    names = sys.argv[1:] or CASE_NAMES
    print(json.dumps({n: run_case(n) for n in names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
