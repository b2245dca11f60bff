"""``--factory MODULE:FUNCTION``: the user's code that builds the module for a state_dict.

The factory's module is imported from the working folder (or the ``.py`` file's folder), which is
on ``sys.path`` only while the factory is imported and called: nothing imported later (say,
onnxruntime during validation) can come from a stray file there. Every failure of the factory
is the user's to fix: one line with the cause, exit 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
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
        mod = _import_factory_module(mod_name)
        fn = getattr(mod, func_name, None)
        if not callable(fn):
            raise NormexportError(f"--factory: '{mod_name}' has no function '{func_name}'", "check the name after the colon")
        try:
            out = fn()
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
