"""The runner contract (after Polygraphy's backends): a context manager whose
``infer(feed) -> dict[name, np.ndarray]`` takes the same numpy feed on every backend.
``tests/test_runners.py`` holds every runner to it."""

from __future__ import annotations

import abc

import numpy as np


class Runner(abc.ABC):
    name: str = "runner"

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:  # load / build; may be expensive
        pass

    def deactivate(self) -> None:
        pass

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    @abc.abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def time_once(self, feed: dict[str, np.ndarray]) -> float:
        """Seconds for one inference, measured the way this backend should be (host clock
        around a synchronous call here; CUDA events on GPU backends)."""
        import time

        t = time.perf_counter()
        self.infer(feed)
        return time.perf_counter() - t
