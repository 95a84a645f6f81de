"""The host wrappers' grid and tile arithmetic (ops/_common.py)."""
import ast
import pathlib

import pytest

from skipgpt.ops._common import HAS_TRITON, cdiv, next_power_of_2

OPS = pathlib.Path(__file__).resolve().parents[2] / "ops"


@pytest.mark.skipif(not HAS_TRITON, reason="compares with Triton's own helpers")
def test_helpers_agree_with_triton():
    import triton

    for n in range(1, 3000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 16, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert cdiv(0, 64) == 0 and next_power_of_2(0) == 1


def test_host_code_does_not_call_tritons_constexpr_functions():
    """triton.cdiv and triton.next_power_of_2 are ConstexprFunction objects since Triton 3.5: each
    host call costs 1-4 us, and the eager wrappers make about fifteen per layer step."""
    offenders = []
    for path in sorted(OPS.glob("*/kernels.py")):
        tree = ast.parse(path.read_text())
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            jit = any("jit" in ast.unparse(d) for d in fn.decorator_list)
            for node in ast.walk(fn):
                if (not jit and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id == "triton" and node.attr in ("cdiv", "next_power_of_2")):
                    offenders.append(f"{path.relative_to(OPS.parent)}:{node.lineno} in {fn.name}")
    assert not offenders, offenders
