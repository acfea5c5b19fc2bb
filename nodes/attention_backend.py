"""The node classes (ComfyUI's V3 schema). Logic lives in patch.py and its helpers."""

from __future__ import annotations

from typing import Optional

from comfy_api.latest import ComfyExtension, io

from ..attention import AUTO, UnknownBackendError, parse_priority
from .patch import FALL_BACK, ON_UNSUPPORTED, patch_model, resolve_priority
from .raw_inputs import BOOLEAN_INPUTS, not_boolean_problem
from .routes import selectable
from .routing import RoutingRules
from .tuning import REUSE, TUNING_MODES

CATEGORY = "model_patches/attention"

_ON_UNSUPPORTED_TIP = ("What to do with an attention call the chosen backend cannot serve (head dim, mask, dtype, "
                       "GPU, sequence length): 'fall back' lets the next backend that can serve it do so and "
                       "records why; 'stop' ends the run with every candidate and its reason.")


def _model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The diffusion model whose attention calls this node redirects.")


def _on_unsupported_input() -> io.Combo.Input:
    return io.Combo.Input("on_unsupported", options=list(ON_UNSUPPORTED), default=FALL_BACK,
                          tooltip=_ON_UNSUPPORTED_TIP)


def _tuning_input() -> io.Combo.Input:
    return io.Combo.Input("tuning", options=list(TUNING_MODES), default=REUSE, optional=True,
                          tooltip=("For 'auto_tuned' only. 'reuse saved': call shapes measured before on this GPU "
                                   "(same driver, torch and kernel versions) use the saved choice; new shapes are "
                                   "measured once (a few seconds at most each). 're-tune': forget the choices saved "
                                   "for this GPU and measure every shape of this run again. Saved in ComfyUI's "
                                   "user directory, attention_backends/tuning.json."))


def _model_output() -> io.Model.Output:
    return io.Model.Output(tooltip="A copy of the model using the chosen attention; the input model is unchanged.")


class AttentionBackend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttentionBackend",
            display_name="Attention Backend",
            category=CATEGORY,
            description=("Runs every attention call of this model, during sampling, on the chosen kernel "
                         "(PyTorch SDPA, SageAttention, FlashAttention, xFormers, comfy-kitchen, ...). "
                         "After each run it logs which backend served how many calls, and why any fell back."),
            inputs=[
                _model_input(),
                io.Combo.Input("backend", options=selectable(), default=AUTO,
                               tooltip=("The attention kernel. 'auto' picks per call shape from rules measured on "
                                        "an H200; 'auto_tuned' measures the eligible kernels on this GPU the first "
                                        "time a call shape appears and keeps the fastest accurate one. Every "
                                        "backend is listed on every machine so workflows travel; "
                                        "GET /attention_backends/status says which run here.")),
                _on_unsupported_input(),
                _tuning_input(),
            ],
            outputs=[_model_output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, backend: str, on_unsupported: str, tuning: str = REUSE) -> io.NodeOutput:
        priority, strict = resolve_priority([backend], on_unsupported)
        patched, _ = patch_model(model, priority=priority, strict=strict, selection=backend,
                                 node_id=cls.hidden.unique_id, node_type="AttentionBackend", tuning=tuning)
        return io.NodeOutput(patched)


def _priority_problem(priority: Optional[str]) -> Optional[str]:
    """Why the priority list cannot work, or None. A value wired from another node is
    unknown at validation time (None) and is checked when the node runs."""
    if not isinstance(priority, str):
        return None
    try:
        parse_priority(priority)
    except UnknownBackendError as error:
        return str(error)
    return None


_ADVANCED_TITLE, _ = BOOLEAN_INPUTS["AttentionBackendAdvanced"]


def _advanced_problem(priority: Optional[str], rules: RoutingRules, guard: object = True) -> Optional[str]:
    """Why the Advanced node's settings cannot work, or None: one message, the same when
    the prompt is validated and when the node runs."""
    problems = [problem for problem in (_priority_problem(priority),) if problem]
    problems += rules.problems()
    if not isinstance(guard, bool):
        problems.append(not_boolean_problem("nonfinite_guard", guard))
    return f"{_ADVANCED_TITLE}: " + "; ".join(problems) if problems else None


def _number(value: object, default: float) -> float:
    """A step bound as validation sees it: a wired value is unknown then (None)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


class AttentionBackendAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttentionBackendAdvanced",
            display_name=_ADVANCED_TITLE,
            category=CATEGORY,
            description=("Attention Backend with a priority list and precision controls: chosen steps, blocks and "
                         "short cross-attention stay on exact attention (PyTorch SDPA), and a guard re-runs a "
                         "model call with exact attention if its output holds NaN or Inf."),
            inputs=[
                _model_input(),
                io.String.Input("priority", default=AUTO,
                                tooltip=("Backends to try, best first, e.g. 'flash4 > sage > sdpa'. 'auto' stands "
                                         "for the automatic order at its position, 'auto_tuned' for the backend "
                                         "measured fastest on this GPU.")),
                _on_unsupported_input(),
                io.Float.Input("step_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip=("Steps before this fraction of the schedule use exact attention "
                                        "(0.1 with 20 steps: the first 2).")),
                io.Float.Input("step_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip=("Steps from this fraction of the schedule on use exact attention "
                                        "(0.9 with 20 steps: the last 2).")),
                io.Int.Input("exact_first_blocks", default=0, min=0, max=1000,
                             tooltip=("The first N attention blocks of the model, in execution order, use exact "
                                      "attention.")),
                io.Int.Input("exact_last_blocks", default=0, min=0, max=1000,
                             tooltip="The last N attention blocks of the model use exact attention."),
                io.Int.Input("cross_attention_exact_max_keys", default=0, min=0, max=1 << 20,
                             tooltip=("Cross-attention calls with at most this many keys (e.g. 77 text tokens) "
                                      "use exact attention. 0 turns the rule off.")),
                io.Boolean.Input("nonfinite_guard", default=True,
                                 tooltip=("Check each model output for NaN/Inf (one GPU sync per model call); on a "
                                          "hit, re-run that call with exact attention and keep exact attention "
                                          "for the rest of the run.")),
                _tuning_input(),
            ],
            outputs=[_model_output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, priority: Optional[str] = None, step_start: Optional[float] = None,
                        step_end: Optional[float] = None) -> bool | str:
        # ComfyUI (0.3.64 to 0.28.0) files the message under every input this function
        # takes, and skips its own min/max check of them: the window's range is checked
        # here (RoutingRules.problems), NaN included. The block counts keep ComfyUI's
        # checks. nonfinite_guard reaches this function already turned into a bool, so
        # it is checked as posted (raw_inputs.py).
        rules = RoutingRules(step_start=_number(step_start, 0.0), step_end=_number(step_end, 1.0))
        return _advanced_problem(priority, rules) or True

    @classmethod
    def execute(cls, model, priority: str, on_unsupported: str, step_start: float, step_end: float,
                exact_first_blocks: int, exact_last_blocks: int, cross_attention_exact_max_keys: int,
                nonfinite_guard: bool, tuning: str = REUSE) -> io.NodeOutput:
        rules = RoutingRules(step_start=step_start, step_end=step_end, first_blocks=exact_first_blocks,
                             last_blocks=exact_last_blocks, cross_max_keys=cross_attention_exact_max_keys)
        problem = _advanced_problem(priority, rules, nonfinite_guard)
        if problem:
            raise ValueError(problem)
        names = parse_priority(priority)
        ordered, strict = resolve_priority(names, on_unsupported)
        patched, _ = patch_model(model, priority=ordered, strict=strict, selection=" > ".join(names),
                                 node_id=cls.hidden.unique_id, node_type="AttentionBackendAdvanced",
                                 rules=rules, guard=nonfinite_guard, tuning=tuning)
        return io.NodeOutput(patched)


class AttentionBackendsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AttentionBackend, AttentionBackendAdvanced]


async def comfy_entrypoint() -> ComfyExtension:
    return AttentionBackendsExtension()
