"""The runner contract (after Polygraphy's backends): a context manager whose
``infer(feed) -> dict[name, np.ndarray]`` takes the same numpy feed on every backend.
``tests/test_runners.py`` holds every runner to it. ``Backend`` is the record of a backend
(``normexport.runners`` lists them): a runner is built from one and reads it."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[..., Runner]  # (record, model, optimize, threads, dtype, **kw) -> Runner
    help: str
    providers: tuple[str, ...] = ()  # onnxruntime's execution providers, in order; () = not onnxruntime
    plugin_targets: tuple[str, ...] = ()  # targets only backends naming them run (beside every portable one)
    fold_residual: bool = True  # folding a residual Add into the fused norm pays off here
    residual_why: str = ""  # why (the report shows it when ``--residual-fusion auto`` chose)
    contrib_ops: bool = False  # runs onnxruntime's com.microsoft ops (MatMulNBits, GatherBlockQuantized: --quantize)
    cpu: bool = False  # runs on the host CPU (onnxruntime's CPU kernels: the profiler's view of the unfused model is the CPU's)

    @property
    def onnxruntime(self) -> bool:
        """onnxruntime runs it: its profiler measures the norm share, and localisation can run on it."""
        return bool(self.providers)

    def runs(self, target) -> bool:
        """Whether this backend runs ``target`` (a target's record or name)."""
        from normexport.fuse.registry import target_record

        record = target_record(target)
        return record.portable or record.name in self.plugin_targets

    def check_available(self) -> None:
        """An onnxruntime backend whose first execution provider this onnxruntime lacks is the
        user's error (exit 2), found before a session is built."""
        if not self.providers:
            return
        import onnxruntime as ort

        from normexport.errors import NormexportError

        available = ort.get_available_providers()
        if self.providers[0] not in available:
            raise NormexportError(
                f"backend {self.name} needs onnxruntime's {self.providers[0]}, which this onnxruntime lacks (it has {', '.join(available)})",
                "install onnxruntime-gpu in place of onnxruntime (pip uninstall onnxruntime && pip install 'normexport[gpu]')",
            )
