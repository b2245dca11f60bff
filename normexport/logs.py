"""Quieting the libraries normexport drives: their warnings and fallbacks are not the user's news."""

from __future__ import annotations

import contextlib
import logging


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
