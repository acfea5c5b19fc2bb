"""Settings of the sparse backends: what each knob trades, and checks that name nonsense.

A sparse kernel computes only some key blocks of each query block exactly; how many is
a choice per node (the Attention Backend (Sparse) node), never a global one. A
Dispatcher is given one settings object per sparse backend; the backend's adapter binds
it, together with what follows from the call's length (sink block ranges), once per call
signature (`Backend.configure`), so a call pays for nothing but the kernel.

- `SolSettings`: comfy-kitchen's `sol_attn` (Sol-Attn). Each 64-token query block
  attends the key blocks its pooled scores route exactly (threshold `tau`, or top-k),
  its diagonal neighbours, the sink blocks, and optionally `extra_tokens` single
  high-scoring tokens; every other block enters the softmax as one pooled term.
- `SpargeSettings`: SpargeAttention's recommended API
  (`spas_sage2_attn_meansim_topk_cuda`): per query block a pooled-score selection of key
  blocks (top-k, or a softmax-mass threshold), with INT8 Q·K and FP8 (sm89/sm90) or FP16
  (sm80) P·V.
"""

from __future__ import annotations

import dataclasses
import math

# sol_attn routes 64-token blocks (comfy-kitchen 0.2.40).
SOL_BLOCK = 64
# sol_attn's token routing budget: a multiple of 64, at most 256 (its own check).
SOL_MAX_EXTRA_TOKENS = 256

TEXT_FIRST = "first"
TEXT_LAST = "last"
TEXT_POSITIONS = (TEXT_FIRST, TEXT_LAST)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SolSettings:
    """comfy-kitchen `sol_attn` knobs.

    tau: routing threshold in standard deviations of a query block's pooled scores;
        higher computes fewer key blocks exactly: faster, further from exact attention.
        comfy-kitchen's own default is 1.0 and core ComfyUI's node uses 1.3; public
        workflow notes report 1.3 failing human review on a video model and 0.5 (with
        the conditioning keys and some blocks exact) passing, hence 0.5 here.
    topk_ratio: 0 selects by `tau`; above 0, each query block keeps this fraction of
        key blocks instead (SLA-style top-k, the selection some distilled LoRAs expect).
    extra_tokens: per query block, up to this many single tokens outside the routed
        blocks that score highest are attended exactly too (comfy-kitchen's
        `token_aug`; core ComfyUI recommends 256): closer to exact for some time.
    text_tokens, text_position: conditioning tokens that share the self-attention
        sequence (joint attention: text first in Flux, Qwen-Image and SD3, last in
        HunyuanVideo) are attended exactly by every query, and attend everything
        exactly (sol_attn's sink_blocks / sink_q, whole 64-token blocks). 0: none.
    """

    tau: float = 0.5
    topk_ratio: float = 0.0
    extra_tokens: int = 256
    text_tokens: int = 0
    text_position: str = TEXT_FIRST

    def problems(self) -> list[str]:
        """Why these settings cannot work (empty when they can)."""
        found = []
        if not _finite(self.tau) or self.tau < 0:
            found.append(f"sol tau must be a number >= 0 (got {self.tau})")
        if not _finite(self.topk_ratio) or not (self.topk_ratio == 0 or 0 < self.topk_ratio < 1):
            found.append(f"sol topk_ratio must be 0 (select by tau) or between 0 and 1 (got {self.topk_ratio})")
        if (not isinstance(self.extra_tokens, int) or not 0 <= self.extra_tokens <= SOL_MAX_EXTRA_TOKENS
                or self.extra_tokens % SOL_BLOCK):
            found.append(f"sol extra_tokens must be 0, 64, 128, 192 or 256 (got {self.extra_tokens})")
        if not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            found.append(f"text_tokens cannot be negative (got {self.text_tokens})")
        if self.text_position not in TEXT_POSITIONS:
            found.append(f"text_position must be one of {TEXT_POSITIONS} (got {self.text_position!r})")
        return found

    def sinks(self, tokens: int) -> tuple[list[int], list[int]]:
        """sol_attn's `sink_blocks` and `sink_q` ([start, end) in 64-token blocks) for a
        sequence of `tokens`: the blocks holding the conditioning tokens, or empty."""
        blocks = -(-tokens // SOL_BLOCK)
        if not self.text_tokens:
            return [0, 0], [0, 0]
        if self.text_position == TEXT_FIRST:
            span = [0, min(blocks, -(-self.text_tokens // SOL_BLOCK))]
        else:
            span = [max(0, (tokens - self.text_tokens) // SOL_BLOCK), blocks]
        return span, list(span)

    def kernel_arguments(self, tokens: int) -> dict:
        """Keyword arguments of `sol_attn` for calls of `tokens` tokens."""
        sink_blocks, sink_q = self.sinks(tokens)
        return {"tau": float(self.tau), "topk_ratio": float(self.topk_ratio), "token_aug": int(self.extra_tokens),
                "sink_blocks": sink_blocks, "sink_q": sink_q}

    def describe(self) -> str:
        selection = f"top-k {self.topk_ratio:g}" if self.topk_ratio else f"tau {self.tau:g}"
        text = f", text {self.text_position} {self.text_tokens} exact" if self.text_tokens else ""
        return f"{selection}, extra tokens {self.extra_tokens}{text}"


# SpargeAttention's block sizes on sm90 (query 64, key 128 tokens; 128/64 on sm80/sm89):
# its top-k keeps int(topk * key blocks) blocks per query block (truncated), so at the
# 12288-token floor (96 key blocks of 128) topk must be >= 1/96 to keep any; 0.05 keeps 4.
SPARGE_MIN_TOPK = 0.05


@dataclasses.dataclass(frozen=True)
class SpargeSettings:
    """SpargeAttention knobs, passed to `spas_sage2_attn_meansim_topk_cuda` (SpargeAttn
    at commit bfd980b, 2025-12: `topk=0.5, simthreshd1=-0.1, cdfthreshd=None,
    pvthreshd=50` are its defaults there; the README's recommended call is `topk=0.5`).

    Selection, per query block (64 tokens on sm90, 128 on sm80/sm89), over mean-pooled
    key blocks (128 tokens on sm90, 64 otherwise) scored by softmax(pooled q·k / sqrt(d)):
    topk: the int(topk × key blocks) best-scoring key blocks are computed (README: higher
        is more accurate, lower is sparser). Used when cdfthreshd is 0.
    cdfthreshd: above 0, the fewest best-scoring key blocks whose pooled softmax mass
        reaches this fraction are computed instead (adaptive: more blocks where attention
        is flat, fewer where it is peaked; the library's `spas_sage2_attn_meansim_cuda`
        default is 0.98, which its README no longer recommends without per-model tuning).
    simthreshd1: a block whose tokens are less alike than this (mean pairwise cosine
        similarity, diagonal included) cannot be summarised by its mean, so it is always
        computed, as a query block (every key) and as a key block (every query); raising it
        computes more blocks. -0.1 (the top-k default) lets the selection decide almost
        everywhere; 0.6 is the cdf API's default.
    pvthreshd: inside the kernel, a computed key block's P·V product is skipped when the
        block's largest score trails the row's running maximum by more than this (in
        the kernel's scaled log2 units; 50 skips nothing that would show in bf16); larger
        skips less (more exact, slower).
    """

    topk: float = 0.5
    simthreshd1: float = -0.1
    pvthreshd: float = 50.0
    cdfthreshd: float = 0.0

    def problems(self) -> list[str]:
        found = []
        if not _finite(self.topk) or not SPARGE_MIN_TOPK <= self.topk <= 1:
            found.append(f"sparge topk must be in [{SPARGE_MIN_TOPK}, 1] (got {self.topk})")
        if not _finite(self.cdfthreshd) or not 0 <= self.cdfthreshd <= 1:
            found.append(f"sparge cdfthreshd must be 0 (select by topk) or in (0, 1] (got {self.cdfthreshd})")
        if not _finite(self.simthreshd1) or not -1 <= self.simthreshd1 <= 1:
            found.append(f"sparge simthreshd1 must be in [-1, 1] (got {self.simthreshd1})")
        if not _finite(self.pvthreshd) or self.pvthreshd <= 0:
            found.append(f"sparge pvthreshd must be > 0 (got {self.pvthreshd})")
        return found

    def kernel_arguments(self, tokens: int) -> dict:
        """Keyword arguments of `spas_sage2_attn_meansim_topk_cuda`: it asserts that
        exactly one of `topk` and `cdfthreshd` is set (the other None)."""
        selection = ({"topk": None, "cdfthreshd": float(self.cdfthreshd)} if self.cdfthreshd
                     else {"topk": float(self.topk), "cdfthreshd": None})
        return {**selection, "simthreshd1": float(self.simthreshd1), "pvthreshd": float(self.pvthreshd)}

    def describe(self) -> str:
        selection = f"cdf {self.cdfthreshd:g}" if self.cdfthreshd else f"top-k {self.topk:g}"
        return f"{selection}, simthreshd1 {self.simthreshd1:g}, pvthreshd {self.pvthreshd:g}"
