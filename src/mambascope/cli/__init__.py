"""The `mambascope` command line: one module per command group, each thin over the library.

A module here exposes `COMMANDS` (click commands added to the root) and/or `TRAIN_COMMANDS`
(added under `mambascope train`); `main.py` collects them, so adding a command touches one file.
"""
