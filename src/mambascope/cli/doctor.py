"""`mambascope doctor`: print what this installation can do."""

from __future__ import annotations

import click


@click.command()
def doctor() -> None:
    """Print Python, torch, CUDA/GPU, Triton, OpenSlide, scan backends and bundled sample data."""
    from rich.console import Console
    from rich.table import Table

    from mambascope.environment import environment_report

    table = Table(show_header=False, box=None)
    for fact in environment_report():
        table.add_row(fact.name, fact.value if fact.ok else f"[yellow]{fact.value}[/yellow]")
    Console().print(table)


COMMANDS = [doctor]
