"""Compiled triton-sparse on CUDA at Llama-3.1-8B layer geometry: no graph breaks, no
recompilation over 6 sequence lengths and 3 skip rates, and the eager numbers. Compiled
generate() (static cache, reduce-overhead): every decode step captured in a CUDA graph."""
import copy
import logging
import re
import unittest

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import skipgpt
from skipgpt.compile import compile_model
from tests.helpers import kernel_write_analysis_failures, rel_err
from tests.model.tiny import random_batch

pytestmark = pytest.mark.gpu


def one_layer_8b():
    """A one-layer Llama-3.1-8B-geometry model, bf16, triton-sparse at 25% forced skip."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, pad_token_id=0)
    with torch.device("cuda"):
        model = skipgpt.wrap(LlamaForCausalLM(config).to(torch.bfloat16).eval(), pipeline="dense")
    skipgpt.force_routes(model, skip=0.25)
    skipgpt.set_pipeline(model, "triton-sparse")
    return model


def test_compiled_triton_sparse_one_graph_at_8b_geometry():
    eager = one_layer_8b()
    compiled = compile_model(copy.deepcopy(eager), fullgraph=True)
    # torch 2.11's fake stride computation guards on L >= 2 even under size-oblivious tracing
    # (torch 2.13 does not: the CPU test compiles once for every length, 1 included), so the
    # single-token graph is compiled up front; nothing after it may recompile.
    warm = {300, 1}
    # B=2: 600 tokens (the 1024-row tiles), one (decode), 34 and 128 (512-row tiles), 2000 (the
    # 2048-row tiles) and 2200 (past capacity_max_tokens: the exact form).
    for L in (300, 1, 17, 64, 1000, 1100):
        for i, skip in enumerate((0.0, 0.25, 0.5)):
            for model in (eager, compiled):
                skipgpt.force_routes(model, skip=skip, seed=i)
            ids, mask = random_batch(1024, 2, L, "left", device="cuda")
            stance = "default" if (L in warm and i == 0) else "fail_on_recompile"
            with torch.no_grad(), torch.compiler.set_stance(stance):
                out = compiled(ids, attention_mask=mask).logits.float()
            with torch.no_grad():
                ref = eager(ids, attention_mask=mask).logits.float()
            keep = mask.bool()
            assert rel_err(out[keep], ref[keep]) < 1e-2, (L, skip)


def test_compiled_layer_launches_its_kernels_itself():
    """Inductor launches the ops' Triton kernels directly (decompose_under_compile), knowing
    which arguments each writes; only ops whose host code picks kernels or tiles by a symbolic
    size, or syncs, stay op calls."""
    from torch._inductor.utils import run_and_get_code

    compiled = compile_model(one_layer_8b(), fullgraph=True)
    ids, mask = random_batch(1024, 2, 300, "left", device="cuda")
    # With and without padding: compaction's kernel takes another branch without the mask.
    with torch.no_grad(), kernel_write_analysis_failures() as failures:
        _, code = run_and_get_code(compiled, ids, attention_mask=mask)
        _, unpadded = run_and_get_code(compiled, ids)
    assert not failures, failures  # Inductor must see which arguments each kernel writes
    code = "\n".join(code + unpadded)
    op_calls = set(re.findall(r"torch\.ops\.skipgpt\.(\w+)", code))
    # Only the exact form's host reads: counts_to_host (in a torch.cond taken only where the exact
    # form runs) and exact_rows. The capacity form's GEMMs trace with tiles fixed by tile_rows,
    # attention names its kernel in a torch.cond on L == 1, compaction takes a fixed block.
    assert op_calls <= {"counts_to_host", "exact_rows"}, op_calls
    for kernel in ("_rms_norm_kernel", "_rope_kernel", "_rope_kv_write_kernel", "_act_mul_kernel",
                   "_scatter_residual_kernel", "_rows_gemm_kernel", "_forced_execute_kernel", "_compact_kernel",
                   "_prefill_kernel", "_decode_kernel", "_combine_kernel"):
        assert re.search(rf"def {kernel}\w*\(", code), kernel  # its source, copied into the generated code


def tiny_cuda_pair(pipeline):
    """(compiled-to-be, eager) copies of a tiny float32 Llama on CUDA under forced routes."""
    from tests.model.tiny import make_pair

    _, model = make_pair("llama", device="cuda")
    skipgpt.force_routes(model, skip=0.3, seed=5)
    skipgpt.set_pipeline(model, pipeline)
    return model, copy.deepcopy(model)


def test_compiled_steps_where_no_token_executes_match_eager():
    """Exact-form prefills where every token skips both modules, then where every token executes:
    in the first, the kernels Inductor launches itself get empty grids at run time (the executing
    counts are unbacked), which must neither fail nor write anything. The counts' host copy keeps
    its CUDA event through the compiled graph (exact_rows waits for the copy only)."""
    from skipgpt.ops.routing import _warn_waiting_for_the_stream

    _warn_waiting_for_the_stream.cache_clear()
    model, eager = tiny_cuda_pair("triton-sparse")
    model.model.skipgpt_routing.use_form("exact")
    compiled = compile_model(model, fullgraph=True)
    ids, mask = random_batch(model.config.vocab_size, 2, 300, "left", device="cuda")
    for skip in (1.0, 0.0):
        for m in (model, eager):
            skipgpt.force_routes(m, skip=skip)
        # assertNoLogs, not caplog: the tests run without pytest's logging plugin.
        with torch.no_grad(), unittest.TestCase().assertNoLogs(logging.getLogger("skipgpt"), "WARNING"):
            out = compiled(ids, attention_mask=mask).logits
        with torch.no_grad():
            ref = eager(ids, attention_mask=mask).logits
        keep = mask.bool()
        assert rel_err(out[keep], ref[keep]) < 1e-5, skip


def generate(model, batch, length, seed, **kwargs):
    ids, mask = random_batch(model.config.vocab_size, batch, length, "left", seed=seed, device="cuda")
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, **kwargs)


def test_compiled_decode_steps_match_eager():
    """generate() on compile_model's one graph (static cache, 300-token prompts): the decode side of
    the attention's torch.cond (the split-KV kernel, at symbolic batch and cache sizes) gives
    eager's logits, step by step while the greedy tokens agree."""
    eager = one_layer_8b()
    compiled = compile_model(copy.deepcopy(eager), fullgraph=True)
    kw = dict(cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    out = generate(compiled, 2, 300, 0, **kw)
    ref = generate(eager, 2, 300, 0, disable_compile=True, **kw)  # eager: transformers compiles no step
    compared = 0
    for got, want in zip(out.logits, ref.logits):
        assert rel_err(got.float(), want.float()) < 1e-2, compared
        compared += 1
        if not torch.equal(got.argmax(-1), want.argmax(-1)):
            break  # the next steps would see other tokens
    assert compared >= 3, compared  # the prefill's logits and at least two decode steps'


@pytest.mark.parametrize("recipe", ["transformers", "compile_model"])
@pytest.mark.parametrize("pipeline", ["dense", "triton-sparse"])
def test_compiled_generate_captures_every_decode_step_in_cuda_graphs(recipe, pipeline):
    """generate() with a static cache and reduce-overhead: Inductor skips no CUDA graph (its
    counter of skips stays 0), and the tokens are eager's (float32, so equality is expected)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, eager = tiny_cuda_pair(pipeline)
    if recipe == "compile_model":
        compile_model(model, mode="reduce-overhead")
    # Prompts of at most 64 tokens in all (the exact-form prefill of longer ones is never captured).
    for seed, (batch, length) in enumerate([(2, 6), (2, 6), (2, 9), (1, 5), (4, 12)]):
        out = generate(model, batch, length, seed, cache_implementation="static")
        assert torch.equal(out, generate(eager, batch, length, seed)), (recipe, pipeline, batch, length)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled
    assert counters["inductor"]["cudagraph_skips"] == 0
