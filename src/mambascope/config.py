"""YAML configuration: load a user's file, write the resolved configuration next to outputs."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mambascope.atomic import write_text_atomic
from mambascope.errors import ConfigError


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of option names to values; keys may use dashes or underscores."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path=path, hint="check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"config file is not valid YAML{where}", path=path,
                          hint="fix the YAML syntax, e.g. `key: value` per line") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("config file must hold a mapping of option names to values", path=path,
                          hint="write one `option: value` per line")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def to_plain(value: Any) -> Any:
    """Turn paths, tuples, enums and nested containers into YAML-safe plain values."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_plain(value.value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(v) for v in value]
    return value


def write_resolved_config(out_dir: str | Path, config: Mapping[str, Any], name: str = "config.yaml") -> Path:
    """Write everything needed to rerun a command as `out_dir/name` (atomically)."""
    text = yaml.safe_dump(to_plain(dict(config)), sort_keys=True)
    return write_text_atomic(Path(out_dir) / name, text)
