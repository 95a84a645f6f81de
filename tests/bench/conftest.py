"""Fixtures shared by the `skipgpt bench` tests."""
import pytest
import torch

from skipgpt import benchmark as B


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny shapes gain nothing from threads, and on a busy machine OpenMP's spinning workers make
    # each call take up to ~100 ms instead of ~1 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def nothing_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(B.LayerBench, "__init__", refuse)
    monkeypatch.setattr(B.ModelBench, "__init__", refuse)
