"""What a person looks at to check tiling: tissue contours as QuPath GeoJSON and a thumbnail PNG with
the contours and the kept patches drawn."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mambascope.atomic import atomic_path, write_text_atomic

CONTOUR_COLOR = (0, 170, 0)  # RGB
PATCH_COLOR = (30, 90, 230)
TISSUE_CLASS = "Tissue"


@dataclass(frozen=True)
class TissuePolygon:
    """One piece of tissue: outer ring and hole rings, each (K, 2) float level-0 x, y."""

    outer: np.ndarray
    holes: tuple[np.ndarray, ...]


def mask_polygons(mask: np.ndarray, slide_size: tuple[int, int]) -> list[TissuePolygon]:
    """Tissue pieces of a low-resolution mask as polygons in level-0 pixels (pixel centres scaled)."""
    import cv2

    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    scale = np.array([slide_size[0] / mask.shape[1], slide_size[1] / mask.shape[0]])

    def to_level0(contour: np.ndarray) -> np.ndarray:
        return (contour.reshape(-1, 2).astype(np.float64) + 0.5) * scale

    polygons = []
    for index, (_next, _prev, first_child, parent) in enumerate(hierarchy[0]):
        if parent != -1 or len(contours[index]) < 3:
            continue
        holes, child = [], first_child
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(to_level0(contours[child]))
            child = hierarchy[0][child][0]
        polygons.append(TissuePolygon(to_level0(contours[index]), tuple(holes)))
    return polygons


def _ring(points: np.ndarray) -> list[list[float]]:
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in points]
    return [*ring, ring[0]]


def polygons_geojson(polygons: list[TissuePolygon]) -> dict:
    """A GeoJSON FeatureCollection of tissue annotations that QuPath imports (File > Import objects)."""
    features = [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_ring(p.outer), *(_ring(h) for h in p.holes)]},
        "properties": {"objectType": "annotation", "isLocked": False,
                       "classification": {"name": TISSUE_CLASS, "color": list(CONTOUR_COLOR)}},
    } for p in polygons]
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, polygons: list[TissuePolygon]) -> Path:
    return write_text_atomic(path, json.dumps(polygons_geojson(polygons)))


def draw_overview(thumbnail: np.ndarray, slide_size: tuple[int, int], polygons: list[TissuePolygon],
                  coords: np.ndarray, patch_size_level0: int) -> np.ndarray:
    """The thumbnail with each kept patch outlined and the tissue contours on top."""
    import cv2

    image = np.ascontiguousarray(thumbnail.copy())
    scale = np.array([thumbnail.shape[1] / slide_size[0], thumbnail.shape[0] / slide_size[1]])
    thickness = max(1, round(max(thumbnail.shape[:2]) / 500))
    corners = np.round(coords * scale).astype(np.int32)
    ends = np.round((coords + patch_size_level0) * scale).astype(np.int32)
    for (x0, y0), (x1, y1) in zip(corners, ends, strict=True):
        cv2.rectangle(image, (int(x0), int(y0)), (int(x1), int(y1)), PATCH_COLOR, 1)
    rings = [np.round(ring * scale).astype(np.int32).reshape(-1, 1, 2)
             for p in polygons for ring in (p.outer, *p.holes)]
    cv2.polylines(image, rings, isClosed=True, color=CONTOUR_COLOR, thickness=thickness + 1)
    return image


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB image as PNG atomically."""
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return Path(path)
