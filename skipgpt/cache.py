"""Seq-first KV cache behind transformers' `Cache` interface.

Each layer stores keys and values as `[B, S, Hk, D]` (sequence before heads), the layout the
skipgpt attention kernels read, and grows its capacity by doubling so a decode step writes in
place instead of concatenating the whole cache. `generate()` works unchanged: a routed layer that
receives a fresh Hugging Face cache swaps its empty layer entry for a `SeqFirstLayer`.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

MIN_CAPACITY = 256


class SeqFirstLayer(CacheLayerMixin):
    """One decoder layer's cache. `length` (a host int) is the number of filled slots."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.length = 0

    # -- what the routed layer uses -------------------------------------------------------
    def reserve(self, batch: int, new_tokens: int, num_heads: int, head_dim: int, dtype, device):
        """Make room for `new_tokens` more slots and claim them.

        Returns (keys, values, start): the `[B, S, Hk, D]` buffers (S >= length) and `start`, a
        `[1]` int64 device tensor holding the first claimed slot (filled by `torch.full`, a
        device-side fill, so no host-to-device copy and no sync).
        """
        needed = self.length + new_tokens
        if not self.is_initialized:
            self._allocate(batch, max(MIN_CAPACITY, needed), num_heads, head_dim, dtype, device)
        else:
            expected = (batch, num_heads, head_dim)
            got = (self.keys.shape[0], self.keys.shape[2], self.keys.shape[3])
            if expected != got:
                raise ValueError(
                    f"KV cache holds (batch, kv heads, head dim) = {got}, this step brings {expected}; "
                    "use a new cache for a new batch"
                )
            if self.keys.dtype != dtype or self.keys.device != torch.device(device):
                raise ValueError(
                    f"KV cache holds {self.keys.dtype} on {self.keys.device}, this step brings {dtype} on {device}"
                )
            if needed > self.keys.shape[1]:
                self._grow(max(needed, 2 * self.keys.shape[1]))
        start = torch.full((1,), self.length, dtype=torch.int64, device=self.keys.device)
        self.length = needed
        return self.keys, self.values, start

    def _allocate(self, batch, capacity, num_heads, head_dim, dtype, device):
        self.keys = torch.zeros(batch, capacity, num_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.device = self.keys.device
        self.is_initialized = True

    def _grow(self, capacity: int) -> None:
        old_k, old_v = self.keys, self.values
        batch, _, num_heads, head_dim = old_k.shape
        self._allocate(batch, capacity, num_heads, head_dim, old_k.dtype, old_k.device)
        self.keys[:, : self.length] = old_k[:, : self.length]
        self.values[:, : self.length] = old_v[:, : self.length]

    # -- transformers' CacheLayerMixin ------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, num_heads, _, head_dim = key_states.shape
        self._allocate(batch, MIN_CAPACITY, num_heads, head_dim, key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' head-first API ([B, Hk, L, D] in, [B, Hk, length, D] views out), for
        code that is not a routed layer."""
        batch, num_heads, new_tokens, head_dim = key_states.shape
        keys, values, _ = self.reserve(batch, new_tokens, num_heads, head_dim, key_states.dtype, key_states.device)
        first = self.length - new_tokens
        keys[:, first : self.length] = key_states.transpose(1, 2)
        values[:, first : self.length] = value_states.transpose(1, 2)
        return keys[:, : self.length].transpose(1, 2), values[:, : self.length].transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name older transformers releases call
        return -1

    def reset(self) -> None:
        self.length = 0

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` slots (a negative value drops that many from the end)."""
        self.length = max(0, self.length + max_length if max_length < 0 else min(self.length, max_length))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, indices.to(self.keys.device))
            self.values = self.values.index_select(0, indices.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)


class SeqFirstCache(Cache):
    """A transformers `Cache` whose layers are `SeqFirstLayer`s."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[SeqFirstLayer() for _ in range(num_layers)])


def seq_first_layer(cache: Cache, layer_idx: int) -> SeqFirstLayer:
    """The `SeqFirstLayer` for `layer_idx`, swapped into a fresh transformers cache if needed.

    A fresh sliding-window layer is swapped too: while the sequence fits the window, full causal
    attention is the same function, and the routed layer refuses sequences that do not fit."""
    while len(cache.layers) <= layer_idx:
        cache.layers.append(SeqFirstLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, SeqFirstLayer):
        return layer
    if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
        raise ValueError(
            f"layer {layer_idx} of the {type(cache).__name__} already holds head-first K/V "
            f"({type(layer).__name__}); routed layers need a seq-first cache: pass "
            "skipgpt.SeqFirstCache(num_layers) or a fresh cache"
        )
    layer = cache.layers[layer_idx] = SeqFirstLayer()
    return layer
