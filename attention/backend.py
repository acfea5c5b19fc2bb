"""The backend spec: what a kernel is, what it needs, and why it cannot run.

A `Backend` is declarative: its package, its constraints (data, see constraints.py),
its native layouts and whether it is exact. Behaviour lives in two small callables
its family module supplies: `load`, which imports the package and returns the kernel
adapter, and optionally `probe`, which checks the machine (GPU architecture, a tiny
self-call). Both run once per process; the answer, with every reason, is cached.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import torch

from .call import CallSignature
from .constraints import Constraint, collect_reasons

if TYPE_CHECKING:  # priority_list reads the registry, which lists these backends
    from .priority_list import Priority

log = logging.getLogger(__name__)

# Native layouts a kernel adapter can be handed. ComfyUI's flat (B, N, H*D) form is a
# free view of BNHD; its (B, H, N, D) form is BHND.
BHND = "BHND"
BNHD = "BNHD"


class Kernel(Protocol):
    """A backend's adapter: q, k, v in `layout`, a canonical mask or None, the softmax
    scale or None for 1/sqrt(D). Returns the output in the same layout."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: Optional[torch.Tensor], scale: Optional[float], layout: str) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class Varlen:
    """A kernel's variable-length entry points, on (tokens, heads, dim) tensors.

    packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale): the
        batch rows packed one after another, q (total_q, H, D), k and v (total_k, Hk, D);
        cu_seqlens are int32 on the tensors' device, (rows + 1,). Returns (total_q, H, D).
    key_lengths(q, k, v, used_k, scale): optional, for kernels that take per-row key
        counts on padded tensors (FA4's seqused_k): q (B, Nq, H, D), k and v (B, Nk, Hk, D)
        of which row b uses its first used_k[b] keys (int32 on the device). No packing copy.
    """

    packed: Callable[..., torch.Tensor]
    key_lengths: Optional[Callable[..., torch.Tensor]] = None


@dataclasses.dataclass(frozen=True)
class Package:
    """A Python package a backend imports. `distribution` is the name pip knows it by
    (and the one whose installed version is read)."""

    import_name: str
    distribution: str
    min_version: Optional[str] = None
    install_hint: str = ""

    def hint(self) -> str:
        return self.install_hint or f"pip install {self.distribution}"


@dataclasses.dataclass(frozen=True)
class Availability:
    available: bool
    version: Optional[str]
    reasons: tuple[str, ...]


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.replace("+", ".").replace("-", ".").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


# The version reported for a package importable without install metadata: a source tree
# built in place and put on the path (SpargeAttn's `setup.py build_ext --inplace`).
UNVERSIONED = "source build"


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(import_name: str) -> bool:
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


@dataclasses.dataclass(eq=False)
class Backend:
    """One attention kernel, as the dispatcher and the user see it.

    name: stable identifier saved in workflows; never rename one.
    layouts: layouts the adapter accepts, preferred first.
    contiguous: the adapter needs contiguous q/k/v (a copy when the view is strided).
    runtime_check: optional per-signature check on the real tensors (already in the
        kernel's layout), run once when a signature is first planned; for rules that
        only the library itself knows (PyTorch's SDPA kernel selection).
    copies: what the adapter copies or allocates beyond the kernel's own output, for
        the record (e.g. sage 1.x subtracts the key mean out of place: one copy of k).
    tunable: whether `auto_tuned` may measure it; False for kernels whose first call on
        a new shape costs far more than tuning may spend (compiles, huge buffers).
    load_varlen: optional loader of the kernel's variable-length entry points, which
        serve key-padding masks whose rows differ (mask_serving.py) in one launch.
    sparse: approximates attention by skipping most key blocks (attention.sparsity).
        Never in `auto`'s table nor measured by `auto_tuned`: it runs only where a user
        names it, with the settings and quality checks of the Sparse node.
    configure: for kernels that take per-node settings (sparse thresholds):
        `configure(kernel, settings, call)` is the adapter for calls shaped like `call`
        with `settings` bound, made once per call signature; `default_settings` serve
        a dispatcher given none.
    bind: for backends whose kernel depends on the call and on the priority entries
        after them (head_parallel serves each GPU's share with those): given the loaded
        kernel, the call and that rest of the list, returns the kernel for such calls; run once
        per call signature when its plan is prepared.
    """

    name: str
    family: str
    description: str
    quantized: bool
    layouts: tuple[str, ...]
    constraints: tuple[Constraint, ...]
    load: Callable[[], Kernel]
    package: Optional[Package] = None
    probe: Optional[Callable[[Kernel], list[str]]] = None
    runtime_check: Optional[Callable[..., list[str]]] = None
    contiguous: bool = False
    copies: str = ""
    tunable: bool = True
    load_varlen: Optional[Callable[[], Varlen]] = None
    sparse: bool = False
    configure: Optional[Callable[[Kernel, Any, CallSignature], Kernel]] = None
    default_settings: Any = None
    bind: Optional[Callable[[Kernel, CallSignature, Priority], Kernel]] = None
    _availability: Optional[Availability] = dataclasses.field(default=None, repr=False)
    _kernel: Optional[Kernel] = dataclasses.field(default=None, repr=False)
    _varlen: Optional[tuple[Optional[Varlen]]] = dataclasses.field(default=None, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def exact(self) -> bool:
        return not self.quantized

    def availability(self) -> Availability:
        """Whether this machine can run the backend at all, with every reason; cached."""
        if self._availability is None:
            with self._lock:
                if self._availability is None:
                    self._availability = self._check_availability()
        return self._availability

    def kernel(self) -> Kernel:
        """The loaded adapter. Only valid once `availability()` says available."""
        if self._kernel is None:
            raise RuntimeError(f"backend {self.name!r} is not available: "
                               + "; ".join(self.availability().reasons))
        return self._kernel

    def varlen(self) -> Optional[Varlen]:
        """The variable-length entry points, or None (none declared, backend unavailable,
        or this installed version lacks them); loaded once, when a plan first asks."""
        if self._varlen is None:
            loaded = None
            if self.load_varlen is not None and self.availability().available:
                try:
                    loaded = self.load_varlen()
                except Exception as error:  # an older build without the entry: served per row
                    log.info("attention backends: %s has no variable-length entry here (%s: %s)",
                             self.name, type(error).__name__, error)
            self._varlen = (loaded,)
        return self._varlen[0]

    def kernel_for(self, call: CallSignature, rest: Priority) -> Kernel:
        """The kernel for calls shaped like `call`; `rest`: the priority after this backend."""
        kernel = self.kernel()
        return kernel if self.bind is None else self.bind(kernel, call, rest)

    def not_supported_reasons(self, call: CallSignature) -> list[str]:
        """Why this backend cannot serve `call` here: availability first, then each
        per-call constraint. Empty means it can."""
        reasons = list(self.availability().reasons)
        reasons.extend(collect_reasons(self.constraints, call))
        return reasons

    def call_reasons(self, call: CallSignature) -> list[str]:
        """Per-call constraint reasons only, ignoring this machine (for synthetic calls)."""
        return collect_reasons(self.constraints, call)

    def reset_availability(self) -> None:
        """Forget the cached probe (tests, or after installing a package in-process)."""
        with self._lock:
            self._availability = None
            self._kernel = None
            self._varlen = None

    def _check_availability(self) -> Availability:
        version = None
        if self.package is not None:
            version = installed_version(self.package.distribution)
            if version is None and not self.package.min_version and _importable(self.package.import_name):
                version = UNVERSIONED  # no version to check against; loading it below decides
            if version is None:
                return Availability(False, None, (f"{self.package.distribution} is not installed "
                                                  f"({self.package.hint()})",))
            if self.package.min_version and _version_tuple(version) < _version_tuple(self.package.min_version):
                return Availability(False, version, (
                    f"{self.package.distribution} {version} is older than the {self.package.min_version} "
                    f"this backend needs ({self.package.hint()})",))
        else:
            version = torch.__version__
        try:
            kernel = self.load()
        except Exception as error:  # an import that fails is a reason, whatever it raised
            hint = f" ({self.package.hint()})" if self.package else ""
            return Availability(False, version, (f"cannot load: {type(error).__name__}: {error}{hint}",))
        if self.probe is not None:
            try:
                reasons = self.probe(kernel)
            except Exception as error:
                reasons = [f"self-test raised {type(error).__name__}: {error}"]
            if reasons:
                return Availability(False, version, tuple(reasons))
        self._kernel = kernel
        return Availability(True, version, ())
