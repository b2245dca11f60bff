"""Values JSON can hold strictly: what every report is written through (normexport.report)."""

from __future__ import annotations


def strict(data):
    """``data`` as strict JSON values: NaN and +/-Inf become the strings "nan", "inf", "-inf"
    (JSON has no such numbers), numpy scalars and arrays become Python numbers and lists."""
    import math

    import numpy as np

    if isinstance(data, dict):
        return {str(k): strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    if isinstance(data, np.ndarray):
        return strict(data.tolist())
    if isinstance(data, np.generic):
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    return data
