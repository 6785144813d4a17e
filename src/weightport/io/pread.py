"""Reading a byte range of a file straight into a fresh tensor, with no mapping left behind."""

from __future__ import annotations

import os

import torch


def read_range(fd: int, offset: int, nbytes: int) -> torch.Tensor | None:
    """nbytes from offset as a uint8 tensor, or None if the file ends first."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            return None
        done += got
    return buf

