"""The one cache directory every layer writes under (models, artifacts, kernels, exports)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SLIMSERVE_CACHE", Path.home() / ".cache" / "slimserve"))
