"""A one-line progress bar on stderr, for the long loops of the library (sparsify) and of the benchmarks."""

from __future__ import annotations

import sys


def progress(done: int, total: int, label: str) -> None:
    """Draw ``done`` of ``total`` with ``label`` over the current stderr line; end the line when done."""
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:<60}")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")
