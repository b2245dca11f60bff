"""``--factory MODULE:FUNCTION``: the user's code that builds the module for a state_dict.

The factory's module is imported from the working folder (or the ``.py`` file's folder), which is
on ``sys.path`` only while the factory is imported and called: nothing imported later (say,
onnxruntime during validation) can come from a stray file there. Every failure of the factory
is the user's to fix: one line with the cause, exit 2, ``SystemExit`` and a ``KeyboardInterrupt``
it raises itself included (a Ctrl-C or SIGTERM that arrives meanwhile still interrupts).
``factory_source`` finds the factory's file without running it: an input the outputs must not
overwrite, however the factory is spelled.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
from importlib.machinery import PathFinder
from pathlib import Path

from normexport.errors import NormexportError, first_line


def call_factory(factory: str):
    """Import and call ``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``).

    Returns (module, example_inputs or None). The factory may return a module, or a
    (module, example_inputs dict) pair. Any failure of the factory is the user's: one line.
    """
    import torch

    if factory.count(":") != 1 or not all(factory.split(":")):
        raise NormexportError(f"malformed --factory '{factory}'", "use --factory MODULE:FUNCTION, e.g. models.zoo:llama")
    mod_name, func_name = factory.split(":")
    saved_path = list(sys.path)
    try:
        # The factory's folder is searched first for its own imports, now and when it runs.
        sys.path.insert(0, str(Path(mod_name).resolve().parent) if mod_name.endswith(".py") else os.getcwd())
        with _own_exits(f"--factory: importing '{mod_name}'"):
            mod = _import_factory_module(mod_name)
        fn = getattr(mod, func_name, None)
        if not callable(fn):
            raise NormexportError(f"--factory: '{mod_name}' has no function '{func_name}'", "check the name after the colon")
        try:
            with _own_exits(f"--factory {factory}"):
                out = fn()
        except NormexportError:
            raise
        except Exception as e:
            raise NormexportError(f"--factory {factory} raised {type(e).__name__}: {first_line(e)}", "fix the factory (call it in Python to see the traceback)") from e
    finally:
        sys.path[:] = saved_path  # nothing imported later comes from the working folder
    example = None
    if isinstance(out, tuple) and len(out) == 2:
        out, example = out
    if not isinstance(out, torch.nn.Module):
        raise NormexportError(f"--factory {factory} returned {type(out).__name__}, not an nn.Module", "return the module (optionally with an example-inputs dict)")
    if example is not None and not (isinstance(example, dict) and all(isinstance(v, torch.Tensor) for v in example.values())):
        raise NormexportError(f"--factory {factory}: example inputs must be a dict of name -> tensor", "return (module, {'input_ids': tensor})")
    return out, example


def factory_source(factory: str | None) -> Path | None:
    """The file the factory's module is imported from (``file.py:fn``, ``pkg.mod:fn``), found
    as the import would find it but without running anything; None when it cannot be told
    (a built-in module, a malformed spec: the import reports those)."""
    if not factory or factory.count(":") != 1:
        return None
    mod_name = factory.split(":")[0]
    if mod_name.endswith(".py"):
        return Path(mod_name)
    loaded = sys.modules.get(mod_name)
    if loaded is not None:
        f = getattr(loaded, "__file__", None)
        return Path(f) if f else None
    parts = mod_name.split(".")
    try:
        spec = PathFinder.find_spec(parts[0], [os.getcwd(), *sys.path])
        for i in range(1, len(parts)):
            if spec is None or not spec.submodule_search_locations:
                return None
            spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    except (ImportError, ValueError, OSError):
        return None
    if spec is None or not spec.has_location or not spec.origin:
        return None
    return Path(spec.origin)


@contextlib.contextmanager
def _own_exits(what: str):
    """``SystemExit`` or ``KeyboardInterrupt`` raised by the factory's code is its failure (exit 2);
    one that comes from a signal (Ctrl-C, SIGTERM) is an interrupt and passes."""
    signalled: list[int] = []
    restore = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)

        def _interrupt(signum, frame):
            if previous is signal.SIG_IGN:
                return
            signalled.append(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt

        try:
            signal.signal(signal.SIGINT, _interrupt)
            restore = previous
        except (ValueError, TypeError):
            restore = None
    try:
        yield
    except (SystemExit, KeyboardInterrupt) as e:
        from normexport.outputs import Terminated

        if signalled or isinstance(e, Terminated):
            raise
        detail = f" ({e.code})" if isinstance(e, SystemExit) and e.code is not None else f": {first_line(e)}" if str(e) else ""
        raise NormexportError(f"{what} raised {type(e).__name__}{detail}", "a factory returns the module (or (module, inputs)); it must not exit or interrupt") from None
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)


def _import_factory_module(mod_name: str):
    """Import the factory's module (a dotted name, or a .py file); its failures are one line."""
    try:
        if mod_name.endswith(".py"):
            from normexport.paths import require_regular_file

            file = require_regular_file(mod_name, "factory .py")
            spec = importlib.util.spec_from_file_location(file.stem, file)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        return importlib.import_module(mod_name)
    except NormexportError:
        raise
    except ModuleNotFoundError as e:
        raise NormexportError(f"--factory: cannot import '{mod_name}' ({e})", "run from the folder that holds it, or put it on PYTHONPATH") from None
    except SyntaxError as e:
        where = f"{Path(e.filename).name}:{e.lineno}" if e.filename else mod_name
        raise NormexportError(f"--factory: '{mod_name}' has a syntax error ({where}: {e.msg})", "fix the factory's source") from None
    except Exception as e:
        raise NormexportError(f"--factory: importing '{mod_name}' raised {type(e).__name__}: {first_line(e)}", "fix the factory's module (import it in Python to see the traceback)") from e
