"""Errors that say what happened to every candidate, and what to do about it."""

from __future__ import annotations

import dataclasses

from .call import CallSignature

def describe_exception(error: BaseException) -> str:
    """"RuntimeError: first line of the message": what a reason or a log line shows of an error."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# How a candidate was passed over.
RULE = "rule"                # auto's shape rule prefers another kernel here (not a fallback)
UNAVAILABLE = "unavailable"  # cannot run on this machine at all
UNSUPPORTED = "unsupported"  # cannot serve this call (mask, head dim, dtype, ...)
FAILED = "failed"            # raised on this signature earlier; remembered
QUALITY = "quality"          # over its node's error budget on this signature, for the rest of the run


@dataclasses.dataclass(frozen=True)
class Rejection:
    backend: str
    reasons: tuple[str, ...]
    kind: str
    explicit: bool  # named by the user rather than brought in by `auto`

    @property
    def is_fallback_cause(self) -> bool:
        """Whether passing over this candidate means the call fell back.

        Auto's shape rules are choices, not fallbacks, and a kernel that auto would
        have liked but that is not installed is not a fallback either (doctor lists
        it); a backend the user named that cannot run is.
        """
        if self.kind == RULE:
            return False
        if self.kind == UNAVAILABLE:
            return self.explicit
        return True


class NoBackendError(RuntimeError):
    """No candidate could serve the call; the message lists every candidate and why."""

    def __init__(self, call: CallSignature, rejected: tuple[Rejection, ...], strict: bool,
                 hint: str = "") -> None:
        self.call = call
        self.rejected = rejected
        lines = [f"No attention backend could serve this call: {call.describe()}"]
        for rejection in rejected:
            lines.append(f"  `{rejection.backend}` was not used ({rejection.kind}) because:")
            lines.extend(f"     {reason}" for reason in rejection.reasons)
        if strict:
            lines.append("Strict mode is on: choose 'fall back' on the Attention Backend node to let another "
                         "backend serve such calls, or pick a backend listed as able to.")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))
