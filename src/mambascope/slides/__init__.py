"""Whole-slide reading, tissue detection, tiling and the coordinates HDF5 store.

Heavy libraries (OpenSlide, tiffslide, OpenCV, h5py) load when a function first needs them.
"""

from mambascope.slides.batch import TilingReport, tile_slides
from mambascope.slides.coords_store import coords_path, read_coords, write_coords
from mambascope.slides.geometry import PatchGeometry, patch_geometry
from mambascope.slides.patches_store import patches_path
from mambascope.slides.reader import Slide, SlideEntry, list_slides, open_slide
from mambascope.slides.tiling import SlideResult, TilingConfig, tile_slide
from mambascope.slides.tissue import TissueParams, detect_tissue

__all__ = [
    "PatchGeometry",
    "Slide",
    "SlideEntry",
    "SlideResult",
    "TilingConfig",
    "TilingReport",
    "TissueParams",
    "coords_path",
    "detect_tissue",
    "list_slides",
    "open_slide",
    "patch_geometry",
    "patches_path",
    "read_coords",
    "tile_slide",
    "tile_slides",
    "write_coords",
]
