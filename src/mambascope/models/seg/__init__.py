"""3D segmentation models (importing registers them): SegMamba."""

from mambascope.models.seg.segmamba import SegMamba

__all__ = ["SegMamba"]
