"""skipgpt.compile: torch.compile for routed models.

`compile_model(model)` compiles the model's forward so that one graph serves every batch size,
sequence length (1 included) and route pattern:
- `dynamic=True` makes batch and sequence dims symbolic from the first call;
- tracing runs with `backed_size_oblivious`, so those dims are not specialised on 0 and 1
  (plain `torch.compile` compiles a second graph the first time a batch or a step of size 1
  arrives). Unbacked marks (`mark_unbacked`) would do the same but break on Hugging Face's own
  shape checks in its masking code;
- the routed layers pick the capacity or exact form with `torch.cond` when compiled, and the
  forced-route parameters are tensors, so neither token counts nor skip rates recompile.
Plain `torch.compile(model)` also works, with at most those size-1 recompiles.

`explain(model, inputs)` reports graphs, graph breaks and recompiles in plain words.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

__all__ = ["compile_model", "explain", "CompileReport"]


def compile_model(
    model: nn.Module,
    mode: Optional[str] = None,
    dynamic: bool = True,
    fullgraph: bool = True,
    backend: str = "inductor",
    options: Optional[dict] = None,
) -> nn.Module:
    """Compile a routed (or plain) Hugging Face causal LM's forward in place and return the model.

    `generate()` and every other caller of `model(...)` then run the compiled forward. `mode`
    is torch.compile's ("reduce-overhead" captures CUDA graphs). `fullgraph=True` turns any
    graph break into an error instead of a silent slowdown.
    """
    if getattr(model, "_skipgpt_compiled", False):
        raise ValueError("model is already compiled by skipgpt.compile.compile_model")
    compiled = torch.compile(model.forward, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend,
                             options=options)

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        # Tracing happens inside this call on first use (and on a recompile), so the setting is
        # in force exactly when shapes are being specialised.
        with fx_config.patch(backed_size_oblivious=True):
            return compiled(*args, **kwargs)

    model.forward = forward
    model._skipgpt_compiled = True
    return model


@dataclass
class CompileReport:
    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)
    calls: int = 0
    compilations: int = 0
    recompile_reasons: list[str] = field(default_factory=list)

    @property
    def recompiles(self) -> int:
        return max(0, self.compilations - self.graphs)

    def __str__(self) -> str:
        lines = [
            f"First call: {self.graphs} graph(s), {self.graph_breaks} graph break(s).",
        ]
        for reason in self.break_reasons:
            lines.append(f"  break: {reason}")
        lines.append(f"{self.calls} call(s) compiled {self.compilations} graph(s) in all: "
                     f"{self.recompiles} recompilation(s) after the first call.")
        for reason in self.recompile_reasons:
            lines.append(f"  recompiled because: {reason}")
        if not self.graph_breaks and not self.recompiles:
            lines.append("One graph serves every input given: nothing to fix.")
        return "\n".join(lines)


class _RecompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "triggered by the following guard failure" in text:
            self.reasons.append(" ".join(text.split("\n")[2:4]).strip() or text.strip())


def explain(model: nn.Module, inputs: Iterable[dict], dynamic: bool = True) -> CompileReport:
    """Compile a fresh view of `model.forward` and run it on each dict of keyword inputs.

    Reports graphs and graph breaks of the first call (torch._dynamo.explain), then how many
    graphs all calls compiled, with the guard that failed for each recompilation. Runs under
    no_grad; the model itself is left uncompiled.
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("inputs: give at least one dict of keyword arguments for model(...)")
    report = CompileReport(calls=len(inputs))
    torch._dynamo.reset()
    # explain() traces without fullgraph, where an op with a data-dependent output shape (the
    # exact-form row narrowing) needs this switch to stay in the graph.
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True), \
            torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        first = torch._dynamo.explain(model.forward)(**inputs[0])
        report.graphs = first.graph_count
        report.graph_breaks = first.graph_break_count
        report.break_reasons = [str(b.reason) for b in first.break_reasons]
        torch._dynamo.reset()

        compilations = 0

        def counting_backend(gm, example_inputs):
            nonlocal compilations
            compilations += 1
            return gm.forward

        compiled = torch.compile(model.forward, backend=counting_backend, dynamic=dynamic)
        log = _RecompileLog()
        guards_logger = logging.getLogger("torch._dynamo")
        guards_logger.addHandler(log)
        torch._logging.set_logs(recompiles=True)
        try:
            for kwargs in inputs:
                compiled(**kwargs)
        finally:
            torch._logging.set_logs()
            guards_logger.removeHandler(log)
    torch._dynamo.reset()
    report.compilations = compilations
    report.recompile_reasons = log.reasons
    return report
