"""Whole-slide reading, tissue detection, tiling and the coordinates HDF5 store."""
