"""MambaMIL with SR-MambaMIL's sequence reordering (Yang et al. 2024).

Patch features are projected and mixed by residual Mamba layers over the bag's sequence (file order,
i.e. the tiler's raster order). Each layer adds a second Mamba branch that scans the sequence
reordered with rate R — positions i, i+R, i+2R, ... become neighbours — so distant patches interact
within one scan; its output is put back in the original order and summed with the plain branch.
The mixed tokens are normalised and pooled with gated attention, whose weights are the patch scores.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mambascope.models.cuda_graphs import CudaGraphCache
from mambascope.models.mil.grid import padded_size
from mambascope.models.mil.layers import AttentionPooling, projection
from mambascope.models.mil.output import MILOutput, check_bag
from mambascope.models.registry import register_model

#: the ladder of lengths bags are padded to for CUDA graphs (`MambaMIL.graph_length`)
SEQUENCE_MULTIPLE, SEQUENCE_STEPS = 256, 8


def _reorder(length: int, rate: int) -> np.ndarray:
    """Positions of the rate-R reordering: 0, R, 2R, ..., then 1, R+1, ..., (any length)."""
    return np.concatenate([np.arange(start, length, rate) for start in range(min(rate, length))])


@functools.lru_cache(maxsize=64)
def sequence_layout(length: int, padded: int, rate: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, order, unorder) for a bag of `length` tokens padded to `padded`: `keep` marks the real
    tokens; `order` lists the positions of the rate-R reordering, then the padding, and `unorder` is its
    inverse, so `x.index_select(1, order)` reorders and `.index_select(1, unorder)` puts back (an
    index_select's gradient is a plain index_add; advanced indexing's sorts). Made on the host once per
    length and kept: bags of one length share them. Read-only."""
    order = np.concatenate([_reorder(length, rate), np.arange(length, padded)])
    unorder = np.empty_like(order)
    unorder[order] = np.arange(padded)
    keep = torch.arange(padded) < length
    return tuple(t.to(device) for t in (keep, torch.from_numpy(order), torch.from_numpy(unorder)))


class SRMambaLayer(nn.Module):
    """x + Mamba(LN(x)) + unreorder(Mamba_sr(reorder(LN(x)))), on a (1, L, dim) sequence whose padding,
    if any, is at the end (`keep` False there) in both orders."""

    def __init__(self, dim: int, d_state: int, reorder_rate: int, bidirectional: bool, backend: str):
        super().__init__()
        from mambascope.ssm import Mamba

        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, bidirectional=bidirectional, backend=backend)
        self.mamba_sr = (Mamba(dim, d_state=d_state, bidirectional=bidirectional, backend=backend)
                         if reorder_rate > 1 else None)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None, order: torch.Tensor,
                unorder: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        y = self.mamba(h, keep)
        if self.mamba_sr is not None:
            y = y + self.mamba_sr(h.index_select(1, order), keep).index_select(1, unorder)
        return x + y


class MambaMIL(nn.Module):
    """Projection, `depth` SR-Mamba layers, LayerNorm, gated attention pooling, linear head.

    In GPU training a bag of up to `graph_max_length` patches is padded at its end to one of a few
    lengths (`graph_length`), the padding masked, and the model replays from CUDA graphs, one pair per
    length, at most `cuda_graphs` of them (`models.cuda_graphs`; 0: eager). Padding changes no result:
    the scans walk it last (a walk from the end starts past it) and the pooling leaves it out. Longer
    bags run eagerly: there the GPU's work outlasts the host's, so a graph would save little, and the
    graphs' memory pool would have to hold their activations."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 512, depth: int = 2, d_state: int = 16,
                 reorder_rate: int = 10, bidirectional: bool = False, attn_dim: int = 128, dropout: float = 0.25,
                 backend: str = "auto", cuda_graphs: int = 16, graph_max_length: int = 8192):
        super().__init__()
        self.in_dim = in_dim
        self.graph_max_length = graph_max_length
        self.reorder_rate = reorder_rate
        self.embed = projection(in_dim, dim, dropout)
        self.layers = nn.ModuleList(SRMambaLayer(dim, d_state, reorder_rate, bidirectional, backend)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPooling(dim, attn_dim, gated=True, dropout=dropout)
        self.head = nn.Linear(dim, num_classes)
        self.graphs = CudaGraphCache(max_graphs=cuda_graphs)

    def graph_length(self, length: int, device: torch.device) -> int | None:
        """The length a bag is padded to for CUDA-graph replay: `length` rounded up to a multiple of 256,
        the step doubling every 8 steps (256, 512, ..., 2048, 2560, ..., 4096, 5120, ...: at most 1/4
        longer past 2048), so lengths repeat. None where the bag runs eagerly and unpadded: off the GPU,
        without gradients, with graphs off, or past `graph_max_length`."""
        if device.type != "cuda" or not torch.is_grad_enabled() or self.graphs.max_graphs <= 0:
            return None
        padded = padded_size(length, SEQUENCE_MULTIPLE, SEQUENCE_STEPS)
        return padded if padded <= self.graph_max_length else None

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        length = features.shape[0]
        padded = self.graph_length(length, features.device)
        keep, order, unorder = sequence_layout(length, padded or length, self.reorder_rate, features.device)
        if padded is not None and padded > length:
            features = F.pad(features, (0, 0, 0, padded - length))
        if padded is None:  # eager and unpadded: nothing to mask
            logits, weights = self._on_sequence(features, None, order, unorder)
        else:
            logits, weights = self.graphs(self, self._on_sequence, features, keep, order, unorder)
        return MILOutput(logits=logits, scores=weights[:length])

    def _on_sequence(self, features: torch.Tensor, keep: torch.Tensor | None, order: torch.Tensor,
                     unorder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and per-token attention weights (0 on padding) of a bag, padded where `keep` is given."""
        h = self.embed(features).unsqueeze(0)
        for layer in self.layers:
            h = layer(h, keep, order, unorder)
        pooled, weights = self.pool(self.norm(h[0]), keep)
        return self.head(pooled), weights


@register_model("mambamil")
def mambamil(in_dim: int, num_classes: int, **kwargs) -> MambaMIL:
    """SR-MambaMIL (reorder_rate=1 gives plain MambaMIL)."""
    return MambaMIL(in_dim, num_classes, **kwargs)
