"""The norm modules of a PyTorch model in memory: a model whose only norms are LayerNorms is
refused from its module tree, before any export, with the way to convert it (ln2rms)."""

from __future__ import annotations

import inspect
from pathlib import Path

# Code that computes a root mean square (or calls a norm that does): where a forward spells one
# of these, the module tree cannot rule out an RMSNorm written inline.
RMS_SPELLINGS = ("rsqrt", "rms", "pow(2", "**2", "** 2", "square", ".norm(", "mean(")


def layer_norm_paths(module) -> list[str]:
    """Paths of the torch.nn.LayerNorm modules (mean-subtracting: not an RMSNorm)."""
    import torch

    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.LayerNorm)]


def may_hold_rmsnorm(module) -> bool:
    """False only where the model provably has no RMSNorm: no norm module but LayerNorms, and no
    forward whose source spells a root mean square. Anything it cannot read counts as maybe."""
    import torch

    if isinstance(module, torch.jit.ScriptModule) or isinstance(module, torch.fx.GraphModule):
        return True  # compiled or traced: the module tree is not the model's code
    seen = set()
    for _, m in module.named_modules():
        cls = type(m)
        if isinstance(m, torch.nn.LayerNorm):
            continue
        if "norm" in cls.__name__.lower() and not isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)):
            return True  # an RMSNorm class, or one that may be (T5LayerNorm is one)
        if cls in seen or cls.__module__.startswith("torch.nn."):
            continue
        seen.add(cls)
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            return True
        if any(s in source.replace(" ", "") or s in source for s in RMS_SPELLINGS):
            return True
    return False


def refuse_without_rmsnorm(module, source: str, path=None, factory: str | None = None) -> None:
    """A model in memory with LayerNorms and provably no RMSNorm: exit 2 before any export.
    ``path``: the model's file or folder (the hint names the command), None for a module given
    to the API; ``factory``: the --factory that builds it (the hint repeats it)."""
    from normexport.errors import NormexportError

    norms = layer_norm_paths(module)
    if norms and not may_hold_rmsnorm(module):
        raise NormexportError(
            f"no RMSNorm in {source}: its {len(norms)} norm module(s) are LayerNorms ({', '.join(norms[:3])}{', ...' if len(norms) > 3 else ''}), which subtract the mean",
            ln2rms_hint(path, factory),
        )


def ln2rms_hint(path=None, factory: str | None = None) -> str:
    """The way to ln2rms: the command for a model file, the API for a module in memory or a
    Hugging Face folder (the command takes files)."""
    given = f" --factory {factory}" if factory else ""
    if path is not None and Path(path).is_dir():
        how = f"`normexport.ln2rms(transformers.AutoModelForCausalLM.from_pretrained('{path}', use_cache=False).eval(), {{'input_ids': ids}})`"
    elif path is not None:
        how = f"`normexport ln2rms {path}{given} -o model.rms.pt2`"
    else:
        how = "`normexport.ln2rms(module, example_inputs)`"
    return f"{how} converts a Pre-LN model into an equivalent Pre-RMSNorm one, which normexport fuses"
