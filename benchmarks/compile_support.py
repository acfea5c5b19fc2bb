"""TorchCompileModel inside the end-to-end benchmark (issue 10): compiled variants that
keep their own dynamo caches, and dynamo's counters per variant.

ComfyUI's TorchCompileModel compiles `diffusion_model` with inductor through
`comfy_api.torch_helpers.set_torch_compile_wrapper`; the benchmark does exactly that,
except that each group of variants gets its own backend object. Dynamo keeps compiled
code per code object and reuses an entry only for an equal backend (its BACKEND_MATCH
check), so "compiled without the node" and "compiled with the node" never run each
other's graphs, while every node variant shares one graph, as one user's workflows
would.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class InductorGroup:
    """An inductor backend with an identity of its own (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph, example_inputs)

    def __repr__(self) -> str:
        return f"InductorGroup({self.name})"


def compile_model(model: Any, group: InductorGroup) -> Any:
    """A clone of `model` compiled as TorchCompileModel compiles it, in `group`."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    try:  # 0.8.0 and newer drop guards on transformer_options; 0.3.64 has no filter
        from comfy_extras.nodes_torch_compile import skip_torch_compile_dict
        options = {"guard_filter_fn": skip_torch_compile_dict}
    except ImportError:
        options = None
    compiled = model.clone()
    set_torch_compile_wrapper(model=compiled, backend=group, options=options)
    return compiled


def dynamo_counts() -> dict[str, int]:
    """Graph breaks and compiled frames so far in this process."""
    import torch._dynamo.utils

    counters = torch._dynamo.utils.counters
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "frames": int(counters["stats"]["unique_graphs"])}


def graph_break_reasons() -> dict[str, int]:
    import torch._dynamo.utils

    return {reason[:200]: count for reason, count in torch._dynamo.utils.counters["graph_break"].items()}
