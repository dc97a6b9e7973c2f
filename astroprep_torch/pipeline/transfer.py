"""How product tensors reach the writer process: large ones through shared-memory buffers reused
frame after frame (:class:`_SharedSlots`), small ones and catalog columns pickled by value
(:func:`_portable` on the sending side, :func:`_unportable` in the writer process)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..detect import Catalog

#: Product tensors from this size on reach the writer process through reused shared-memory slots;
#: smaller ones (catalog columns) are pickled by value.
_SLOT_MIN_BYTES = 1 << 20


class _SharedSlots:
    """Shared-memory buffers, reused frame after frame, that carry large product tensors to the
    writer process.

    Handing a tensor to another process moves it into new shared memory: a copy into fresh pages
    (page faults, zeroing) in this process and a new mapping in the writer, about 25k page faults per
    100 MB on either side, every frame. Here each product key owns ``ring`` grow-only buffers,
    shared once; a frame's tensor is copied into the buffer of its turn and sent as a view of it.
    The writer keeps the buffers it received mapped (torch's shared-storage cache finds them again
    by file identity), so a frame costs one copy into pages already mapped on both sides.

    ``ring`` must be at least the number of batches that may wait for the writer: a buffer is
    reused only when the batch that last used it has been reported written.
    """

    def __init__(self, ring: int):
        self.ring = max(1, int(ring))
        self.turn = 0
        self.buffers: dict[str, list] = {}

    def next_turn(self) -> None:
        self.turn = (self.turn + 1) % self.ring

    def put(self, key: str, t: Tensor) -> Tensor:
        nbytes = t.numel() * t.element_size()
        ring = self.buffers.setdefault(key, [None] * self.ring)
        buf = ring[self.turn]
        if buf is None or buf.numel() < nbytes:
            grow = nbytes if buf is None else nbytes + nbytes // 4  # a growing product (cutouts) grows once
            buf = ring[self.turn] = torch.empty(grow, dtype=torch.uint8).share_memory_()
        out = buf[:nbytes].view(t.dtype).view(t.shape)
        out.copy_(t.detach())
        return out


def _portable(value, slots: _SharedSlots, key: str):
    """A product as the writer process gets it: large tensors in ``slots``, small ones and catalog
    columns as numpy arrays (pickled by value: no file descriptor to pass per column).
    :func:`_unportable` turns it back."""
    if isinstance(value, Tensor):
        if value.numel() * value.element_size() >= _SLOT_MIN_BYTES:
            return slots.put(key, value)
        return _by_value(value)
    if isinstance(value, Catalog):
        return ("catalog", {k: _by_value(v) for k, v in value.columns.items()})
    return value


def _by_value(t: Tensor):
    """A small tensor as a numpy array (pickled by value); dtypes numpy lacks (bfloat16) stay tensors."""
    t = t.detach().cpu()
    try:
        return t.numpy()
    except TypeError:
        return t


def _unportable(value):
    """The writer process's side of :func:`_portable`: tensors and catalogs again."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "catalog":
        return Catalog({k: _unportable(v) for k, v in value[1].items()}, None)
    return value
