"""Seq-first KV cache behind transformers' `Cache` interface.

Each layer stores keys and values as `[B, S, Hk, D]` (sequence before heads), the layout the
skipgpt attention kernels read. Two kinds:
- `SeqFirstLayer` grows its capacity by doubling, so a decode step writes in place instead of
  concatenating the whole cache; its fill level is a host int.
- `StaticSeqFirstLayer` is preallocated to `max_cache_len` and keeps its fill level in a device
  tensor: a decode step reads and advances it on the GPU, so the step has no host state and can
  be captured in a CUDA graph.
`generate()` works unchanged: a routed layer that receives a fresh Hugging Face cache swaps its
empty layer for the seq-first kind that matches (static for a `StaticCache`).
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
        self.make_room(batch, new_tokens, num_heads, head_dim, dtype, device)
        start = torch.full((1,), self.length, dtype=torch.int64, device=self.keys.device)
        self.length += new_tokens
        return self.keys, self.values, start

    def make_room(self, batch: int, new_tokens: int, num_heads: int, head_dim: int, dtype, device) -> None:
        """Allocate or grow the buffers so that `new_tokens` more slots fit, claiming none.
        skipgpt.compile's entry calls it before a compiled step: growing copies the filled
        slots into new buffers, which a compiled graph cannot trace at symbolic sizes."""
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

    def fits(self, new_tokens: int, window: int) -> bool:
        """Whether every slot this step can reach stays within an attention window of `window`."""
        return self.length + new_tokens <= window


class StaticSeqFirstLayer(SeqFirstLayer):
    """A preallocated layer of `max_cache_len` slots whose fill level lives on the device.

    `fill` ([1] int64) is read and advanced on the GPU, so steps neither sync nor change host
    state. Writing past `max_cache_len` trips a device-side assert (as transformers'
    StaticCache's index_copy_ does) rather than dropping tokens silently.
    """

    is_compileable = True

    def __init__(self, max_cache_len: int):
        super().__init__()
        self.max_cache_len = int(max_cache_len)
        self.fill = torch.zeros(1, dtype=torch.int64)

    def make_room(self, batch: int, new_tokens: int, num_heads: int, head_dim: int, dtype, device) -> None:
        """Allocate the buffers (see `allocate`); a static cache never grows: `reserve` checks that a
        step fits, on the device."""
        self.allocate(batch, num_heads, head_dim, dtype, device)

    def allocate(self, batch: int, num_heads: int, head_dim: int, dtype, device) -> None:
        """Allocate the `[batch, max_cache_len, num_heads, head_dim]` buffers now (no-op once
        allocated). Done outside compiled code, the buffers are marked as static addresses, so
        compiled steps and their CUDA graphs update them in place; buffers first allocated while
        tracing would be graph outputs instead, and later CUDA-graphed steps that write them would
        be skipped (mutated inputs). `skipgpt.compile.compile_model` calls this before its
        compiled forward; generate()'s eager prefill allocates before the compiled decode steps."""
        if self.is_initialized:
            return
        self._allocate(batch, self.max_cache_len, num_heads, head_dim, dtype, device)
        self.fill = self.fill.to(self.keys.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.fill):
                torch._dynamo.mark_static_address(t)
            # Under dynamic=True every dim of an input is symbolic unless marked. Batch and
            # capacity may vary (no recompile for a new prompt length); heads and head dim are
            # the model's. fill's length 1 must be static: size-oblivious tracing would not let
            # a symbolic length broadcast against the step's positions.
            for t in (self.keys, self.values):
                torch._dynamo.mark_static(t, 2)
                torch._dynamo.mark_static(t, 3)
            torch._dynamo.mark_static(self.fill, 0)

    def reserve(self, batch: int, new_tokens: int, num_heads: int, head_dim: int, dtype, device):
        self.allocate(batch, num_heads, head_dim, dtype, device)
        got = (self.keys.shape[0], self.keys.shape[2], self.keys.shape[3])
        if got != (batch, num_heads, head_dim) or self.keys.dtype != dtype:
            raise ValueError(
                f"static KV cache holds (batch, kv heads, head dim) = {got} in {self.keys.dtype}, this step brings "
                f"{(batch, num_heads, head_dim)} in {dtype}"
            )
        start = self.fill.clone()
        self.fill.add_(new_tokens)
        torch._assert_async(self.fill[0] <= self.max_cache_len, "static KV cache overflow: raise max_cache_len")
        return self.keys, self.values, start

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, num_heads, _, head_dim = key_states.shape
        self.allocate(batch, num_heads, head_dim, key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("StaticSeqFirstLayer is written by skipgpt's routed layers only")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self):
        """The fill level as a device tensor (transformers' StaticCache does the same), so
        reading it costs no sync."""
        return self.fill[0] if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.fill.zero_()

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a static seq-first cache cannot be cropped; reset it instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static seq-first cache keeps its batch; use the dynamic SeqFirstCache for beam search")

    batch_repeat_interleave = batch_select_indices

    def fits(self, new_tokens: int, window: int) -> bool:
        return self.max_cache_len <= window


class SeqFirstCache(Cache):
    """A transformers `Cache` whose layers are `SeqFirstLayer`s, or `StaticSeqFirstLayer`s of
    `max_cache_len` slots when that is given."""

    def __init__(self, num_layers: int, max_cache_len: int | None = None):
        make = SeqFirstLayer if max_cache_len is None else (lambda: StaticSeqFirstLayer(max_cache_len))
        super().__init__(layers=[make() for _ in range(num_layers)])


def seq_first_layer(cache: Cache, layer_idx: int) -> SeqFirstLayer:
    """The `SeqFirstLayer` for `layer_idx`, swapped into a fresh transformers cache if needed.

    A fresh transformers static layer becomes a `StaticSeqFirstLayer` of the same size, any
    other fresh layer a `SeqFirstLayer`. Fresh sliding-window layers are swapped too: while the
    sequence fits the window, full causal attention is the same function, and the routed layer
    refuses sequences that do not fit."""
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
    max_cache_len = getattr(layer, "max_cache_len", None)
    layer = cache.layers[layer_idx] = SeqFirstLayer() if max_cache_len is None else StaticSeqFirstLayer(max_cache_len)
    return layer
