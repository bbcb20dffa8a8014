"""3D segmentation models (importing registers them)."""
