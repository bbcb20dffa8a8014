"""Patch and microscopy image classifiers (importing registers them).

`histomamba-small|base|deep`: spatial Mamba blocks with a reconstruction decoder;
`microscopic-mamba-tiny|small|base`: conv + VSSM (SS2D with PSFFN) branches fused by MIFA.
"""

from mambascope.models.patch.histomamba import HistoMamba, SpatialMambaBlock
from mambascope.models.patch.microscopic_mamba import MicroscopicMamba

__all__ = ["HistoMamba", "MicroscopicMamba", "SpatialMambaBlock"]
