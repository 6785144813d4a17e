"""Reading and writing tensor files without holding more than one tensor in memory."""

from .source import TensorMeta, TensorSource, open_files

__all__ = ["TensorMeta", "TensorSource", "open_files"]
