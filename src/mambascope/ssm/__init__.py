"""State-space core: selective scans (1D, 2D), scan orders and Mamba blocks.

`selective_scan` and `selective_scan_2d` compute one function on every backend (`reference`, `torch`,
`triton`, `mamba_ssm`); the blocks (`Mamba`, `SS2D`, `VSSBlock`, `Mamba2D`) build on them and on the
index maps in `orders`.
"""

from mambascope.ssm.blocks import SS2D, Mamba, Mamba2D, VSSBlock
from mambascope.ssm.dispatch import BACKENDS, available_backends, selective_scan, selective_scan_2d
from mambascope.ssm.orders import (
    ScanOrder,
    bidirectional_orders,
    cross_merge,
    cross_scan,
    reverse_order,
    tri_orientation_orders,
)

__all__ = [
    "BACKENDS",
    "SS2D",
    "Mamba",
    "Mamba2D",
    "ScanOrder",
    "VSSBlock",
    "available_backends",
    "bidirectional_orders",
    "cross_merge",
    "cross_scan",
    "reverse_order",
    "selective_scan",
    "selective_scan_2d",
    "tri_orientation_orders",
]
