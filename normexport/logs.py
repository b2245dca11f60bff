"""The libraries normexport drives, set for one block and restored after it: their loggers' levels
(their warnings and fallbacks are not the user's news) and the environment variables they read."""

from __future__ import annotations

import contextlib
import logging
import os


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...], level: int = logging.ERROR):
    """Raise the level of the named loggers for the block, then restore them."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def scoped_environ(values: dict[str, str | None]):
    """Set (a string) or unset (None) the environment variables in ``values`` for the block,
    then restore each as it was."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
