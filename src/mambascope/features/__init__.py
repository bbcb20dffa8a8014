"""Patch feature extraction: backbone registry, streaming pipeline, features HDF5 store."""
