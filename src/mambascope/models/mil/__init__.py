"""Slide-level multiple-instance learning aggregators (importing registers them)."""
