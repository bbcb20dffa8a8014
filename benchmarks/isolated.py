"""Run one benchmark case per fresh process, so each case's peak memory and warm-up are its own."""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Iterable


def run_each_in_process(names: Iterable[str], target: Callable, args) -> list[dict]:
    """`target(name, args, queue)` in a spawned process per name; the dict each puts on the queue, in
    order. A case that exits non-zero is reported on stderr and left out."""
    context = mp.get_context("spawn")
    results = []
    for name in names:
        queue = context.Queue()
        process = context.Process(target=target, args=(name, args, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            print(f"{name}: failed (exit code {process.exitcode})", file=sys.stderr)
            continue
        results.append(queue.get())
    return results
