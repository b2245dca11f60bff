"""Load a local Hugging Face folder with transformers; nothing is downloaded, nothing
untrusted runs.

- safetensors weights (one file, or shards with ``model.safetensors.index.json``) load as is;
- pickled ``.bin`` weights need ``--trust-pickle`` (loaded with use_safetensors=False);
- custom modeling code (``auto_map`` in config.json) needs ``--trust-remote-code``;
- mixture-of-experts models run their experts with ``batched_mm``, which exports where the
  default ``grouped_mm`` (a custom op with no ONNX translation) does not.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normexport.errors import NormexportError, first_line
from normexport.hf import CONFIG_NAME
from normexport.hf import config_checks as checks

TASKS = ("text-generation-with-past", "text-generation", "feature-extraction")
EXPERTS_IMPLEMENTATION = "batched_mm"
SAFETENSORS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass
class HFModel:
    module: Any  # the transformers PreTrainedModel, eval mode
    config: Any
    path: Path
    task: str
    architecture: str
    weights: str  # "safetensors" | "pickle"
    notes: list[str] = field(default_factory=list)

    @property
    def text_config(self):
        return self.config.get_text_config(decoder=True)


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormexportError(f"{cfg_path}: not a readable JSON config ({first_line(e, 200)})", "save the model again with save_pretrained") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise NormexportError(f"{cfg_path} has no model_type: not a transformers config", "save the model with save_pretrained (it writes model_type)")
    return data


def read_generation_config(path: Path) -> dict | None:
    """generation_config.json, when the folder has one: a JSON object, else exit 2 (its
    settings never fail the check; a file transformers cannot read is still a broken folder)."""
    gen_path = path / GENERATION_CONFIG
    if not gen_path.exists():
        return None
    try:
        data = json.loads(gen_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormexportError(f"{gen_path}: not a readable JSON file ({first_line(e, 200)})", "fix it, or remove it (the model's config.json then gives the EOS id)") from None
    if not isinstance(data, dict):
        raise NormexportError(f"{gen_path} holds a JSON {type(data).__name__}, not an object of generation settings", "fix it, or remove it (the model's config.json then gives the EOS id)")
    return data


def weight_format(path: Path, trust_pickle: bool) -> str:
    """"safetensors" or "pickle", or a NormexportError for a folder without usable weights."""
    names = {p.name for p in path.iterdir() if p.is_file()}
    if SAFETENSORS_INDEX in names or any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if PICKLE_INDEX in names or any(n.endswith(".bin") for n in names):
        if not trust_pickle:
            raise NormexportError(
                f"{path} holds pickled .bin weights only: loading them can run code from the files",
                "only if you trust them, pass --trust-pickle (or re-save with save_pretrained(safe_serialization=True))",
            )
        return "pickle"
    raise NormexportError(f"{path} has a config.json but no weights (*.safetensors)", "save the model with save_pretrained(DIR) (weights and config together)")


def default_task(config: dict) -> str:
    archs = config.get("architectures") or []
    return "text-generation-with-past" if any(a.endswith("ForCausalLM") for a in archs) or not archs else "feature-extraction"


def load_folder(path: Path, task: str | None = None, dtype: str | None = None, trust_pickle: bool = False, trust_remote_code: bool = False) -> HFModel:
    """Check the folder, then build the model with transformers from local files only."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise NormexportError(f"{path} has no {CONFIG_NAME}: not a Hugging Face model folder", "pass the folder save_pretrained wrote (config.json and weights)")
    raw = read_config(path)
    if raw.get("auto_map") and not trust_remote_code:
        raise NormexportError(
            f"{path} uses custom modeling code (auto_map in config.json): loading it runs Python from the folder",
            "only if you trust it, pass --trust-remote-code",
        )
    weights = weight_format(path, trust_pickle)
    read_generation_config(path)
    task = task or default_task(raw)
    if task not in TASKS:
        raise NormexportError(f"unknown --task '{task}'", f"one of {', '.join(TASKS)}")
    try:
        import transformers
    except ImportError:
        raise NormexportError("Hugging Face folders need transformers", "pip install 'normexport[hf]'") from None
    import torch

    from safetensors import SafetensorError  # a corrupt or truncated weights file

    auto = transformers.AutoModel if task == "feature-extraction" else transformers.AutoModelForCausalLM
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    with offline(), quiet_transformers():
        config = build_config(path, raw, trust_remote_code)
        source = str(path / CONFIG_NAME)
        tensors = checks.safetensors_tensors(path) if weights == "safetensors" else checks.pickle_tensors(path)
        checks.check_fits(path, checks.text_config(config, source), torch_dtype.itemsize, source, tensors=tensors)
        checks.check_against_weights(meta_shapes(auto, config, trust_remote_code, path), tensors, torch_dtype.itemsize, source)
        kwargs = dict(config=config, local_files_only=True, trust_remote_code=trust_remote_code, use_safetensors=weights == "safetensors", dtype=torch_dtype, output_loading_info=True, ignore_mismatched_sizes=True)
        try:
            module, info = auto.from_pretrained(str(path), **kwargs)
        except (OSError, SafetensorError) as e:
            raise NormexportError(f"transformers cannot build {path}: {first_line(e)}", "is the folder complete (config and all weight shards) and is the architecture known to this transformers?") from None
        except Exception as e:  # its validation of the config or the weights, in whatever form
            raise NormexportError(f"transformers cannot build {path}: {first_line(e)}", "check config.json against the weights (save the model again with save_pretrained)") from None
    head_dropped = task == "feature-extraction"  # the base model of a checkpoint with a head
    require_checkpoint_weights(path, type(module).__name__, info, getattr(module, "base_model_prefix", "") if head_dropped else None)
    module.eval()
    notes = []
    if weights == "pickle":
        notes.append("weights unpickled from .bin files (--trust-pickle)")
    if getattr(module, "_can_set_experts_implementation", lambda: False)():
        module.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        notes.append(f"experts run with experts_implementation='{EXPERTS_IMPLEMENTATION}' (the default grouped_mm has no ONNX translation)")
    arch = type(module).__name__
    return HFModel(module, module.config, path, task, arch, weights, notes)


def require_checkpoint_weights(path: Path, arch: str, info: dict, base_prefix: str | None = None) -> None:
    """Every tensor of the model comes from the folder's weights: transformers' loading info
    lists none missing (which it would initialise at random), none unexpected (weights of
    another architecture) and none of another shape. Tied weights are not listed as missing.
    ``base_prefix``: the base model of a checkpoint with a head (``--task feature-extraction``
    of a causal LM) was loaded; the head's weights (every tensor outside that prefix, e.g.
    ``lm_head.weight``) are left out on purpose and are not unexpected."""
    problems = []
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if base_prefix is not None:
        unexpected = [k for k in unexpected if base_prefix and k.startswith(f"{base_prefix}.")]
    mismatched = sorted(str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys") or ())
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise NormexportError(
            f"{path}: the weights do not fit {arch}: tensors {'; '.join(problems)} (transformers would initialise missing or reshaped tensors at random)",
            "save the folder again with save_pretrained (config.json and the weights of the same model)",
        )


def build_config(path: Path, raw: dict, trust_remote_code: bool = False):
    """transformers' config for the folder, after normexport's own checks of its fields
    (config_checks): any failure of transformers' validation is the config's fault (exit 2)."""
    import transformers

    source = str(path / CONFIG_NAME)
    checks.check_raw(raw, source)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # its own validation, in whatever form it raises
        raise NormexportError(f"transformers cannot build {path} from its {CONFIG_NAME} ({type(e).__name__}: {first_line(e)})", checks.HINT) from None
    checks.check_built(config, raw, source)
    return config


def meta_shapes(auto, config, trust_remote_code: bool, path: Path) -> dict[str, tuple]:
    """Name -> shape of every parameter and buffer of the model ``config`` builds, on the meta
    device (no memory, no initialisation)."""
    import torch

    try:
        with torch.device("meta"):
            module = auto.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers' validation of the config, in whatever form it raises
        raise NormexportError(f"transformers cannot build {path} from its {CONFIG_NAME} ({type(e).__name__}: {first_line(e)})", checks.HINT) from None
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@contextlib.contextmanager
def offline():
    """HF_HUB_OFFLINE=1 while transformers loads: a missing local file is an error, never a download."""
    from normexport.logs import scoped_environ

    with scoped_environ({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}):
        yield


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or advice while normexport drives transformers; errors still raise."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
