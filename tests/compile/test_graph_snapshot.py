"""What one routed decoder layer traces to, as a normalised op list. Any change in the captured
graph shows up here in review; regenerate with EXPECTTEST_ACCEPT=1 after checking it."""
import expecttest
import torch

from skipgpt.benchmark import LayerBench


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
    torch.compile(step, backend=record, dynamic=True, fullgraph=True)()
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
  iadd
  iadd
  skipgpt.rms_norm_split.default
  linear
  linear
  skipgpt.rope_kv_write.default
  cond
[cond_true_0]
  unsqueeze
  unsqueeze
  skipgpt.linear_rows.default
  skipgpt.rope.default
  skipgpt.sparse_attention.default
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default
[cond_false_0]
  skipgpt.exact_rows.default
  aten.sym_size.int
  aten.sym_size.int
  aten._assert_scalar.default
  aten._assert_scalar.default
  aten._assert_scalar.default
  aten._assert_scalar.default
  skipgpt.linear_rows.default
  skipgpt.rope.default
  skipgpt.sparse_attention.default
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default""")

    def test_dense_layer(self):
        self.assertExpectedInline(traced_ops("dense"), """\
[graph]
  full
  new_empty
  copy_
  new_empty
  copy_
  iadd
  skipgpt.rms_norm.default
  linear
  linear
  linear
  skipgpt.rope.default
  skipgpt.rope_kv_write.default
  skipgpt.sparse_attention.default
  skipgpt.linear_residual.default
  skipgpt.rms_norm.default
  skipgpt.gated_mlp.default
  skipgpt.linear_residual.default""")


def test_cond_capacity_branch_fixes_the_gemm_tiles():
    """Under torch.cond the capacity branch's GEMMs pass tile_rows (COND_TILE_ROWS), which lets
    them trace into Inductor's graph on CUDA instead of staying dispatcher calls; the exact
    branch's GEMMs (cuBLAS, no count) pass none."""
    from skipgpt.layer import COND_TILE_ROWS

    gemms = ("skipgpt.linear_rows.default", "skipgpt.gated_mlp.default", "skipgpt.linear_residual.default")
    (top,) = captured_graphs("triton-sparse")
    (cond,) = [n for n in top.graph.nodes if n.target is torch.ops.higher_order.cond]
    tiles = {}
    for branch, attr in (("capacity", cond.args[1]), ("exact", cond.args[2])):
        sub = getattr(top, attr.target)
        tiles[branch] = [n.kwargs.get("tile_rows") for n in sub.graph.nodes if str(n.target) in gemms]
    assert tiles == {"capacity": [COND_TILE_ROWS] * 4, "exact": [None] * 4}, tiles
