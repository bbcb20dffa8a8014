"""The diagonal linear recurrence `h[t] = a[t] h[t-1] + x[t]` along axis 0, fast in eager PyTorch on CPU.

A plain Python loop over t costs one tiny kernel launch per position; this runs a two-level blocked
scan instead: the T positions are split into m blocks of k ≈ sqrt(T/2), all blocks are scanned at once
from a zero state (k steps over (m, ...) slices), the m block-start states are chained (m small steps),
and each position then adds its start state times its in-block decay (k steps). Every step is exact:
no logarithms or divisions, so any decay in [0, 1] (including exact 0 and 1) is safe.

The adjoint mode runs the transposed recurrence `g[t] = x[t] + a[t+1] g[t+1]` from the end, which
is what back-propagation through the forward recurrence needs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def linear_scan(
    decay: Tensor,
    drive: Tensor,
    start: Tensor | None = None,
    *,
    adjoint: bool = False,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scan along axis 0; returns (states, carry).

    Forward: `h[t] = decay[t] h[t-1] + drive[t]` with `h[-1] = start`; carry is `h[T-1]`.
    Adjoint: `g[t] = drive[t] + decay[t+1] g[t+1]`, `g[T-1] = drive[T-1] + start` (start already
    multiplied by the decay that leads into it); carry is `decay[0] g[0]`, ready for the block before.
    `start` None means zeros. `out` may be `drive` itself (in-place) or any tensor of its shape.
    """
    T = drive.shape[0]
    out = torch.empty_like(drive) if out is None else out
    k = max(1, min(T, round(math.sqrt(T / 2))))
    m = T // k
    rem = T - m * k
    main = slice(rem, T) if adjoint else slice(0, m * k)
    dec = decay[main].unflatten(0, (m, k))
    inp = drive[main].unflatten(0, (m, k))
    res = out[main].unflatten(0, (m, k))
    steps = range(k - 1, -1, -1) if adjoint else range(k)
    first = steps[0]
    # 1. every block from a zero state, and each block's total decay
    if res.data_ptr() != inp.data_ptr():
        res[:, first].copy_(inp[:, first])
    total = dec[:, 0].clone()
    for j in steps[1:]:
        if adjoint:
            torch.addcmul(inp[:, j], dec[:, j + 1], res[:, j + 1], out=res[:, j])
        else:
            torch.addcmul(inp[:, j], dec[:, j], res[:, j - 1], out=res[:, j])
    for j in range(1, k):
        total.mul_(dec[:, j])
    # 2. chain the blocks: the state entering each block
    carry = torch.zeros_like(res[0, 0]) if start is None else start.to(res.dtype).expand_as(res[0, 0])
    entering = torch.empty_like(res[:, 0])
    for i in range(m - 1, -1, -1) if adjoint else range(m):
        entering[i] = carry
        leaving = dec[i, 0] * res[i, 0] if adjoint else res[i, k - 1]
        carry = torch.addcmul(leaving, total[i], carry)
    # 3. add each block's entering state, decayed to every position
    for step, j in enumerate(steps):
        if adjoint:
            if step:
                entering.mul_(dec[:, j + 1])
        else:
            entering.mul_(dec[:, j])
        res[:, j].add_(entering)
    # the positions that did not fill a whole block, one by one
    for t in range(rem - 1, -1, -1) if adjoint else range(m * k, T):
        if adjoint:
            torch.add(drive[t], carry, out=out[t])
            carry = decay[t] * out[t]
        else:
            torch.addcmul(drive[t], decay[t], carry, out=out[t])
            carry = out[t]
    return out, carry
