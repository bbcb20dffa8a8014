"""Root of the `mambascope` program: collects command modules and turns user errors into one line."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback

import click

import mambascope
from mambascope.errors import MambascopeError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(mambascope.__version__, "--version", prog_name="mambascope")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def cli(debug: bool) -> None:
    """mambascope: state-space (Mamba) models for whole slides, patches and 3D MRI."""


@click.group()
def train() -> None:
    """Train a model (a run directory holds config, checkpoints, logs, plots and metrics)."""


def _collect_commands() -> None:
    """Add every command that a module in `mambascope.cli` exposes."""
    package = importlib.import_module("mambascope.cli")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in {"main", "options"}:
            continue
        module = importlib.import_module(f"mambascope.cli.{info.name}")
        for command in getattr(module, "COMMANDS", []):
            cli.add_command(command)
        for command in getattr(module, "TRAIN_COMMANDS", []):
            train.add_command(command)
    if train.commands:
        cli.add_command(train)


_collect_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; a user error prints one line and exits non-zero."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="mambascope", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        ctx = getattr(exc, "ctx", None)
        usage = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{usage}", err=True)
        return exc.exit_code
    except MambascopeError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc.one_line()}", err=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
