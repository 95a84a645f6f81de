"""What one routed decoder layer traces to, as a normalised op list. Any change in the captured
graph shows up here in review; regenerate with EXPECTTEST_ACCEPT=1 after checking it."""
import expecttest
import torch

from skipgpt.benchmark import LayerBench
from skipgpt.compile import with_compile_settings


# Shape bookkeeping and grad-mode toggles: not computation.
_PLUMBING = {"size", "getitem", "view", "contiguous", "_set_grad_enabled", "item"}


def captured_graphs(pipeline: str) -> list:
    """The dynamo graphs of one layer step (tiny geometry, B=2, L=5, forced routes; the benchmark's
    layer, compiled as compile_model does: one graph, torch.cond between the forms)."""
    bench = LayerBench("tiny", torch.float32, torch.device("cpu"))
    step = bench.step(pipeline, "prefill", 2, 5, 0.25)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with_compile_settings(torch.compile(step, backend=record, dynamic=True, fullgraph=True))()
    torch._dynamo.reset()
    return graphs


def traced_ops(pipeline: str) -> str:
    """Ops of `captured_graphs`, with torch.cond branches listed under their own headers; shapes
    and node names left out."""
    graphs = captured_graphs(pipeline)
    lines = []

    def walk(gm, title):
        lines.append(f"[{title}]")
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if isinstance(node.target, torch._ops.OpOverload) or "higher_order" in str(node.target):
                target = str(node.target)
            # Python operators on sizes are shape arithmetic; on tensors they are computation.
            on_sizes = not isinstance(node.meta.get("example_value"), torch.Tensor)
            if target in _PLUMBING or (getattr(node.target, "__module__", None) == "_operator" and on_sizes):
                continue
            lines.append(f"  {target}")
        for name, sub in gm.named_children():
            if isinstance(sub, torch.fx.GraphModule):
                walk(sub, name)

    for gm in graphs:
        walk(gm, "graph")
    return "\n".join(lines)


class TestRoutedLayerGraph(expecttest.TestCase):
    def test_triton_sparse_layer(self):
        self.assertExpectedInline(traced_ops("triton-sparse"), """\
[graph]
  full
  new_empty
  copy_
  new_empty
  copy_
  skipgpt.forced_execute.default
  skipgpt.compact.default
  unsqueeze
  clone
  cond
  skipgpt.rms_norm_split.default
  linear
  linear
  skipgpt.rope_kv_write.default
  cond
[cond_true_0]
  empty
[cond_false_0]
  skipgpt.counts_to_host.default
[cond_true_5]
  cond
[cond_true_3]
  unsqueeze
  unsqueeze
  skipgpt.linear_rows.default
  skipgpt.rope.default
  skipgpt.sparse_attention.default
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default
[cond_false_3]
  cond
[cond_true_2]
  unsqueeze
  unsqueeze
  skipgpt.linear_rows.default
  skipgpt.rope.default
  skipgpt.sparse_attention.default
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default
[cond_false_2]
  cond
[cond_true_1]
  unsqueeze
  unsqueeze
  skipgpt.linear_rows.default
  skipgpt.rope.default
  skipgpt.sparse_attention.default
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default
[cond_false_1]
  unsqueeze
  unsqueeze
  skipgpt.linear_rows.default
  skipgpt.rope.default
  skipgpt.sparse_attention.default
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default
[cond_false_5]
  aten.sym_size.int
  skipgpt.exact_rows.default
  aten.sym_size.int
  aten.sym_size.int
  aten._assert_scalar.default
  aten._assert_scalar.default
  aten._assert_scalar.default
  aten._assert_scalar.default
  skipgpt.linear_rows.default
  skipgpt.rope.default
  cond
  aten.sym_size.int
  aten._assert_scalar.default
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default
[cond_true_4]
  skipgpt.sparse_attention.default
[cond_false_4]
  skipgpt.sparse_attention.default""")

    def test_dense_layer(self):
        self.assertExpectedInline(traced_ops("dense"), """\
[graph]
  full
  new_empty
  copy_
  new_empty
  copy_
  add_
  skipgpt.rms_norm.default
  linear
  linear
  linear
  skipgpt.rope.default
  skipgpt.rope_kv_write.default
  cond
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default
[cond_true_0]
  skipgpt.sparse_attention.default
[cond_false_0]
  skipgpt.sparse_attention.default""")


def _cond_branches(top: torch.fx.GraphModule) -> list:
    """(true branch, false branch) graphs of each torch.cond in `top`, in order."""
    conds = [n for n in top.graph.nodes if n.target is torch.ops.higher_order.cond]
    return [(getattr(top, n.args[1].target), getattr(top, n.args[2].target)) for n in conds]


def _calls(gm: torch.fx.GraphModule, op: str) -> list:
    return [n for n in gm.graph.nodes if str(n.target) == op]


def _only_cond(g: torch.fx.GraphModule) -> tuple:
    """(predicate's symbolic node, true branch, false branch) of the one torch.cond in `g`."""
    (cond,) = [n for n in g.graph.nodes if n.target is torch.ops.higher_order.cond]
    return cond.args[0].meta["example_value"].node, getattr(g, cond.args[1].target), getattr(g, cond.args[2].target)


def _on_length_one(g: torch.fx.GraphModule) -> tuple:
    """(true branch, false branch) of the one torch.cond in `g`, after checking that it tests
    L == 1: a symbol traced at L = 5 (B = 2) against 1."""
    pred, true, false = _only_cond(g)
    (symbol,) = pred.expr.free_symbols
    assert str(pred.expr) == f"Eq({symbol}, 1)" and pred.shape_env.var_to_val[symbol] == 5, pred.expr
    return true, false


def _on_token_count(g: torch.fx.GraphModule, bound: int) -> tuple:
    """(true branch, false branch) of the one torch.cond in `g`, after checking that it tests the
    step's token count (B * L, traced at 2 * 5) against `bound`."""
    pred, true, false = _only_cond(g)
    values = pred.shape_env.var_to_val
    assert str(pred.expr).endswith(f"<= {bound}"), pred.expr
    assert sorted(values[s] for s in pred.expr.free_symbols) == [2, 5], pred.expr
    return true, false


def test_cond_branches_pick_what_traces():
    """What lets compile_model's single graph launch the kernels itself rather than call ops
    through the dispatcher (on CUDA): the capacity branch's GEMMs pass tile_rows, by a cond of
    its own on L == 1 (DECODE_TILE_ROWS), else by conds on the token count (the first of
    COND_PREFILL_TILE_ROWS that holds it, or the last), and the exact branch's (cuBLAS,
    no count) none; the counts go to the host (one op) only where the exact form runs, which
    reads them; attention names its kernel (decode where L == 1, else prefill), in the capacity
    form by the same cond and elsewhere by a cond around it: a choice inside the op by the
    symbolic L would guard."""
    from skipgpt.layer import COND_PREFILL_TILE_ROWS, DECODE_TILE_ROWS

    gemms = ("skipgpt.linear_rows.default", "skipgpt.gated_mlp.default", "skipgpt.linear_residual.default")
    attention = "skipgpt.sparse_attention.default"
    (top,) = captured_graphs("triton-sparse")
    (no_copy, copy), (capacity, exact) = _cond_branches(top)
    copies = [len(_calls(g, "skipgpt.counts_to_host.default")) for g in (no_copy, copy, capacity, exact)]
    assert copies == [0, 1, 0, 0], copies
    (read,) = _calls(exact, "skipgpt.exact_rows.default")
    assert len(read.args) == 3, read.args  # rows, seq_offsets and the copied counts
    decode, longer = _on_length_one(capacity)
    branches = {"decode": decode, "exact": exact}
    for bound in COND_PREFILL_TILE_ROWS[:-1]:  # each cond's false branch holds the next
        branches[bound], longer = _on_token_count(longer, bound)
    branches[COND_PREFILL_TILE_ROWS[-1]] = longer
    tiles = {
        branch: [n.kwargs.get("tile_rows") for n in g.graph.nodes if str(n.target) in gemms]
        for branch, g in branches.items()
    }
    expected = {"decode": [DECODE_TILE_ROWS] * 4, "exact": [None] * 4}
    expected.update({rows: [rows] * 4 for rows in COND_PREFILL_TILE_ROWS})
    assert tiles == expected, tiles
    prefill = [branches[rows] for rows in COND_PREFILL_TILE_ROWS]
    kernels = [n.kwargs.get("attend_with") for g in (decode, *prefill) for n in _calls(g, attention)]
    assert kernels == ["decode"] + ["prefill"] * len(prefill), kernels
    (dense,) = captured_graphs("dense")
    for g in (exact, dense):
        assert not _calls(g, attention)  # only inside the cond
        kernels = [n.kwargs.get("attend_with") for b in _on_length_one(g) for n in _calls(b, attention)]
        assert kernels == ["decode", "prefill"], kernels


def test_no_float_reaches_the_graph_as_an_input():
    """A Python float the layer reads (the RMSNorm eps) would enter the graph as an input:
    Dynamo wraps it in a tensor on every call and the graph reads it back with .item(), host
    work on each step. The fast pipelines read it as a constant instead.
    (torch-sparse, the reference, keeps the Hugging Face RMSNorm modules and their float eps.)"""
    for pipeline in ("triton-sparse", "dense"):
        for gm in captured_graphs(pipeline):
            floats = [node.name for node in gm.graph.nodes if node.op == "placeholder" and (
                isinstance(node.meta.get("example_value"), torch.SymFloat)
                or (isinstance(node.meta.get("example_value"), torch.Tensor)
                    and node.meta["example_value"].dim() == 0 and node.meta["example_value"].is_floating_point()))]
            items = [node.name for node in gm.graph.nodes if node.target == "item"]
            assert not floats and not items, (pipeline, floats, items)
