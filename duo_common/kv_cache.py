"""A KV cache that grows in place: appending k tokens writes k positions instead of copying the cache.

transformers' ``DynamicLayer`` appends with ``torch.cat``, which copies the whole cache on every forward
pass: at a few hundred tokens that is a few milliseconds per pass on a CPU, growing with the context, and
paid by every verification round and every drafted token. ``GrowableLayer`` keeps each layer's keys and
values in a buffer with spare room and exposes the filled part as a view, so ``crop`` (a slice) and
``update`` (a write into the spare room) move nothing. Anything that replaces ``keys`` by another tensor
(index_select, reorder) is picked up by the next ``update``, which moves it into a new buffer.

``cache_argument`` passes a cache to a model under the keyword its transformers version takes.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROWTH = 1.5  # a full buffer is replaced by one this much larger (amortised O(1) appends)
ROUND_TO = 64  # capacities are multiples of this many positions


def _capacity_for(needed: int, current: int) -> int:
    wanted = max(needed, int(current * GROWTH))
    return -(-wanted // ROUND_TO) * ROUND_TO


def _is_prefix_view(view: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    return (buffer is not None and view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
            and view.shape[:-2] == buffer.shape[:-2])


class GrowableLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of the first positions of larger buffers."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        length = self.get_seq_length() if self.is_initialized else 0
        needed = length + key_states.shape[-2]
        keys, values = self.room_for(key_states, value_states)
        keys[..., length:needed, :].copy_(key_states)
        values[..., length:needed, :].copy_(value_states)
        return self.filled_to(needed)

    def room_for(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers, with room after the filled positions for states shaped like these
        (which are not written: a caller writing the buffers itself then calls ``filled_to``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        fits = (_is_prefix_view(self.keys, self._key_buffer) and _is_prefix_view(self.values, self._value_buffer)
                and needed <= self._key_buffer.shape[-2])
        if not fits:
            current = 0 if self._key_buffer is None else self._key_buffer.shape[-2]
            capacity = _capacity_for(needed, current)
            self._key_buffer = self._moved_into_buffer(self.keys, key_states, length, capacity)
            self._value_buffer = self._moved_into_buffer(self.values, value_states, length, capacity)
        return self._key_buffer, self._value_buffer

    def filled_to(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values are now the buffers' first ``length`` positions."""
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]
        return self.keys, self.values

    @staticmethod
    def _moved_into_buffer(old: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
        if length:
            buffer[..., :length, :].copy_(old)
        return buffer

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


def cache_argument(model: torch.nn.Module, cache: DynamicCache) -> dict:
    """``cache`` as the keyword argument ``model``'s forward takes it: ``cache=`` from transformers 5.24 on (where
    ``past_key_values=`` is deprecated and logs a warning), ``past_key_values=`` before (which ignore ``cache=``)."""
    return {"cache" if _forward_takes_cache(type(model)) else "past_key_values": cache}


@functools.cache
def _forward_takes_cache(model_class: type) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def new_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain (full-attention) layers grow in place; sliding-window and
    other special layers keep transformers' own classes."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowableLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
