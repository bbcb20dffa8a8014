"""Real sample data shipped with the package (see SOURCES.md here for licences and attribution).

CMU-1-Small-Region, OS-1 and OS-2: OpenSlide test data (openslide.org).
TCGA-FG-6692 MRI: The Cancer Imaging Archive, TCGA-LGG collection (CC BY 3.0); preprocessing and
model segmentation by BrainLesion/BraTS-Toolkit.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent

#: file name -> first 16 hex digits of its sha256, as recorded in SOURCES.md
SAMPLE_FILES: dict[str, str] = {
    "CMU-1-Small-Region.svs": "ed92d5a9f2e86df6",
    "OS-1-detail.ome.tif": "bd12ffce4aa77315",
    "OS-2-ndpi.ome.tif": "f6c9b7728ffa84e7",
    "OS-2-vsi.ome.tif": "5d941282361d7f49",
    "TCGA-FG-6692/t1.nii.gz": "da2bea0bb7db8bf0",
    "TCGA-FG-6692/t1c.nii.gz": "59d1534fd71266f6",
    "TCGA-FG-6692/t2.nii.gz": "4f4ab08914258b9c",
    "TCGA-FG-6692/flair.nii.gz": "b7f903bd5e91955b",
    "TCGA-FG-6692/seg_fusion_simple.nii.gz": "2c0ca007ba1406f1",
}


def sample_path(name: str) -> Path:
    """Path of one bundled sample file, e.g. `sample_path("CMU-1-Small-Region.svs")`."""
    if name not in SAMPLE_FILES:
        raise KeyError(f"no bundled sample named {name!r}; known: {sorted(SAMPLE_FILES)}")
    return SAMPLE_DIR / name


def check_samples() -> dict[str, bool]:
    """For each bundled file, whether it is present with the recorded checksum."""
    import hashlib

    status = {}
    for name, digest in SAMPLE_FILES.items():
        path = SAMPLE_DIR / name
        status[name] = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest().startswith(digest)
    return status
