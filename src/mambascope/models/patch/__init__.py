"""Patch and microscopy image classifiers (importing registers them)."""
