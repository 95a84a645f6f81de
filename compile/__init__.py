"""skipgpt.compile: torch.compile integration for routed models (dynamic-shape marks, compile
helpers, graph and recompile diagnostics, CUDA-graph decode)."""
