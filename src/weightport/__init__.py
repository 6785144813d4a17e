"""weightport: convert transformer checkpoints between frameworks, streaming and verified."""

from __future__ import annotations

from .version import __version__
__all__ = ["WeightportError", "convert", "inspect", "plan_conversion", "support_matrix", "__version__"]

_API = {"convert", "inspect", "plan_conversion", "support_matrix"}


def __getattr__(name: str):
    # torch is imported on first use, so the CLI can set allocator options before it loads
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "WeightportError":
        from .errors import WeightportError

        return WeightportError
    raise AttributeError(f"module 'weightport' has no attribute {name!r}")
