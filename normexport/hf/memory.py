"""Handing memory back to the kernel between the steps of a folder conversion, so that
transformers' weights and onnxruntime's session are not resident at once."""

from __future__ import annotations


def page_out_weights(hf) -> None:
    """Hand the resident pages of the folder's memory-mapped weight files back to the kernel:
    their contents do not change, a later read faults them in again from the file. A mapping
    none of whose pages was written (smaps' ``Anonymous: 0 kB``) is dropped at once
    (``MADV_DONTNEED``: nothing private is lost); one holding written pages is only advised
    (``MADV_PAGEOUT``, which keeps them). Linux only; elsewhere, or where the kernel refuses,
    nothing happens."""
    import ctypes
    import mmap
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    root = os.path.realpath(hf.path) + os.sep
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mappings, current = [], None
    for line in lines:
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
            current = None
            if len(parts) == 6 and parts[5].startswith(root) and parts[5].endswith((".safetensors", ".bin")):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                current = [lo, hi, None]
                mappings.append(current)
        elif current is not None and parts[:1] == ["Anonymous:"]:
            current[2] = int(parts[1])
    for lo, hi, written in mappings:
        advice = mmap.MADV_DONTNEED if written == 0 else getattr(mmap, "MADV_PAGEOUT", None)
        if advice is not None:
            madvise(lo, hi - lo, advice)


def trim_heap() -> None:
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim``): a freed
    onnxruntime session's buffers otherwise stay resident where the allocator placed them on
    the heap. Elsewhere nothing happens."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
