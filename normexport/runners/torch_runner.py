"""PyTorch eager, the reference every ONNX run is compared with."""

from __future__ import annotations

import numpy as np

from normexport.runners.base import Runner


def to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray):
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def flatten_outputs(out) -> list:
    import torch
    from torch.utils import _pytree as pytree

    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    leaves, _ = pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, module, input_names: list[str], output_names: list[str] | None = None, threads: int | None = None):
        self.module = module
        self.input_names = list(input_names)
        self._output_names = list(output_names) if output_names else None
        self.threads = threads

    def activate(self) -> None:
        import torch

        if self.threads:
            self._old_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def deactivate(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self._old_threads)

    @property
    def output_names(self) -> list[str]:
        return self._output_names or []

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """forward() called with the feed bound by name (normexport.inputs.call_module).
        Outputs take the ONNX model's names where the counts agree; where they do not, they
        are named output_<i> and the comparison reports the mismatch."""
        import torch

        from normexport.inputs import call_module
        from normexport.load import _forward_arg_names

        names = [n for n in self.input_names if n in feed]
        args = {n: to_torch(feed[n]) for n in names}
        positional = not _forward_arg_names(self.module)
        with torch.inference_mode():
            outs = flatten_outputs(call_module(self.module, args, positional=positional))
        names = self._output_names if self._output_names and len(self._output_names) == len(outs) else [f"output_{i}" for i in range(len(outs))]
        return {n: to_numpy(o) for n, o in zip(names, outs)}
