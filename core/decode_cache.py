"""A key/value cache for batched decoding whose rows and time columns live in preallocated buffers.

Transformers' ``DynamicLayer`` concatenates the whole cache on every decoding step, and shrinking a
batch with ``index_select`` copies it all again each time one row finishes: for 64 rows of a 135M model
over ~300 columns, ~0.4 GB per finished row. ``SlotLayer`` keeps each layer's keys and values in
buffers of shape (row slots, heads, time capacity, head dim), zero-filled, and exposes the live part
as a view ``buffer[:rows, :, start:end]``:

- a decoding step writes its column in place (a new buffer, with ``_ROOM`` spare columns, only when
  the time capacity runs out);
- rows that finish are replaced by rows from the end of the batch (``compact``): only the moved rows
  are copied, and the row order changes (the caller permutes its own per-row state the same way);
- columns no remaining row needs are dropped by moving ``start`` (``trim``): no copy;
- new rows join right-aligned at the current end (``join``), the columns left of their prompt holding
  stale but finite values that the attention mask hides (zero-filled buffers: never NaN, since a
  masked score's zero weight times NaN would still be NaN).

Virtual-token columns (prefix / prompt tuning) sit in front of a row's real columns (``extra``); they
are never trimmed. Everything reading ``keys``/``values`` sees ordinary (strided) tensors.

Public API: ``use_slot_layers``, ``slot_layers``, ``compact``, ``trim``, ``join``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

_ROOM = 128  # spare time columns a buffer is given when it is (re)allocated


class SlotLayer(DynamicLayer):
    """A ``DynamicLayer`` over preallocated buffers; ``keys``/``values`` are views of their live part."""

    kbuf: torch.Tensor | None = None
    vbuf: torch.Tensor | None = None
    rows = 0  # live rows: slots [0, rows)
    start = 0  # live columns: [start, end)
    end = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n = key_states.shape[-2]
        if not self.is_initialized or self.kbuf is None:
            self.lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self.kbuf = key_states.new_zeros(b, h, n + _ROOM, d)
            self.vbuf = value_states.new_zeros(b, value_states.shape[1], n + _ROOM, value_states.shape[3])
            self.rows, self.start, self.end = b, 0, 0
        if key_states.shape[0] != self.rows:
            raise ValueError(f"a batch of {key_states.shape[0]} rows for a cache of {self.rows}")
        if self.end + n > self.kbuf.shape[2]:
            self.reallocate(self.kbuf.shape[0], self.end - self.start + n + _ROOM, 0)
        self.kbuf[:self.rows, :, self.end:self.end + n] = key_states
        self.vbuf[:self.rows, :, self.end:self.end + n] = value_states
        self.end += n
        self.view()
        return self.keys, self.values

    def view(self) -> None:
        """Point ``keys``/``values`` at the live rows and columns."""
        self.keys = self.kbuf[:self.rows, :, self.start:self.end]
        self.values = self.vbuf[:self.rows, :, self.start:self.end]

    def reallocate(self, row_slots: int, columns: int, offset: int) -> None:
        """New zero buffers of ``row_slots`` x ``columns``, the live part copied to start at column ``offset``."""
        width = self.end - self.start
        bufs = []
        for old in (self.kbuf, self.vbuf):
            new = old.new_zeros(row_slots, old.shape[1], columns, old.shape[3])
            new[:self.rows, :, offset:offset + width] = old[:self.rows, :, self.start:self.end]
            bufs.append(new)
        self.kbuf, self.vbuf = bufs
        self.start, self.end = offset, offset + width
        self.view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (in that order): the general path, which copies the live part."""
        if self.kbuf is None:
            return
        keys, values = self.keys[indices], self.values[indices]
        self.rows = keys.shape[0]
        self.kbuf[:self.rows, :, self.start:self.end] = keys
        self.vbuf[:self.rows, :, self.start:self.end] = values
        self.view()


def use_slot_layers(cache: Any) -> Any:
    """Swap a fresh cache's plain ``DynamicLayer``s for ``SlotLayer``s (same behaviour, fewer copies)."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer and not layer.is_initialized:
                layers[i] = SlotLayer()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = SlotLayer
    return cache


def slot_layers(cache: Any, filled: bool = True) -> list[SlotLayer] | None:
    """The cache's layers when every one is a ``SlotLayer`` (``filled``: holding the same live columns); else None.

    Only such caches can be compacted, trimmed and joined here (sliding-window and quantised layers keep
    their own bookkeeping); the decoder shrinks others with ``batch_select_indices`` and never refills them.
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    first = layers[0]
    for layer in layers:
        if type(layer) is not SlotLayer:
            return None
        if not filled:
            continue
        if layer.kbuf is None:
            return None
        if (layer.rows, layer.end - layer.start) != (first.rows, first.end - first.start):
            return None
    return list(layers)


def compact(layers: list[SlotLayer], keep: list[int]) -> list[int]:
    """Keep the rows at positions ``keep``; returns their new order (old positions, new slot by slot).

    Rows already in the first ``len(keep)`` slots stay; each one beyond moves into a finished row's slot.
    """
    k = len(keep)
    kept = set(keep)
    holes = [p for p in range(k) if p not in kept]
    movers = [p for p in keep if p >= k]
    order = list(range(k))
    for h, m in zip(holes, movers):
        order[h] = m
    if holes:
        device = layers[0].kbuf.device
        dst, src = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
    for layer in layers:
        if holes:
            for buf in (layer.kbuf, layer.vbuf):
                buf[dst, :, layer.start:layer.end] = buf[src, :, layer.start:layer.end]
        layer.rows = k
        layer.view()
    return order


def trim(layers: list[SlotLayer], columns: int, extra: int) -> int:
    """Drop the first ``columns`` real time columns (no row needs them); returns how many were dropped.

    Only without virtual-token columns (``extra == 0``): those sit in front and must stay.
    """
    if columns <= 0 or extra:
        return 0
    for layer in layers:
        layer.start += columns
        layer.view()
    return columns


def join(layers: list[SlotLayer], new: list[SlotLayer], extra: int, width: int, new_width: int) -> int:
    """Append the rows of ``new`` (``new_width`` real columns) after the live rows of ``layers`` (``width``).

    The new rows are right-aligned with the old: their ``extra`` virtual columns first, then their
    real columns ending at the common end. Returns how many columns the old rows gained in front
    (when the new rows are wider); the caller pads its attention mask by as much.
    """
    grow = max(0, new_width - width)
    rows = layers[0].rows + new[0].rows
    for layer, other in zip(layers, new):
        room = layer.start >= grow and not extra
        if room and rows <= layer.kbuf.shape[0]:
            layer.start -= grow
        else:
            slots = max(rows, layer.kbuf.shape[0])
            layer.reallocate(slots, layer.end - layer.start + grow + _ROOM, 0)
            if grow:  # move the old real columns right by ``grow``, after the virtual ones
                for buf in (layer.kbuf, layer.vbuf):
                    live = buf[:layer.rows, :, extra:layer.end].clone()
                    buf[:layer.rows, :, extra:extra + grow] = 0
                    buf[:layer.rows, :, extra + grow:layer.end + grow] = live
                layer.end += grow
        lo, hi = layer.rows, rows
        for buf, src in ((layer.kbuf, other.keys), (layer.vbuf, other.values)):
            buf[lo:hi, :, layer.start:layer.end] = 0
            buf[lo:hi, :, layer.start:layer.start + extra] = src[:, :, :extra]
            buf[lo:hi, :, layer.end - new_width:layer.end] = src[:, :, extra:]
        layer.rows = rows
        layer.view()
    return grow
