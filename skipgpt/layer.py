"""The routed decoder layer: a Hugging Face decoder layer whose tokens may skip attention and/or
the MLP, computed by one of three pipelines (DESIGN.md section 2).

The layer keeps the original submodules under their original names (self_attn, mlp,
input_layernorm, post_attention_layernorm) and adds router_attention / router_mlp, so state-dict
keys stay those of the base model plus those of the published router checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import SeqFirstLayer, seq_first_layer
from .families import family_for
from .ops.rope.reference import rotate_half
from .routing import RoutingState

PIPELINES = ("dense", "torch-sparse", "triton-sparse")
# triton-sparse's capacity form projects Q/K/V in one launch (qkv_rope_write) from this many
# tokens per step. Decode-sized steps keep the separate ops: replayed in a CUDA graph, where
# launches cost nothing, the fused kernel's decode tiles took ~1.8x their GPU time (64 decode
# steps at B=1-64: 4-6% slower; docs/BENCHMARKS.md).
FUSED_QKV_MIN_TOKENS = 65
# ... and up to this many. Above, the fused kernel costs more GPU time than cuBLAS K/V plus the Q
# GEMM, more than its saved launches are worth: whole layer steps of 4096-16384 tokens took 3-14%
# longer with it (H100, 0-50% skip; at 2048 tokens the runs disagreed; docs/BENCHMARKS.md, eighth
# session). Capacity-form steps of 1025 to capacity_max_tokens (2048 by default) tokens take the
# separate ops, as the steps that set that default did (tools/form_sweep.py --steady).
FUSED_QKV_MAX_TOKENS = 1024
# Under torch.cond (compile_model without CUDA graphs) the token count is symbolic, and the
# capacity form's GEMMs take fixed tiles (ops' tile_rows), so that Inductor launches them rather
# than calling each op through the dispatcher (70-200 us of host time a call, which bounds these
# steps). Conds on the token count (a size: tested on the host) give a step of T tokens the tiles
# and grid of the first of these row counts that holds T, as an eager step of T tokens takes
# (ops.linear.kernels._tiles; one program per tile up to PER_TILE_MAX_ROWS rows, else the
# persistent TMA grid); longer steps (where capacity_max_tokens is raised or the form forced) the
# last. With 512-row tiles alone, 1024-token steps ran their single GEMMs (Q, o_proj, down_proj)
# 13-27% slower (tools/form_sweep.py's GEMM sweep, H200), and the one graph took 0.96x of eager's
# time at B=1 L=1024 (H100); at 1536 rows, Q took 95.8 us in the 1024-row tiles (128x256 for the
# single GEMMs) against 84.4 in the 2048-row ones (128x128; docs/BENCHMARKS.md).
COND_PREFILL_TILE_ROWS = (512, 1024, 2048)
# ... and single-token steps under torch.cond take those of this many rows, the decode tiles of
# batches up to 64 (with the 512-row tiles, graph-captured decode steps of that graph took
# 1.6-2.1x eager's GPU time at B=1-8, H200; docs/BENCHMARKS.md).
DECODE_TILE_ROWS = 64


class RoutedDecoderLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, layer_idx: int, config, state: RoutingState):
        super().__init__()
        family = family_for(config)
        family.check_layer(base_layer, layer_idx)
        self.self_attn = base_layer.self_attn
        self.mlp = base_layer.mlp
        self.input_layernorm = base_layer.input_layernorm
        self.post_attention_layernorm = base_layer.post_attention_layernorm
        self.router_attention: Optional[nn.Module] = None
        self.router_mlp: Optional[nn.Module] = None
        self._router_weights = None  # see _linear_router_weights
        # Model loops read these off their layers (Qwen2/3 pick the mask by layer type).
        for attr in ("attention_type", "layer_type"):
            if hasattr(base_layer, attr):
                setattr(self, attr, getattr(base_layer, attr))
        self.layer_idx = layer_idx
        self.family = family
        self.geometry = family.geometry(config)
        self.sliding_window = family.sliding_window(config)
        self.state = state
        self.pipeline = "dense"
        # triton-sparse's capacity form projects Q/K/V in one op (qkv_rope_write), which has no
        # per-head q/k norm and takes all three q/k/v biases or none.
        biases = {getattr(base_layer.self_attn, p).bias is None for p in ("q_proj", "k_proj", "v_proj")}
        self.fuses_qkv = not family.qk_norm and len(biases) == 1
        # [tokens executing attention, tokens executing the MLP, non-padding tokens] since the
        # last reset; on the device, so counting never syncs.
        device = self.input_layernorm.weight.device
        self.register_buffer("route_counts", torch.zeros(3, dtype=torch.int64, device=device), persistent=False)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, pipeline={self.pipeline!r}"

    # -- entry point called by the Hugging Face model loop ------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None, **kwargs) -> torch.Tensor:
        del attention_mask  # the model's 4-D mask; padding comes from state.padding_mask instead
        if position_embeddings is None:
            raise ValueError("position_embeddings (cos, sin) are required; call the layer through its model")
        device = self.input_layernorm.weight.device
        if hidden_states.device != device:
            # Layers spread over several devices (a device_map): the previous layer's output
            # arrives from its device. Everything below (RoPE tables, padding mask, KV cache,
            # route decisions and counts) follows hidden_states onto this layer's device. The
            # test is a constant for compiled code, so single-device graphs do not change.
            hidden_states = hidden_states.to(device)
        B, L, H = hidden_states.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        g = self.geometry
        kv_layer = seq_first_layer(cache, self.layer_idx) if cache is not None else SeqFirstLayer()
        if self.sliding_window is not None and not kv_layer.fits(L, self.sliding_window):
            raise NotImplementedError(
                f"this step can reach beyond the model's sliding window ({self.sliding_window} tokens); "
                "skipgpt implements full causal attention only"
            )
        k_cache, v_cache, start = kv_layer.reserve(B, L, g.num_kv_heads, g.head_dim, hidden_states.dtype, hidden_states.device)
        cos, sin = (self._rope_table(t, B, L, hidden_states.device) for t in position_embeddings)
        key_mask, valid = self._padding(B, L, start, hidden_states.device)
        x = hidden_states.contiguous()
        step = dict(x=x, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, start=start, key_mask=key_mask)
        if self.pipeline == "dense":
            self._count(valid, B * L, None)
            return self._dense(**step)
        execute = self._routes(x, start, L)
        if self.pipeline == "torch-sparse":
            return self._torch_sparse(execute=execute, valid=valid, **step)
        return self._triton_sparse(execute=execute, valid=valid, **step)

    def _rope_table(self, t: torch.Tensor, B: int, L: int, device) -> torch.Tensor:
        """cos or sin as the ops take it: [B, L, D], contiguous, on this layer's device. The model
        shares one row of tables across the batch when it got no position_ids, and its rotary
        embedding sits with its first layers (device_map), so this may copy. Compiled code always
        copies (an explicit copy: .contiguous()'s view-or-copy choice would guard on L == 1);
        eager code takes tables that already fit as they are, saving two launches per layer."""
        D = self.geometry.head_dim
        if not torch.compiler.is_compiling() and t.shape == (B, L, D) and t.device == device and t.is_contiguous():
            return t
        return t.new_empty((B, L, D), device=device).copy_(t)

    def _padding(self, B: int, L: int, start: torch.Tensor, device):
        """(key_mask [B, S] bool or None, valid [B, L] bool or None) from the model's mask.

        2-D masks cover past + new tokens, the new ones last. A 4-D mask [B, 1, L, S] (bool, or
        additive float with 0 = visible) is read as causal plus key padding: the last query row
        gives the keys, each query's own slot (start + l) whether it is a token. Other 4-D
        structures (packed sequences, custom patterns) are not supported.
        """
        mask = self.state.padding_mask
        if mask is None:
            return None, None
        if mask.shape[0] != B or mask.shape[-1] < L or (mask.dim() == 4 and mask.shape[2] != L):
            raise ValueError(
                f"attention_mask: shape {tuple(mask.shape)} does not fit a step of batch {B} with {L} new tokens"
            )
        # The pre-hook keeps the mask where the caller passed it; a layer on another device
        # (device_map) reads a copy on its own (a no-op on the same device).
        mask = mask.to(device)
        if mask.dim() == 2:
            mask = mask.bool()
            # narrow, not mask[:, -L:]: Inductor (torch 2.11) fails to lower open-ended slices here.
            return mask, mask.narrow(1, mask.shape[1] - L, L)
        visible = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # [B, L, S]
        slots = (start + torch.arange(L, device=device)).view(1, L, 1).expand(B, L, 1)
        # An explicit copy (the attention op wants contiguous rows); .contiguous() would guard
        # on B == 1 under torch.compile.
        keys = visible[:, -1].clone(memory_format=torch.contiguous_format)
        return keys, visible.gather(2, slots).squeeze(2)

    def _routes(self, x: torch.Tensor, start: torch.Tensor, L: int) -> torch.Tensor:
        """[2, B, L] bool: row 0 executes attention, row 1 the MLP, as the routers (or the forced
        routes) decide, padding included: the pipelines take padding out."""
        B, _, H = x.shape
        # forced_params, not the float forced_skip: compiled code guards on a float it reads
        # (not NaN), one more check on every call.
        if self.state.forced_params is not None:
            params = self.state.forced_params_on(start.device)  # this layer's device's copy
            execute = ops.forced_execute(params, start, B, L, self.layer_idx)
        else:
            attn_router, mlp_router = self.router_attention, self.router_mlp
            if attn_router is None or mlp_router is None:
                raise RuntimeError(
                    f"layer {self.layer_idx}: pipeline {self.pipeline!r} needs routers; load them "
                    "(skipgpt.load(..., router=PATH) / skipgpt.wrap(model, router=PATH)), force routes "
                    "(skipgpt.force_routes(model, skip=0.25)), or use the 'dense' pipeline"
                )
            if attn_router.kind == mlp_router.kind == "linear":  # both in one pass over x
                w, b = self._linear_router_weights(attn_router.weight_predictor, mlp_router.weight_predictor)
                execute = ops.router_execute(x.reshape(-1, H), w, b).view(2, B, L)
            else:
                execute = torch.stack([attn_router.execute(x), mlp_router.execute(x)])
        return execute

    def _linear_router_weights(self, attn: nn.Linear, mlp: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """Both routers' weights [4, H] and biases [4] as one. Eager steps reuse the last
        concatenation (two launches less per layer and step) while the four tensors are the same
        objects with the same versions and storage; an in-place update (load_state_dict, an
        optimizer step), a new parameter or a .to() makes a new one. Writes PyTorch does not
        count are not seen: through `.data` (its own version counter) or an alias made with it;
        after such a write, set `layer._router_weights = None`. Compiled code, a CUDA graph
        being captured (its replays read the parameters themselves) and inference tensors (no
        version counter) concatenate every step."""
        parts = (attn.weight, mlp.weight, attn.bias, mlp.bias)
        if (torch.compiler.is_compiling() or (attn.weight.is_cuda and torch.cuda.is_current_stream_capturing())
                or any(p.is_inference() for p in parts)):
            return torch.cat(parts[:2]), torch.cat(parts[2:])
        # The cache holds the tensors themselves, so an id cannot be reused by a new one.
        key = [(p, p._version, p.data_ptr()) for p in parts]
        cached = self._router_weights
        if cached is None or any(a is not p or va != v or da != d for (a, va, da), (p, v, d) in zip(cached[0], key)):
            cached = self._router_weights = (key, torch.cat(parts[:2]), torch.cat(parts[2:]))
        return cached[1], cached[2]

    def _count(self, valid, tokens: int, executed) -> None:
        """Accumulate route counts on the device (dense and torch-sparse; triton-sparse's
        ops.compact counts as it compacts). executed: [2] executing counts, or None (dense: every
        non-padding token executes)."""
        counts = self.route_counts
        n_valid = valid.sum() if valid is not None else tokens
        if executed is None:
            counts.add_(n_valid)
        else:
            # add_ on views: `counts[:2] += executed` would also run __setitem__, a second
            # dispatch of ~5 us of host time per add in eager steps.
            counts[:2].add_(executed)
            counts[2].add_(n_valid)

    @torch._dynamo.assume_constant_result
    def _float_constants(self) -> tuple[float, float]:
        """(RMSNorm eps, attention scale). Read through here, compiled code takes them as
        constants: as symbolic floats they could not enter torch.cond's branches, and each call
        would wrap each one in a tensor and read it back (two dispatcher calls)."""
        return self.geometry.rms_norm_eps, self.geometry.scale

    # -- dense: the skipgpt ops with every token executing ------------------------------------
    def _dense(self, x, cos, sin, k_cache, v_cache, start, key_mask):
        g, attn, mlp = self.geometry, self.self_attn, self.mlp
        B, L, H = x.shape
        T = B * L
        x = x.view(T, H)
        eps, scale = self._float_constants()
        xn = ops.rms_norm(x, self.input_layernorm.weight, eps)
        q = F.linear(xn, attn.q_proj.weight, attn.q_proj.bias).view(T, g.num_heads, g.head_dim)
        k = F.linear(xn, attn.k_proj.weight, attn.k_proj.bias).view(B, L, g.num_kv_heads, g.head_dim)
        v = F.linear(xn, attn.v_proj.weight, attn.v_proj.bias).view(B, L, g.num_kv_heads, g.head_dim)
        q, k = self.family.q_norm(attn, q), self.family.k_norm(attn, k)
        q = ops.rope(q, cos.view(T, -1), sin.view(T, -1))
        ops.rope_kv_write(k.contiguous(), v, cos, sin, k_cache, v_cache, start)
        o = self._attention(q, k_cache, v_cache, start, L, scale, key_mask=key_mask)
        h = ops.linear_residual(x, o.view(T, -1), attn.o_proj.weight)
        hn = ops.rms_norm(h, self.post_attention_layernorm.weight, eps)
        a = ops.gated_mlp(hn, mlp.gate_proj.weight, mlp.up_proj.weight, g.activation)
        return ops.linear_residual(h, a, mlp.down_proj.weight).view(B, L, H)

    # -- torch-sparse: plain PyTorch, the reference for the routed semantics --------------------
    def _torch_sparse(self, x, execute, valid, cos, sin, k_cache, v_cache, start, key_mask):
        g, attn = self.geometry, self.self_attn
        B, L, H = x.shape
        if valid is not None:  # padding never executes
            execute = execute & valid
        exec_attn, exec_mlp = execute[0], execute[1]
        n_exec = execute.flatten(1).sum(1)
        self._count(valid, B * L, n_exec)
        # Attention for every token, kept only where the token executes. K/V of every token
        # (executing, skipping, padding) go to the cache.
        xn = self.input_layernorm(x)
        q = attn.q_proj(xn).view(B, L, g.num_heads, g.head_dim)
        k = attn.k_proj(xn).view(B, L, g.num_kv_heads, g.head_dim)
        v = attn.v_proj(xn).view(B, L, g.num_kv_heads, g.head_dim)
        q, k = self.family.q_norm(attn, q), self.family.k_norm(attn, k)
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        slots = start + torch.arange(L, device=x.device)
        k_cache.index_copy_(1, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(1, slots, v.to(v_cache.dtype))
        S = k_cache.shape[1]
        visible = torch.arange(S, device=x.device)[None, :] <= slots[:, None]  # [L, S] causal
        visible = visible[None].expand(B, L, S)
        if key_mask is not None:  # [B, past + L]: slots past the mask are unfilled, never visible
            keys = F.pad(key_mask, (0, S - key_mask.shape[1]), value=False)
            visible = visible & keys[:, None, :]
        # Head-major copies: Inductor's CPU flash-attention lowering rejects the strided views.
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2).contiguous(), k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous(),
            attn_mask=visible[:, None], scale=self._float_constants()[1], enable_gqa=True,
        )  # a query that sees no key gives NaN here; it never executes, so `where` drops it
        o = attn.o_proj(o.transpose(1, 2).reshape(B, L, -1))
        h = torch.where(exec_attn[..., None], x + o, x)
        # MLP on the gathered executing rows only.
        flat = h.view(B * L, H)
        idx = exec_mlp.flatten().nonzero().squeeze(1)
        rows = flat.index_select(0, idx)
        y = self.mlp(self.post_attention_layernorm(rows))
        return flat.index_copy(0, idx, rows + y).view(B, L, H)

    # -- triton-sparse: the skipgpt custom ops over compacted tokens ----------------------------
    def _triton_sparse(self, x, execute, valid, cos, sin, k_cache, v_cache, start, key_mask):
        g, attn = self.geometry, self.self_attn
        B, L, H = x.shape
        T = B * L
        x = x.view(T, H)
        eps = self._float_constants()[0]
        capacity = T <= self.state.capacity_max_tokens  # symbolic when compiled with a symbolic T
        # torch.cond traces both forms and picks at run time, so a new token count never
        # recompiles; but Inductor does not capture a graph holding torch.cond in a CUDA graph,
        # so only where asked for (state.single_graph, compile_model's default). Otherwise a
        # Python branch: free for a static T (generate's auto-compiled decode step), a guard
        # on T <= state.capacity_max_tokens for a symbolic one (a graph for each side).
        use_cond = torch.compiler.is_compiling() and self.state.single_graph
        if not use_cond:
            capacity = bool(capacity)
        # Padding taken out and the layer's route counts updated by the compaction itself.
        rows, slot, seq_offsets = ops.compact(execute, valid, self.route_counts)
        # The exact form reads the counts on the host: start copying them now, so that its sync
        # waits for this copy and not for the K/V projections queued below (3-4% of an exact-form
        # step of 4096-8192 tokens, compiled; docs/BENCHMARKS.md). Under torch.cond a cond of its
        # own starts the copy (one dispatcher call) only where the exact form will run.
        if use_cond:
            # The branches take the counts as a contiguous [R, 1] copy (seq_offsets of no
            # sequence: its last column): given seq_offsets [R, B+1] itself, Inductor (torch 2.13)
            # fails to bind B in them. select + unsqueeze, not [:, -1:] (see _counts).
            counts = seq_offsets[:, -1].unsqueeze(1).clone(memory_format=torch.contiguous_format)
            host_counts = torch.cond(capacity, _no_counts_on_host, ops.counts_to_host, (counts,))
        else:
            host_counts = None if capacity else ops.counts_to_host(seq_offsets)
        # A plain int T only: on a symbolic one (compiled, dynamic) the size test would guard.
        if (capacity is True and self.fuses_qkv and type(T) is int
                and FUSED_QKV_MIN_TOKENS <= T <= FUSED_QKV_MAX_TOKENS):
            # The attention's input stage in two launches: RMSNorm, then Q/K/V, RoPE and the
            # cache write. (Not inside torch.cond, whose branches may not write the cache: there
            # K/V are written before the branch, below.)
            counts = _counts(seq_offsets)
            xn = ops.rms_norm(x, self.input_layernorm.weight, eps)
            q = ops.qkv_rope_write(xn, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.q_proj.bias,
                                   attn.k_proj.bias, attn.v_proj.bias, cos.view(T, -1), sin.view(T, -1), rows[0],
                                   counts[0], k_cache, v_cache, start)
            return self._attend_and_mlp(x, q, (rows[0], rows[1]), counts, slot, seq_offsets, k_cache, v_cache, start,
                                        key_mask, L).view(B, L, H)
        # K/V from every token; the compacted Q input (capacity-sized) comes out of the same
        # RMSNorm pass. This work does not need the counts, so in the exact form it keeps the
        # GPU busy while the host waits for them.
        xn, xq = ops.rms_norm_split(x, self.input_layernorm.weight, eps, slot[0], T)
        k = F.linear(xn, attn.k_proj.weight, attn.k_proj.bias).view(B, L, g.num_kv_heads, g.head_dim)
        v = F.linear(xn, attn.v_proj.weight, attn.v_proj.bias).view(B, L, g.num_kv_heads, g.head_dim)
        k = self.family.k_norm(attn, k)
        ops.rope_kv_write(k.contiguous(), v, cos, sin, k_cache, v_cache, start)
        cos, sin = cos.view(T, -1), sin.view(T, -1)

        def capacity_form_with(tile_rows, attend_with):
            def capacity_form(x, xq, rows, slot, seq_offsets, host_counts, cos, sin, k_cache, v_cache, start):
                return self._sparse_modules(x, xq, (rows[0], rows[1]), _counts(seq_offsets), slot, seq_offsets, cos,
                                            sin, k_cache, v_cache, start, key_mask, L, tile_rows, attend_with)
            return capacity_form

        if use_cond:
            # Decode steps get GEMM tiles and an attention kernel of their own, by a second cond
            # on the step's length, and longer steps tiles by their token count (sizes: tested by
            # the graph's host code).
            def prefill_tiled(tile_rows, *longer):
                form = capacity_form_with(tile_rows, "prefill")
                if not longer:
                    return form
                longer_form = prefill_tiled(*longer)

                def tiled_form(*operands):
                    return torch.cond(T <= tile_rows, form, longer_form, operands)
                return tiled_form

            decode_form = capacity_form_with(DECODE_TILE_ROWS, "decode")
            prefill_form = prefill_tiled(*COND_PREFILL_TILE_ROWS)

            def capacity_form(*operands):
                return torch.cond(L == 1, decode_form, prefill_form, operands)
        else:
            capacity_form = capacity_form_with(None, None)

        def exact_form(x, xq, rows, slot, seq_offsets, host_counts, cos, sin, k_cache, v_cache, start):
            rows_attn, rows_mlp = ops.exact_rows(rows, seq_offsets, host_counts)
            return self._sparse_modules(x, xq[: rows_attn.shape[0]], (rows_attn, rows_mlp), (None, None), slot,
                                        seq_offsets, cos, sin, k_cache, v_cache, start, key_mask, L)

        operands = (x, xq, rows, slot, seq_offsets, host_counts, cos, sin, k_cache, v_cache, start)
        if use_cond:
            out = torch.cond(capacity, capacity_form, exact_form, operands)
        else:
            out = (capacity_form if capacity else exact_form)(*operands)
        return out.view(B, L, H)

    def _sparse_modules(self, x, xq, rows, counts, slot, seq_offsets, cos, sin, k_cache, v_cache, start, key_mask, L,
                        tile_rows=None, attend_with=None):
        """Q from the normalised compacted rows xq, then `_attend_and_mlp`. rows/counts:
        (attention, MLP) pairs; counts are None in the exact form. Returns [T, H]."""
        g, attn = self.geometry, self.self_attn
        q = ops.linear_rows(xq, attn.q_proj.weight, attn.q_proj.bias, counts[0], tile_rows=tile_rows)
        q = self.family.q_norm(attn, q.view(-1, g.num_heads, g.head_dim))
        q = ops.rope(q.contiguous(), cos, sin, rows[0], counts[0])
        return self._attend_and_mlp(x, q, rows, counts, slot, seq_offsets, k_cache, v_cache, start, key_mask, L,
                                    tile_rows, attend_with)

    def _attention(self, q, k_cache, v_cache, start, L, scale, rows=None, seq_offsets=None, key_mask=None,
                   attend_with=None):
        """ops.sparse_attention, whose kernel follows L: split-KV decode for single-token steps,
        tiled prefill otherwise; attend_with names it where the caller knows. In compile_model's
        single graph L is symbolic, and the op's own choice would guard on L == 1, leaving it one
        dispatcher call (70-200 us of host time a step): there a torch.cond on L == 1 names the
        kernel in each branch. Its predicate is a size, tested by the graph's host code: no sync.
        (Dynamo shows a symbolic L as a plain int, so the test is on the mode, not on L.)"""
        if attend_with is not None or not (torch.compiler.is_compiling() and self.state.single_graph):
            return ops.sparse_attention(q, k_cache, v_cache, start, L, scale, rows, seq_offsets, key_mask,
                                        attend_with=attend_with)

        def branch(kernel):
            def attend(q, k_cache, v_cache, start):
                return ops.sparse_attention(q, k_cache, v_cache, start, L, scale, rows, seq_offsets, key_mask,
                                            attend_with=kernel)
            return attend

        return torch.cond(L == 1, branch("decode"), branch("prefill"), (q, k_cache, v_cache, start))

    def _attend_and_mlp(self, x, q, rows, counts, slot, seq_offsets, k_cache, v_cache, start, key_mask, L,
                        tile_rows=None, attend_with=None):
        """Attention and o_proj over the attention rows' queries q [rows, Hq, D], then the MLP
        over the MLP rows, each scattered back onto the residual stream x [T, H]. tile_rows: the
        capacity-form GEMMs' (see COND_PREFILL_TILE_ROWS); None in the exact form and eager code.
        attend_with: the attention kernel, where the caller knows it (see `_attention`)."""
        g, attn, mlp = self.geometry, self.self_attn, self.mlp
        eps, scale = self._float_constants()
        # The capacity form projects only the executing rows and adds each onto its token (rows);
        # the exact form's rows are x's rows already, which slot alone maps.
        capacity_rows = rows if counts[0] is not None else (None, None)
        o = self._attention(q, k_cache, v_cache, start, L, scale, rows[0], seq_offsets[0], key_mask, attend_with)
        h = ops.linear_residual(x, o.view(-1, g.num_heads * g.head_dim), attn.o_proj.weight, slot[0], counts[0],
                                capacity_rows[0], tile_rows=tile_rows)
        hn = ops.rms_norm(h, self.post_attention_layernorm.weight, eps, rows[1], counts[1])
        a = ops.gated_mlp(hn, mlp.gate_proj.weight, mlp.up_proj.weight, g.activation, counts[1], tile_rows=tile_rows)
        return ops.linear_residual(h, a, mlp.down_proj.weight, slot[1], counts[1], capacity_rows[1],
                                   tile_rows=tile_rows)


def _no_counts_on_host(seq_offsets: torch.Tensor) -> torch.Tensor:
    """The capacity form's side of counts_to_host's torch.cond: nothing copied (unread)."""
    return torch.empty(seq_offsets.shape[0], dtype=torch.int32)


def _counts(seq_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention and MLP executing counts, [1] views of `compact`'s seq_offsets [2, B+1].
    select + unsqueeze rather than [r, -1:], an open-ended slice that Inductor (torch 2.11)
    fails to lower inside torch.cond."""
    return seq_offsets[0, -1].unsqueeze(0), seq_offsets[1, -1].unsqueeze(0)
