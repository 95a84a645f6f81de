"""EagerLaunch: an eager Triton launch reuses the compiled kernel of its specialization, and goes
through Triton's own launch whenever anything Triton specializes on differs (fake kernels here;
the GPU tests run every real kernel through it)."""
import inspect

import pytest
import torch

from skipgpt.ops._common import EagerLaunch, specialization


class FakeCompiled:
    """A compiled kernel: records the launches made on it directly."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *values: self.launches.append((grid, values))


class FakeJIT:
    """A JITFunction: counts Triton's own launches, each returning the one compiled kernel."""

    def __init__(self):
        def kernel(x_ptr, n, eps, BLOCK: "tl.constexpr" = 16):
            pass

        self.signature = inspect.signature(kernel)
        self.launches = 0
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1
            return self.compiled

        return run


@pytest.fixture
def jit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # CPU-only CI has no CUDA device
    return FakeJIT()


def test_second_call_of_a_specialization_launches_the_compiled_kernel(jit):
    launcher = EagerLaunch(jit)
    launcher[(4,)](torch.zeros(64), 32, 1e-5, num_warps=4)
    assert jit.launches == 1
    y = torch.ones(64)
    launcher[(5,)](y, 48, 2e-5, num_warps=4)  # the same dtype, alignment and int class
    assert jit.launches == 1
    [(grid, values)] = jit.compiled.launches
    assert grid == (5, 1, 1)
    assert values[0] is y and values[1:] == (48, 2e-5, 16)  # signature order, the default filled in


@pytest.mark.parametrize("change", ["int one", "int not a multiple of 16", "misaligned", "dtype", "option",
                                    "constexpr", "callable grid", "missing argument"])
def test_anything_triton_specializes_on_goes_through_triton(jit, change):
    launcher = EagerLaunch(jit)
    x = torch.zeros(64)
    launcher[(4,)](x, 32, 1e-5, num_warps=4)
    args, kwargs, grid = [x, 32, 1e-5], {"num_warps": 4}, (4,)
    if change == "int one":
        args[1] = 1
    elif change == "int not a multiple of 16":
        args[1] = 33
    elif change == "misaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = x.half()
    elif change == "option":
        kwargs["num_warps"] = 8
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "callable grid":
        grid = lambda meta: (4,)  # noqa: E731
    else:
        args.pop()  # Triton's launch reports what is missing
    launcher[grid](*args, **kwargs)
    assert jit.launches == 2 and jit.compiled.launches == [], change


def test_specialization_classes():
    assert specialization(1) != specialization(17)
    assert specialization(32) == specialization(48) != specialization(40)
    assert specialization(2**31) != specialization(2**31 - 16)  # i64 against i32
    assert specialization(True) != specialization(False)  # bools by value, not as ints
    x = torch.zeros(8)
    assert specialization(x) == specialization(torch.ones(8)) != specialization(x[1:])


@pytest.mark.parametrize("family", ["attention", "linear", "norm", "rope", "routing"])
def test_constexpr_arguments_are_those_triton_sees(family):
    """Constexpr arguments are keyed by value: EagerLaunch must find the same ones as Triton in
    every kernel of ops/ (read here as JITFunctions, whatever TRITON_INTERPRET says)."""
    import importlib

    from triton.runtime.jit import JITFunction

    module = importlib.import_module(f"skipgpt.ops.{family}.kernels")
    kernels = [JITFunction(getattr(obj, "fn", obj)) for name, obj in vars(module).items()
               if name.endswith("_kernel") and hasattr(obj, "__getitem__")]
    assert kernels, family
    for kernel in kernels:
        assert EagerLaunch(kernel).constexpr == [p.is_constexpr for p in kernel.params], kernel.fn.__name__
