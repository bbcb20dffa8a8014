"""Mamba blocks as pure nn.Modules: the Mamba-1 mixer (optionally bidirectional), VMamba's SS2D and
VSS block, and a 2D-Mamba block for patch grids with holes.

All of them share the selective-SSM parameterisation of Mamba-1: a projection of each token to
(Δ, B, C), Δ = softplus(dt_proj(·) + bias) with the bias initialised so Δ starts log-uniform in
[dt_min, dt_max], and the S4D-real A = -(1, 2, ..., N) per channel, stored as log(-A).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from mambascope.ssm.dispatch import depthwise_conv_silu, selective_scan, selective_scan_2d

#: Δ's pre-activation on padding: softplus of it (plus any bias) is exactly 0 in every dtype, and so is
#: its gradient
PADDING_DELTA = -1e4


def resolve_dt_rank(d_model: int, dt_rank: int | str) -> int:
    """`"auto"` is ceil(d_model / 16), Mamba's low-rank Δ projection."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


def initial_dt_bias(d_inner: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """Bias whose softplus is log-uniform in [dt_min, dt_max]: each channel starts at its own time scale."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def s4d_real_log_A(rows: int, d_state: int) -> nn.Parameter:
    """log(-A) for the S4D-real initialisation A[:, n] = -(n + 1): a spread of decay rates per channel."""
    A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(rows, 1)
    param = nn.Parameter(torch.log(A))
    param._no_weight_decay = True
    return param


def skip_weight(rows: int) -> nn.Parameter:
    """The D skip connection, initialised to 1 and kept out of weight decay."""
    param = nn.Parameter(torch.ones(rows))
    param._no_weight_decay = True
    return param


def dt_projection(dt_rank: int, d_inner: int, dt_min: float, dt_max: float) -> nn.Linear:
    """Δ's rank-`dt_rank` up-projection with Mamba's initialisation (weight ±dt_rank^-0.5)."""
    proj = nn.Linear(dt_rank, d_inner, bias=True)
    nn.init.uniform_(proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
    with torch.no_grad():
        proj.bias.copy_(initial_dt_bias(d_inner, dt_min, dt_max))
    return proj


def channel_product(weight: Tensor, x: Tensor) -> Tensor:
    """`weight` (out, in) applied to channel-first `x` (batch, in, L): (batch, out, L), contiguous.

    A batched product with the weight broadcast over the batch. `weight @ x` gives the same values, but
    torch folds the batch into the product's rows and copies the result back to channel-first: one
    transposing copy per product (at one slide per MIL step, ~0.03 ms of GPU time each)."""
    return torch.bmm(weight.unsqueeze(0).expand(x.shape[0], -1, -1), x)


class Mamba(nn.Module):
    """Mamba-1 mixer: (B, L, d_model) -> (B, L, d_model).

    in_proj to (x, z), causal depthwise conv + SiLU on x, x_proj to (Δ, B, C), dt_proj, selective scan
    gated by z, out_proj. Parameter names follow mamba-ssm (in_proj, conv1d, x_proj, dt_proj, A_log, D,
    out_proj); `bidirectional=True` adds a reverse-direction copy of the scan path (conv1d_b, x_proj_b,
    dt_proj_b, A_b_log, D_b, as in Vim) and sums both directions before out_proj. `reverse=True` walks
    the sequence from its end (the same as flipping the tokens in and out, without the copies).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        bidirectional: bool = False,
        backend: str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        reverse: bool = False,
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(d_model, dt_rank)
        self.bidirectional = bidirectional
        self.reverse = reverse
        self.backend = backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj = self._path_layers(dt_min, dt_max)
        self.A_log, self.D = s4d_real_log_A(self.d_inner, d_state), skip_weight(self.d_inner)
        if bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._path_layers(dt_min, dt_max)
            self.A_b_log, self.D_b = s4d_real_log_A(self.d_inner, d_state), skip_weight(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _path_layers(self, dt_min: float, dt_max: float) -> tuple[nn.Conv1d, nn.Linear, nn.Linear]:
        conv = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        return conv, x_proj, dt_projection(self.dt_rank, self.d_inner, dt_min, dt_max)

    def _scan_path(self, x: Tensor, z: Tensor, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear,
                   A_log: Tensor, D: Tensor, reverse: bool, keep: Tensor | None = None) -> Tensor:
        """One direction: (B, d_inner, L) x and gate z -> gated scan output (B, d_inner, L), walking
        from the end when `reverse` (the conv then looks ahead instead of back: the same function as
        flipping x in and the output back, without the copies; on a GPU conv, bias and SiLU are one
        Triton kernel, `depthwise_conv_silu`). A walk from the end starts past the
        padding (`keep` False): its conv inputs are zeroed and its Δ made 0, so the state leaves it as
        it entered, zero."""
        if reverse and keep is not None:
            x = x * keep
        x = depthwise_conv_silu(conv, x, self.backend, reverse=reverse)
        dt, B, C = channel_product(x_proj.weight, x).split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = channel_product(dt_proj.weight, dt)
        if reverse and keep is not None:
            delta = delta.masked_fill(~keep, PADDING_DELTA)
        return selective_scan(
            x, delta, -torch.exp(A_log.float()), B, C, D.float(), z,
            delta_bias=dt_proj.bias.float(), delta_softplus=True, reverse=reverse, backend=self.backend,
        )

    def forward(self, hidden: Tensor, keep: Tensor | None = None) -> Tensor:
        """`keep`: (L,) bool, False on padding at the end of every sequence of the batch. Outputs there
        are not meaningful; elsewhere they are those of the unpadded sequences (a forward walk reaches the
        padding last; a walk from the end passes it unchanged)."""
        # The projections are (out, in) x (batch, in, L) products (`channel_product`), so x, z, Δ, B and C
        # come out channel-first, the layout of the conv and the scan, with no layout copies (at one bag
        # a step, as MIL trains, each copy and its gradient are host time)
        x, z = channel_product(self.in_proj.weight, hidden.transpose(1, 2)).chunk(2, dim=1)
        y = self._scan_path(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.reverse, keep)
        if self.bidirectional:
            y = y + self._scan_path(x, z, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b,
                                    not self.reverse, keep)
        return y.transpose(1, 2) @ self.out_proj.weight.t()


class SS2D(nn.Module):
    """VMamba's 2D selective scan: (B, H, W, d_model) -> (B, H, W, d_model).

    in_proj to (x, z), depthwise conv + SiLU on x, four scans (row-major, column-major, both reversed:
    the walks of `cross_scan`, directions k = 0..3) with their own Δ/B/C projections, summed back in
    place (`cross_merge`), then LayerNorm, z gate and out_proj. A custom `out_proj` module replaces the
    LayerNorm + Linear: it receives the gated merged scan output (B, H, W, d_inner) and must return
    (B, H, W, d_model).
    """

    directions = 4

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 3,
        out_proj: nn.Module | None = None,
        backend: str = "auto",
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ):
        super().__init__()
        K = self.directions
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(d_model, dt_rank)
        self.backend = backend
        d_inner, rank = self.d_inner, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding="same", groups=d_inner)
        bound = d_inner**-0.5  # nn.Linear's default init, per direction
        self.x_proj_weight = nn.Parameter(torch.empty(K, rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        dt_projs = [dt_projection(rank, d_inner, dt_min, dt_max) for _ in range(K)]
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight.detach() for p in dt_projs]))
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias.detach() for p in dt_projs]))
        self.A_logs = s4d_real_log_A(K * d_inner, d_state)
        self.Ds = skip_weight(K * d_inner)
        self.out_norm = nn.LayerNorm(d_inner) if out_proj is None else nn.Identity()
        self.out_proj = nn.Linear(d_inner, d_model, bias=False) if out_proj is None else out_proj

    def scan(self, x: Tensor) -> Tensor:
        """The four-way scan of conv features (B, d_inner, H, W) -> merged (B, d_inner, H*W).

        The rows and the columns (one transposed copy) are stacked once; directions 0 and 1 scan them
        from the start and directions 2 and 3 from the end (`reverse`: in the kernels' loads), so the
        reversed copies `cross_scan` makes, and `cross_merge`'s flips, are never made. Δ, B and C are
        position-wise projections, so each is computed in the stack's order too.
        """
        batch, d, H, W = x.shape
        L = H * W
        both = torch.cat([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1).view(batch, 2, d, L)
        A = -torch.exp(self.A_logs.float())
        y = None
        for reverse in (False, True):
            k = slice(2, 4) if reverse else slice(0, 2)  # this walk's two directions: rows, columns
            rows = slice(k.start * d, k.stop * d)  # their channels in A_logs and Ds
            proj = torch.matmul(self.x_proj_weight[k], both)  # (B, 2, rank + 2N, L)
            dts, Bs, Cs = proj.split([self.dt_rank, self.d_state, self.d_state], dim=2)
            dts = torch.matmul(self.dt_projs_weight[k], dts)  # (B, 2, d, L)
            part = selective_scan(
                both.view(batch, 2 * d, L), dts.reshape(batch, 2 * d, L), A[rows], Bs, Cs, self.Ds[rows].float(),
                delta_bias=self.dt_projs_bias[k].reshape(-1).float(), delta_softplus=True, reverse=reverse,
                backend=self.backend,
            )
            y = part if y is None else y + part
        y = y.view(batch, 2, d, L)
        return y[:, 0] + y[:, 1].view(batch, d, W, H).transpose(2, 3).reshape(batch, d, L)

    def forward(self, hidden: Tensor) -> Tensor:
        batch, H, W, _ = hidden.shape
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.scan(x).transpose(1, 2).reshape(batch, H, W, self.d_inner)
        return self.out_proj(self.out_norm(y) * F.silu(z))


class VSSBlock(nn.Module):
    """VMamba's visual state-space block: x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x)))
    when mlp_ratio > 0. Input and output (B, H, W, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        drop_path: float = 0.0,
        mlp_ratio: float = 0.0,
        expand: int = 2,
        d_conv: int = 3,
        backend: str = "auto",
    ):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.op = SS2D(d_model, d_state=d_state, expand=expand, d_conv=d_conv, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp_ratio = mlp_ratio
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(d_model)
            self.mlp = Mlp(d_model, hidden_features=int(d_model * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp_ratio > 0:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class Mamba2D(nn.Module):
    """2D-Mamba block for grids of patch features with holes: (B, H, W, d_model) -> (B, H, W, d_model).

    The Mamba-1 mixer with the 1D scan replaced by `selective_scan_2d` (row pass, then column pass) and
    a depthwise 2D conv. `mask` (B, H, W) bool marks real cells: padded cells are zeroed before the
    conv, have Δ = 0 in the scan (state passes through) and get zero output, so real cells never
    depend on what padded cells contain.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 1,
        backend: str = "auto",
        d_conv: int = 3,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(d_model, dt_rank)
        self.backend = backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, d_conv, padding="same", groups=self.d_inner)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = dt_projection(self.dt_rank, self.d_inner, dt_min, dt_max)
        self.A_log, self.D = s4d_real_log_A(self.d_inner, d_state), skip_weight(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, height, width, _ = hidden.shape
        keep = mask.unsqueeze(-1) if mask is not None else None  # bool: the products cast it, no cast kernel
        if keep is not None:
            hidden = hidden * keep
        # The projections are (out, in) x (batch, in, cells) products (`channel_product`): their
        # results come out channel-first, the layout of the conv and the scan, so no layout copies
        # are made (at one slide per step those copies and their gradients were ~10 launches).
        tokens = hidden.reshape(batch, height * width, -1).transpose(1, 2)
        x, z = channel_product(self.in_proj.weight, tokens).unflatten(2, (height, width)).chunk(2, dim=1)
        x = depthwise_conv_silu(self.conv2d, x, self.backend)
        dt, B, C = channel_product(self.x_proj.weight, x.flatten(2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=1)
        y = selective_scan_2d(
            x, channel_product(self.dt_proj.weight, dt).unflatten(2, (height, width)), -torch.exp(self.A_log.float()),
            B.unflatten(2, (height, width)), C.unflatten(2, (height, width)), self.D.float(), z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, mask=mask, backend=self.backend,
        )
        out = y.flatten(2).transpose(1, 2) @ self.out_proj.weight.t()
        out = out.view(batch, height, width, -1)
        return out * keep if keep is not None else out
