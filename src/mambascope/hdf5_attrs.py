"""HDF5 attribute values to and from plain Python, shared by the coordinates and features formats.

HDF5 stores numbers, strings and numeric arrays; paths become strings, numeric lists arrays, and
mappings or mixed lists JSON text (parsed back for the keys a format names).
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def encode_attr(value: Any) -> Any:
    """A value HDF5 can store as an attribute."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return json.dumps(dict(value), sort_keys=True, default=str)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float)) for v in value):
            return np.asarray(value)
        return json.dumps(list(value), default=str)
    return value


def decode_attr(key: str, value: Any, json_keys: Container[str] = ()) -> Any:
    """Plain Python from what h5py hands back (bytes, numpy scalars and arrays); JSON parsed for `json_keys`."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        if key in json_keys:
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
