"""Split slides between processes without a scheduler: SLURM array tasks × torchrun ranks.

Every process lists the same slides, sorts them by id and keeps every `count`-th one starting at its
`index`, so shards are disjoint, cover everything, and need no communication. The shard comes from
`--shard i/n` or the SLURM array variables; the rank from torchrun's `RANK`/`WORLD_SIZE`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mambascope.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's share: items `index, index + count, ...` of the sorted list."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"invalid shard {self.index}/{self.count}",
                              hint="use --shard i/n with 0 <= i < n, e.g. --shard 0/4")

    @property
    def tag(self) -> str:
        """Suffix for per-shard files (empty when there is one shard)."""
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"

    def combine(self, inner: Shard) -> Shard:
        """Split this shard further (e.g. a SLURM task among its torchrun ranks)."""
        return Shard(self.index * inner.count + inner.index, self.count * inner.count)


def parse_shard(text: str) -> Shard:
    """`"i/n"` -> Shard(i, n)."""
    parts = str(text).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--shard {text!r} is not of the form i/n", hint="e.g. --shard 0/4 (first of four)") from None
    return Shard(index, count)


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """The SLURM array task as a shard (`SLURM_ARRAY_TASK_ID` minus `SLURM_ARRAY_TASK_MIN` of
    `SLURM_ARRAY_TASK_COUNT`), or the whole list outside an array job."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return Shard()
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    except ValueError:
        raise ConfigError("SLURM array variables are not integers",
                          hint="pass --shard i/n explicitly") from None
    return Shard(task - first, count)


def rank_from_env(env: Mapping[str, str] | None = None) -> tuple[Shard, int]:
    """(this torchrun rank as a shard of WORLD_SIZE, LOCAL_RANK for the GPU index); (0/1, 0) otherwise."""
    env = os.environ if env is None else env
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("RANK / WORLD_SIZE / LOCAL_RANK are not integers",
                          hint="launch with torchrun or unset them") from None
    return Shard(rank, world), local


def resolve_shard(option: str | None, env: Mapping[str, str] | None = None) -> tuple[Shard, int]:
    """This process's overall shard (explicit `--shard` or SLURM, then split by torchrun rank) and local rank."""
    outer = parse_shard(option) if option else shard_from_env(env)
    rank, local_rank = rank_from_env(env)
    return outer.combine(rank), local_rank


def select_shard(items: Sequence[T], shard: Shard, key: Callable[[T], str]) -> list[T]:
    """Items of this shard: sort by `key` (a unique id), keep every `count`-th from `index`."""
    ordered = sorted(items, key=key)
    return ordered[shard.index::shard.count]
