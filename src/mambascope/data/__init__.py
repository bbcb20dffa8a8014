"""Datasets and splits: MIL bags, patch HDF5, image folders, BraTS cases."""
