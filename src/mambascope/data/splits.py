"""Train/val/test splits of labelled slides: the CSV's own `split` column, or k folds by case.

k-fold (`folds=k`) is stratified by label and grouped by `case_id` (a patient's slides never straddle
splits), shuffled with a fixed seed. Rows whose CSV split is `test` stay a common test set for every
fold; then fold i validates on part i and trains on the rest. Without a common test set, fold i tests
on part i, validates on part i+1 and trains on the rest, so every slide is tested exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mambascope.data.bags import SlideBag
from mambascope.errors import ConfigError, DataError


@dataclass(frozen=True)
class Split:
    """Indices (into the bag list) of one train/val/test assignment; `name` is `split` or `fold_<i>`."""

    name: str
    train: list[int]
    val: list[int]
    test: list[int]


def given_split(bags: Sequence[SlideBag]) -> Split:
    """The CSV's own split column; it must have train and val rows."""
    parts: dict[str | None, list[int]] = {"train": [], "val": [], "test": [], None: []}
    for i, bag in enumerate(bags):
        parts[bag.split].append(i)
    if parts[None]:
        raise DataError(f"{len(parts[None])} slide(s) have no split value while others do",
                        hint="give every row a split (train/val/test), or drop the column and use --folds")
    for name in ("train", "val"):
        if not parts[name]:
            raise DataError(f"the labels CSV has no `{name}` rows",
                            hint="mark some slides as train and some as val, or use --folds K instead")
    return Split("split", parts["train"], parts["val"], parts["test"])


def kfold_splits(bags: Sequence[SlideBag], folds: int, seed: int) -> list[Split]:
    """Stratified, case-grouped k folds with a fixed seed (see the module docstring for the roles)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    test = [i for i, bag in enumerate(bags) if bag.split == "test"]
    pool = np.asarray([i for i, bag in enumerate(bags) if bag.split != "test"])
    if not test and folds < 3:
        raise ConfigError("k-fold without test rows needs --folds 3 or more (test, val and train parts)",
                          hint="use --folds 3+, or mark a common test set with split=test in the CSV")
    cases = np.asarray([bags[i].case_id for i in pool])
    labels = np.asarray([bags[i].label for i in pool])
    if len(set(cases)) < folds:
        raise ConfigError(f"{len(set(cases))} cases cannot be split into {folds} folds",
                          hint="use fewer folds")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    parts = [pool[held].tolist() for _, held in splitter.split(pool, labels, groups=cases)]
    splits = []
    for k in range(folds):
        if test:
            val, fold_test = parts[k], test
        else:
            val, fold_test = parts[(k + 1) % folds], parts[k]
        used = set(val) | set(fold_test)
        train = [int(i) for i in pool if i not in used]
        splits.append(Split(f"fold_{k}", sorted(train), sorted(val), sorted(fold_test)))
    return splits


def make_splits(bags: Sequence[SlideBag], folds: int | None, seed: int) -> list[Split]:
    """`folds` given: k folds; else the CSV's split column (required then)."""
    if folds:
        return kfold_splits(bags, folds, seed)
    if not any(bag.split for bag in bags):
        raise ConfigError("the labels CSV has no split column, so the run needs --folds K",
                          hint="add a split column (train/val/test) or pass --folds 5")
    return [given_split(bags)]
