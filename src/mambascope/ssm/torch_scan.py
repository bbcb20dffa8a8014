"""The `torch` backend: chunked selective scans in eager PyTorch, with a memory-bounded backward.

One engine serves both scans: a 1D sequence of length L is a grid with H = 1 and W = L. The grid is
processed in blocks of columns; per block it builds the per-state tensors (decay `exp(ΔA)` and drive
`ΔBu`, shape (w, H, batch, G, dim/G, N)), runs the row pass along the columns (carrying each row's
state into the next block) and, when H > 1, the column pass along the rows, then contracts with C.
Only one block of per-state tensors exists at a time, never (batch, dim, L, N) for the whole input.

The autograd Function keeps only the row states entering each block; its backward recomputes a block's
states from them and runs the adjoint recurrences right to left (column pass, then row pass), so
training memory is bounded by the block too. Gradients reach u, Δ, A, B and C; the element-wise steps
around the recurrence (Δ bias, softplus, mask, D skip, z gate) use ordinary autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mambascope.ssm.recurrence import linear_scan
from mambascope.ssm.scan_inputs import compute_dtype, effective_delta, gate_output, grouped

#: Target number of elements of one block's (w, H, batch, dim, N) tensor (8 MiB in float32).
BLOCK_ELEMENTS = 1 << 21


def block_width(W: int, H: int, batch: int, dim: int, n_state: int) -> int:
    """Columns per block: fill BLOCK_ELEMENTS, but at least sqrt(W) so the saved entering states
    (W / w of them, each H rows) stay as small as one block."""
    per_column = max(1, H * batch * dim * n_state)
    return max(1, min(W, max(BLOCK_ELEMENTS // per_column, math.isqrt(W))))


def _cells_first(t: Tensor, groups: int) -> Tensor:
    """(batch, dim, H, W) -> contiguous (H, W, batch, G, dim/G, 1).

    For batch 1 this is one 2D transpose (dim, H*W) -> (H*W, dim), which reads memory far better than
    putting W first would.
    """
    b, d, H, W = t.shape
    return t.reshape(b, groups, d // groups, H, W).permute(3, 4, 0, 1, 2).unsqueeze(-1).contiguous()


def _bc_cells_first(t: Tensor) -> Tensor:
    """(batch, G, N, H, W) -> contiguous (H, W, batch, G, 1, N)."""
    return t.permute(3, 4, 0, 1, 2).unsqueeze(-2).contiguous()


def _channels_first(t: Tensor) -> Tensor:
    """(H, W, batch, G, dim/G) -> contiguous (batch, dim, H, W)."""
    H, W, b, G, dg = t.shape
    return t.permute(2, 3, 4, 0, 1).reshape(b, G * dg, H, W).contiguous()


def _cols(t: Tensor, cols: slice) -> Tensor:
    """A block of columns of a cells-first tensor, as a (w, H, ...) view: the layout the block code uses."""
    return t[:, cols].transpose(0, 1)


class _Workspace:
    """Contiguous per-block buffers, allocated once per call and reused by every block.

    Besides bounding memory, reuse matters for speed: a fresh multi-MiB tensor per block page-faults.
    """

    def __init__(self, shape: tuple[int, ...], like: Tensor):
        self.shape, self.like = shape, like  # (H, w, batch, G, dim/G, N)
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, w: int) -> Tensor:
        """The named buffer's first w columns as a (w, H, ...) view."""
        if name not in self.buffers:
            self.buffers[name] = self.like.new_empty(self.shape)
        return _cols(self.buffers[name], slice(0, w))


def _block_states(dt: Tensor, x: Tensor, B: Tensor, A: Tensor, entering: Tensor,
                  ws: _Workspace) -> tuple[Tensor, Tensor, Tensor]:
    """A block's decay exp(ΔA), row states and full states (the row states when H = 1).

    dt, x: (w, H, b, G, dg, 1); B: (w, H, b, G, 1, N); A: (G, dg, N); entering: (H, b, G, dg, N), the
    row states left of the block. Results are (w, H, b, G, dg, N) views of the workspace.
    """
    w = dt.shape[0]
    decay = torch.mul(dt, A, out=ws.get("decay", w)).exp_()
    rows = torch.mul(dt * x, B, out=ws.get("rows", w))
    linear_scan(decay, rows, entering, out=rows)
    if rows.shape[1] == 1:
        return decay, rows, rows
    states = ws.get("states", w)
    linear_scan(decay.transpose(0, 1), rows.transpose(0, 1), out=states.transpose(0, 1))
    return decay, rows, states


class _GridScan(torch.autograd.Function):
    """y = C·h for the 2D recurrence on an (H, W) grid (1D when H = 1), plus the final state.

    Inputs are moved once to the cells-first layout (H, W, batch, G, dim/G, ·); a block of columns is
    handled as a (w, H, ...) view of it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        b, d, H, W = x.shape
        G, N = B.shape[1], B.shape[2]
        Ag = A.reshape(G, d // G, N)
        xs, dts = _cells_first(x, G), _cells_first(dt, G)
        Bs, Cs = _bc_cells_first(B), _bc_cells_first(C)
        w = block_width(W, H, b, d, N)
        ws = _Workspace((H, w, b, G, d // G, N), x)
        y = x.new_empty(H, W, b, G, d // G)
        carry = x.new_zeros(H, b, G, d // G, N)
        entering = []
        for j0 in range(0, W, w):
            cols = slice(j0, j0 + w)
            entering.append(carry)
            _, rows, states = _block_states(_cols(dts, cols), _cols(xs, cols), _cols(Bs, cols), Ag, carry, ws)
            carry = rows[-1].clone()
            y[:, cols] = torch.einsum("hwbgdn,hwbgn->hwbgd", states.transpose(0, 1), Cs[:, cols, ..., 0, :])
        last = states[-1, -1].reshape(b, d, N).clone()
        ctx.save_for_backward(xs, dts, Ag, Bs, Cs, torch.stack(entering))
        ctx.block = w
        return _channels_first(y), last

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_last: Tensor) -> tuple[Tensor, ...]:
        xs, dts, Ag, Bs, Cs, entering = ctx.saved_tensors
        w = ctx.block
        H, W, b, G, dg, _ = xs.shape
        N = Ag.shape[-1]
        ws = _Workspace((H, w, b, G, dg, N), xs)
        gys = _cells_first(grad_y, G)  # (H, W, b, G, dg, 1)
        grad_x = torch.empty_like(xs[..., 0])
        grad_dt = torch.empty_like(dts[..., 0])
        grad_A = torch.zeros_like(Ag)
        grad_B = torch.empty_like(Bs[..., 0, :])
        grad_C = torch.empty_like(Cs[..., 0, :])
        row_carry = None  # decay[j1] * row_grad[j1] from the block to the right
        starts = list(range(0, W, w))
        for index in range(len(starts) - 1, -1, -1):
            cols = slice(starts[index], starts[index] + w)
            dt_b, x_b, B_b, C_b, gy = (_cols(t, cols) for t in (dts, xs, Bs, Cs, gys))
            decay, rows, states = _block_states(dt_b, x_b, B_b, Ag, entering[index], ws)
            width = decay.shape[0]
            grad_C[:, cols] = torch.einsum("hwbgdn,hwbgd->hwbgn", states.transpose(0, 1), gys[:, cols, ..., 0])
            grad_h = torch.mul(gy, C_b, out=ws.get("grad_h", width))
            if index == len(starts) - 1:
                grad_h[-1, -1] += grad_last.reshape(b, G, dg, N)
            grad_decay = ws.get("grad_decay", width)
            if H > 1:
                # column pass h[i] = decay[i] h[i-1] + r[i]: its adjoint, and d decay = g_h[i] h[i-1]
                linear_scan(decay.transpose(0, 1), grad_h.transpose(0, 1), adjoint=True, out=grad_h.transpose(0, 1))
                grad_decay[:, 0].zero_()
                torch.mul(grad_h[:, 1:], states[:, :-1], out=grad_decay[:, 1:])
            # row pass r[j] = decay[j] r[j-1] + drive[j]: its adjoint (in place), and d decay += g_r[j] r[j-1]
            grad_rows, row_carry = linear_scan(decay, grad_h, row_carry, adjoint=True, out=grad_h)
            if H > 1:
                grad_decay[1:].addcmul_(grad_rows[1:], rows[:-1])
                grad_decay[0].addcmul_(grad_rows[0], entering[index])
            else:
                torch.mul(grad_rows[1:], rows[:-1], out=grad_decay[1:])
                torch.mul(grad_rows[0], entering[index], out=grad_decay[0])
            grad_decay.mul_(decay)  # now the gradient of ΔA; `rows` is free to hold temporaries
            bu = torch.einsum("hwbgdn,hwbgn->hwbgd", grad_rows.transpose(0, 1), Bs[:, cols, ..., 0, :]).transpose(0, 1)
            _cols(grad_dt, cols).copy_(torch.mul(grad_decay, Ag, out=rows).sum(-1).addcmul_(bu, x_b[..., 0]))
            grad_A += grad_decay.mul_(dt_b).sum((0, 1, 2))
            dt_b, x_b = dt_b[..., 0], x_b[..., 0]
            _cols(grad_x, cols).copy_(bu * dt_b)
            grad_B[:, cols] = torch.einsum("hwbgdn,hwbgd->hwbgn", grad_rows.transpose(0, 1), (dt_b * x_b).transpose(0, 1))
        return (_channels_first(grad_x), _channels_first(grad_dt), grad_A.reshape(G * dg, N),
                grad_B.permute(2, 3, 4, 0, 1).contiguous(), grad_C.permute(2, 3, 4, 0, 1).contiguous())


def selective_scan_torch(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """1D selective scan (u: (batch, dim, L)) as the H = 1 grid."""
    out, last = _grid_scan(u.unsqueeze(2), delta.unsqueeze(2), A, grouped(B, u).unsqueeze(-2),
                           grouped(C, u).unsqueeze(-2), D, None if z is None else z.unsqueeze(2),
                           delta_bias, delta_softplus, None)
    out = out.squeeze(2)
    return (out, last) if return_last_state else out


def selective_scan_2d_torch(
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
) -> Tensor:
    """2D selective scan (u: (batch, dim, H, W)): row pass then column pass, masked cells with Δ = 0."""
    out, _ = _grid_scan(u, delta, A, grouped(B, u), grouped(C, u), D, z, delta_bias, delta_softplus, mask)
    return out


def _grid_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, mask) -> tuple[Tensor, Tensor]:
    """Shared body: element-wise steps in the compute dtype around the recurrence Function."""
    dtype = compute_dtype(u, delta, A, B, C)
    dt = effective_delta(delta.to(dtype), delta_bias, delta_softplus, mask)
    y, last = _GridScan.apply(u.to(dtype), dt, A.to(dtype), B.to(dtype), C.to(dtype))
    return gate_output(y, u, D, z, u.dtype), last
