"""Hugging Face folders (config.json + safetensors) in, a KV-cache decoder folder out.

    is_hf_folder(path)            a directory holding config.json
    convert_folder(path, opts)    load -> export with the KV cache -> fuse -> check generation
    OnnxDecoder(folder).generate  greedy decoding on onnxruntime over the KV contract

transformers is imported only by the modules that need it (the ``hf`` extra).
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_NAME = "config.json"
ATTENTION_CHOICES = ("auto", "gqa", "generic")  # --attention: auto is GroupQueryAttention for --target ort where the model fits
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hf_folder(path) -> bool:
    """A directory with a config.json or safetensors weights is a Hugging Face model folder
    (checked before any model-file detection: load.py rejects directories)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / CONFIG_NAME).is_file() or any(q.name.endswith(".safetensors") for q in p.iterdir())


def looks_like_hub_id(path) -> bool:
    """``org/name`` that is not on disk: a model hub id (normexport downloads nothing)."""
    p = Path(path)
    return not p.exists() and bool(_HUB_ID.match(str(path))) and not str(path).endswith((".pt", ".pt2", ".pth", ".onnx", ".bin"))


def route_folder(path) -> bool:
    """True for a Hugging Face folder; a hub id that is not on disk is a user error."""
    from normexport.errors import NormexportError
    from normexport.paths import require_usable_path

    require_usable_path(path)
    if looks_like_hub_id(path):
        raise NormexportError(
            f"{path} is not a local folder; normexport downloads nothing",
            f"download it first (e.g. `HF_HUB_OFFLINE=0 hf download {path} --local-dir ./{Path(str(path)).name}`) and pass that folder",
        )
    return is_hf_folder(path)
