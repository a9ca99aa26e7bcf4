"""Logging that only the main process does (tqdm bars likewise)."""
from __future__ import annotations

import sys
from typing import Callable


def make_log(is_main: bool) -> Callable[..., None]:
    if not is_main:
        return lambda *args, **kwargs: None

    def log(*args: object) -> None:
        print(*args, file=sys.stderr, flush=True)

    return log


def make_result(is_main: bool) -> Callable[..., None]:
    """Results (a metrics table, the path written) go to stdout, apart from the logs and bars on stderr."""
    if not is_main:
        return lambda *args, **kwargs: None

    def result(*args: object) -> None:
        print(*args, flush=True)

    return result
