"""Options shared by commands: `--config file.yaml` and writing the resolved configuration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mambascope.config import load_yaml_config, write_resolved_config
from mambascope.errors import ConfigError


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager callback: options from the YAML file become defaults, so the command line overrides them."""
    if value is None:
        return None
    values = load_yaml_config(value)
    values.pop("command", None)  # written by save_run_config, so a run's config.yaml can be fed back
    command = ctx.command
    known = {p.name for p in command.params if p.name and p.name != "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} in config file", path=value,
                          hint=f"use options of `{ctx.command_path}`: see --help")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--config FILE.yaml`; its keys are this command's option names (dashes or underscores)."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="YAML file of options; options given on the command line override it.",
    )(func)


def save_run_config(out_dir: str | Path, params: dict[str, Any], name: str = "config.yaml") -> Path:
    """Write a command's resolved options (after config file and command line) next to its outputs."""
    ctx = click.get_current_context(silent=True)
    config = dict(params)
    if ctx is not None:
        config = {"command": ctx.command_path, **config}
    return write_resolved_config(out_dir, config, name)
