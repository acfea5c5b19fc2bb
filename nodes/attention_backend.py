"""The node classes (ComfyUI's V3 schema). Logic lives in patch.py and its helpers."""

from __future__ import annotations

from typing import Optional

from comfy_api.latest import ComfyExtension, io

from ..attention import AUTO, Priority, PriorityError, parse_priority, sparse_names
from ..attention.quality import DEFAULT_BUDGET_REL_L1
from ..attention.sparsity import (SOL_MAX_EXTRA_TOKENS, SPARGE_MIN_TOPK, TEXT_FIRST, TEXT_POSITIONS, SolSettings,
                                  SpargeSettings)
from .patch import FALL_BACK, ON_UNSUPPORTED, patch_model, resolve_priority
from .raw_inputs import BOOLEAN_INPUTS, not_boolean_problem
from .routes import selectable
from .routing import RoutingRules
from .sparse import NODE_TYPE as SPARSE_NODE_TYPE
from .sparse import DEFAULT_RULES, SOL, all_problems, input_problems, patch_sparse, policy_for, settings_for
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
        parsed = parse_priority(priority)
    except PriorityError as error:
        return str(error)
    return _sparse_problem(parsed)


def _sparse_problem(priority: Priority) -> Optional[str]:
    sparse = [name for name in priority.backends if name in sparse_names()]
    if not sparse:
        return None
    return (f"{', '.join(sparse)}: sparse backends run on the Attention Backend (Sparse) node, which checks their "
            f"error and keeps the first steps and blocks dense; remove them from this priority list")


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
        parsed = parse_priority(priority)
        ordered, strict = resolve_priority(parsed, on_unsupported)
        patched, _ = patch_model(model, priority=ordered, strict=strict, selection=parsed.text,
                                 node_id=cls.hidden.unique_id, node_type="AttentionBackendAdvanced",
                                 rules=rules, guard=nonfinite_guard, tuning=tuning)
        return io.NodeOutput(patched)


_SOL = SolSettings()
_SPARGE = SpargeSettings()


class AttentionBackendSparse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=SPARSE_NODE_TYPE,
            display_name="Attention Backend (Sparse)",
            category=CATEGORY,
            description=("Sparse attention for long video self-attention: sol (comfy-kitchen Sol-Attn) or sparge "
                         "(SpargeAttention) compute only some key blocks exactly. Faster on long sequences, never "
                         "exact. Everything else runs on 'auto': the first and last steps and blocks you choose, "
                         "cross-attention, masked and short calls, and call shapes whose measured error goes over "
                         "the error budget. The run report shows the sampled errors."),
            inputs=[
                _model_input(),
                io.Combo.Input("backend", options=sparse_names(), default=SOL,
                               tooltip=("sol: comfy-kitchen's Sol-Attn (installed with ComfyUI; sm80+ GPUs, head dim "
                                        "128). sparge: SpargeAttention (built from source; sm80-sm90, head dim 64 or "
                                        "128). Calls they cannot take (masks, cross-attention, fewer than 12288 "
                                        "tokens, other head dims or dtypes) run on auto.")),
                io.Float.Input("sol_tau", default=_SOL.tau, min=0.0, max=4.0, step=0.05,
                               tooltip=("sol: threshold in standard deviations of each query block's pooled scores. "
                                        "Higher computes fewer key blocks exactly: faster, further from exact "
                                        "(core ComfyUI's node: 1.0 keeps ~16% of blocks, 1.5 ~7%). Public workflow "
                                        "notes report 1.3 failing human review on a video model and 0.5 passing. "
                                        "Ignored when sol_topk_ratio > 0.")),
                io.Float.Input("sol_topk_ratio", default=_SOL.topk_ratio, min=0.0, max=0.95, step=0.01,
                               tooltip=("sol: 0 selects key blocks by sol_tau. Above 0, each query block keeps this "
                                        "fraction of key blocks exactly instead: a fixed cost; higher is closer to "
                                        "exact and slower.")),
                io.Int.Input("sol_extra_tokens", default=_SOL.extra_tokens, min=0, max=SOL_MAX_EXTRA_TOKENS, step=64,
                             tooltip=("sol: per 64-token query block, up to this many single high-scoring tokens "
                                      "outside the chosen blocks are attended exactly too (0, 64, 128, 192, 256). "
                                      "More is closer to exact for some attention time; core ComfyUI recommends "
                                      "256.")),
                io.Float.Input("sparge_topk", default=_SPARGE.topk, min=SPARGE_MIN_TOPK, max=1.0, step=0.05,
                               tooltip=("sparge: fraction of key blocks (128 tokens on sm90) each query block "
                                        "computes, chosen by pooled scores. Higher is closer to exact and slower; "
                                        "0.5 is SpargeAttention's default. Ignored when sparge_cdfthreshd > 0.")),
                io.Float.Input("sparge_cdfthreshd", default=_SPARGE.cdfthreshd, min=0.0, max=1.0, step=0.01,
                               tooltip=("sparge: 0 selects key blocks by sparge_topk. Above 0, each query block "
                                        "computes the fewest best-scoring key blocks whose pooled attention mass "
                                        "reaches this fraction instead: adaptive, more blocks where attention is "
                                        "flat. Higher is closer to exact and slower (SpargeAttention's threshold "
                                        "API default: 0.98).")),
                io.Float.Input("sparge_simthreshd1", default=_SPARGE.simthreshd1, min=-1.0, max=1.0, step=0.05,
                               tooltip=("sparge: blocks whose tokens are less alike than this (mean cosine "
                                        "similarity) cannot be summarised by their mean and are always computed. "
                                        "Raising it computes more blocks: closer to exact, slower. The default "
                                        "-0.1 lets the selection decide almost everywhere.")),
                io.Float.Input("sparge_pvthreshd", default=_SPARGE.pvthreshd, min=1.0, max=1000.0, step=1.0,
                               tooltip=("sparge: inside the kernel, a key block's P·V product is skipped when its "
                                        "scores trail the row's running maximum by more than this (log2 units: "
                                        "50 skips weights under 2^-50). Larger skips less: closer to exact, "
                                        "slower.")),
                io.Int.Input("text_tokens", default=0, min=0, max=65536,
                             tooltip=("sol only: conditioning tokens that share the self-attention sequence (joint "
                                      "attention: Flux, Qwen-Image, SD3, HunyuanVideo) stay exact: every query "
                                      "attends them exactly and they attend everything exactly, in whole 64-token "
                                      "blocks (a few percent of the cost). A value above the real text length is "
                                      "safe (more tokens computed exactly). Wan's text is cross-attention, always "
                                      "dense: leave 0. 0: off.")),
                io.Combo.Input("text_position", options=list(TEXT_POSITIONS), default=TEXT_FIRST,
                               tooltip=("Where those tokens sit in the sequence: 'first' (Flux, Qwen-Image, SD3, "
                                        "HunyuanVideo on current ComfyUI) or 'last' (HunyuanVideo on older "
                                        "ComfyUI).")),
                io.Float.Input("step_start", default=DEFAULT_RULES.step_start, min=0.0, max=1.0, step=0.01,
                               tooltip=("Steps before this fraction of the schedule run dense (auto): the first "
                                        "steps lay out the picture, where sparse errors cost most. 0.2 with 20 "
                                        "steps: the first 4. Lower is faster.")),
                io.Float.Input("step_end", default=DEFAULT_RULES.step_end, min=0.0, max=1.0, step=0.01,
                               tooltip=("Steps from this fraction of the schedule on run dense (auto): the last "
                                        "steps settle fine detail. 0.9 with 20 steps: the last 2. 1.0 is faster.")),
                io.Int.Input("exact_first_blocks", default=DEFAULT_RULES.first_blocks, min=0, max=1000,
                             tooltip=("The first N attention blocks of the model, in execution order, run dense "
                                      "(auto). Lower is faster.")),
                io.Int.Input("exact_last_blocks", default=DEFAULT_RULES.last_blocks, min=0, max=1000,
                             tooltip="The last N attention blocks of the model run dense (auto). Lower is faster."),
                io.Float.Input("error_budget", default=DEFAULT_BUDGET_REL_L1, min=0.001, max=10.0, step=0.005,
                               tooltip=("Relative L1 error, against exact attention, above which a call shape "
                                        "leaves the sparse kernel for the rest of the run (auto instead; the run "
                                        "report says which and why). Measured on 256 query rows of the first "
                                        "calls of each shape and again at 3 points of the step window, one GPU "
                                        "sync per sampled call. The default 0.10 is about 5x what INT8/FP8 dense "
                                        "kernels show: it bounds the kernel's error, it does not judge the "
                                        "image. Higher keeps sparse on more calls.")),
            ],
            outputs=[_model_output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, backend: Optional[str] = None, text_tokens: Optional[int] = None,
                        step_start: Optional[float] = None, step_end: Optional[float] = None) -> bool | str:
        # Only the inputs whose problems lie between them: ComfyUI skips its own range
        # checks for every input this function takes, and files an error under each.
        problems = input_problems(backend, text_tokens, step_start, step_end)
        return "; ".join(problems) if problems else True

    @classmethod
    def execute(cls, model, backend: str, sol_tau: float, sol_topk_ratio: float, sol_extra_tokens: int,
                sparge_topk: float, sparge_cdfthreshd: float, sparge_simthreshd1: float, sparge_pvthreshd: float,
                text_tokens: int, text_position: str, step_start: float, step_end: float, exact_first_blocks: int,
                exact_last_blocks: int, error_budget: float) -> io.NodeOutput:
        settings = settings_for(backend, sol_tau=sol_tau, sol_topk_ratio=sol_topk_ratio,
                                sol_extra_tokens=sol_extra_tokens, sparge_topk=sparge_topk,
                                sparge_simthreshd1=sparge_simthreshd1, sparge_pvthreshd=sparge_pvthreshd,
                                sparge_cdfthreshd=sparge_cdfthreshd, text_tokens=text_tokens,
                                text_position=text_position)
        rules = RoutingRules(step_start=step_start, step_end=step_end, first_blocks=exact_first_blocks,
                             last_blocks=exact_last_blocks)
        policy = policy_for(rules, error_budget)
        problems = all_problems(backend, settings, rules, policy, text_tokens, text_position)
        if problems:
            raise ValueError("Attention Backend (Sparse): " + "; ".join(problems))
        patched, _ = patch_sparse(model, backend=backend, settings=settings, rules=rules, policy=policy,
                                  node_id=cls.hidden.unique_id)
        return io.NodeOutput(patched)


class AttentionBackendsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AttentionBackend, AttentionBackendAdvanced, AttentionBackendSparse]


async def comfy_entrypoint() -> ComfyExtension:
    return AttentionBackendsExtension()
