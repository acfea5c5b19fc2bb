"""Masked attention calls on fast kernels (issue 12): speed against SDPA with the mask, and
error against a float32 reference with the mask, for the masks ComfyUI's models pass.

Cases (bf16, ComfyUI's call forms):
- hunyuan_unpadded: HunyuanVideo 720p 129f (B=1, 24 heads x 128, 118,800 image + 256 text
  tokens), its (1, 1, L) joint mask all zeros (prompt not padded): a no-op mask.
- hunyuan_padded: text first (ComfyUI 0.19 and newer), 40 of 256 text tokens kept: the
  kept keys are two runs (copied once into the kept keys).
- hunyuan_padded_image_first: the 0.3.64/0.8.0 order: the kept keys are a prefix (a view).
- hunyuan_b2: B=2 whose rows keep 40 and 77 text tokens (text first): rows differ.
- hunyuan_refiner: HunyuanVideo's token refiner (B=2, 256 text tokens, rows keep 40 and
  77): padded text tokens are queries too, their rows remove every key (SDPA computes them).
- lumina2_refiner: Lumina 2's context refiner (B=1, 24 x 96, 256 text tokens, 100 kept;
  0.3.64's 2-D additive mask).
- lumina2_main: Lumina 2 at 1024² (B=2, 4096 image + 256 text tokens), 0.3.64's all-zero
  (B, 1, L) mask: a no-op mask.
- ltxv_cross: LTXV 2B cross-attention (B=2, 32 x 64, 6144 video tokens x 128 text keys,
  flat form), (B, 1, 1, 128) mask with -finfo.max, rows keep 60 and 12 keys.
- flux_bias: a Redux-style bias on a Flux 1024² call: must be kept by every candidate.

Per case: SDPA with the mask as ComfyUI's attention_pytorch calls it, timed twice (the
second timing's ratio to the first is the noise floor), then each candidate through the
Dispatcher: `auto`, and each of flash4, flash3, sage_qk_int8_pv_fp8_cuda_sm90,
sage_qk_int8_pv_fp16_triton and sdpa alone (strict): the backend that served the call,
how (dropped, keys_trimmed, varlen, per_row, kept), its time against SDPA with the mask
(interleaved rounds, attention.measure), and its error on sampled query rows against
float32 SDPA with the mask. Candidates whose plan repeats an earlier one share its row.
The mask is classified once per case (as once per model call in ComfyUI); that read is
timed on its own (`classify_ms`).

Usage: python benchmarks/masked.py --out DIR            (an H200; about 100 s)
       python benchmarks/masked.py --out DIR --smoke    (the CPU: tiny shapes, and two
           CPU stand-ins for a mask-less kernel, with and without a variable-length entry,
           so every serving path runs)
Writes DIR/masked.json (environment and rows) and DIR/masked.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Optional

import torch

from overhead import load_pack
CANDIDATES = ("auto", "flash4", "flash3", "sage_qk_int8_pv_fp8_cuda_sm90", "sage_qk_int8_pv_fp16_triton", "sdpa")
SMOKE_CANDIDATES = ("auto", "cpu_maskless", "cpu_maskless_varlen", "sdpa", "sdpa_math")
COMPARED_ROWS = 1024
BUDGET_S = 110.0


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    label: str
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    flat: bool  # ComfyUI's (B, N, H*D) form; else (B, H, N, D)
    mask: Callable[[torch.dtype, torch.device], torch.Tensor]


def _text_additive(kept: list[int], text: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows, text) additive text mask as HunyuanVideo/LTXV make it: -finfo.max past `kept`."""
    mask = torch.zeros(len(kept), text, dtype=dtype, device=device)
    for row, n in enumerate(kept):
        mask[row, n:] = -torch.finfo(dtype).max
    return mask


def _joint(kept: list[int], text: int, image: int, text_first: bool):
    def build(dtype, device):
        txt = _text_additive(kept, text, dtype, device)
        mask = torch.zeros(len(kept), 1, 1, text + image, dtype=dtype, device=device)
        if text_first:
            mask[:, 0, 0, :text] = txt
        else:
            mask[:, 0, 0, image:] = txt
        return mask[0] if len(kept) == 1 else mask  # HunyuanVideo's own is (1, 1, L)
    return build


def _refiner(kept: list[int], text: int):
    """HunyuanVideo's IndividualTokenRefiner mask: mask[key] + mask[query], (B, 1, N, N)."""
    def build(dtype, device):
        txt = _text_additive(kept, text, dtype, device)
        m = txt.view(len(kept), 1, 1, text).repeat(1, 1, text, 1)
        return m + m.transpose(2, 3)
    return build


def _bias(n: int, image_prompt: int):
    def build(dtype, device):
        mask = torch.zeros(1, 1, n, n, dtype=dtype, device=device)
        mask[..., n - image_prompt:] = torch.tensor(0.3).log().item()  # Redux-style strength on its image tokens
        return mask
    return build


def cases(smoke: bool) -> list[Case]:
    if smoke:  # the same mask forms at CPU sizes
        image, text, lumina_image, ltxv_video, ltxv_text, flux, redux = 96, 16, 64, 48, 16, 80, 16
        kept, lumina_kept, ltxv_kept = (5, 9), 9, [7, 3]
    else:
        image, text, lumina_image, ltxv_video, ltxv_text, flux, redux = 118800, 256, 4096, 6144, 128, 4608, 729
        kept, lumina_kept, ltxv_kept = (40, 77), 100, [60, 12]
    hunyuan = dict(heads=24, head_dim=128, flat=False)
    # The targets first: a spent time budget skips what comes last.
    return [
        Case("hunyuan_padded", "HunyuanVideo 720p 129f, padded prompt (text first)", 1, seq_q=image + text,
             seq_k=image + text, mask=_joint([kept[0]], text, image, True), **hunyuan),
        Case("hunyuan_unpadded", "HunyuanVideo 720p 129f, unpadded prompt", 1, seq_q=image + text,
             seq_k=image + text, mask=_joint([text], text, image, True), **hunyuan),
        Case("hunyuan_b2", "HunyuanVideo 720p 129f, B=2, rows padded differently", 2, seq_q=image + text,
             seq_k=image + text, mask=_joint(list(kept), text, image, True), **hunyuan),
        Case("hunyuan_refiner", "HunyuanVideo token refiner, B=2 padded differently", 2, 24, text, text, 128, False,
             _refiner(list(kept), text)),
        Case("ltxv_cross", "LTXV 2B cross-attention, B=2 padded differently", 2, 32, ltxv_video, ltxv_text, 64, True,
             lambda dtype, device: _text_additive(ltxv_kept, ltxv_text, dtype, device).view(2, 1, 1, -1)),
        Case("lumina2_refiner", "Lumina 2 context refiner, padded caption", 1, 24, text, text, 96, False,
             lambda dtype, device: _text_additive([lumina_kept], text, dtype, device)),
        Case("lumina2_main", "Lumina 2 1024², all-zero image mask", 2, 24, lumina_image + text, lumina_image + text,
             96, False, lambda dtype, device: torch.zeros(2, 1, lumina_image + text, dtype=dtype, device=device)),
        Case("flux_bias", "Flux 1024², Redux-style bias (must be kept)", 1, 24, flux, flux, 128, False,
             _bias(flux, redux)),
        Case("hunyuan_padded_image_first", "HunyuanVideo 720p 129f, padded prompt (image first)", 1,
             seq_q=image + text, seq_k=image + text, mask=_joint([kept[0]], text, image, False), **hunyuan),
    ]


def register_cpu_stand_ins(attention) -> None:
    """--smoke: two mask-less kernels on the CPU (SDPA underneath), one with a
    variable-length entry (per-row SDPA over the packed rows), so that every way of serving
    a mask without it runs here."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def kernel(q, k, v, mask, scale, layout):
        assert mask is None
        return sdpa(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    def nhd(q, k, v, scale):
        return sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale).transpose(0, 1)

    def packed(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        out = torch.empty_like(q)
        bq, bk = cu_q.tolist(), cu_k.tolist()
        for row in range(len(bq) - 1):
            out[bq[row]:bq[row + 1]] = nhd(q[bq[row]:bq[row + 1]], k[bk[row]:bk[row + 1]], v[bk[row]:bk[row + 1]],
                                           scale)
        return out

    def key_lengths(q, k, v, used_k, scale):
        return torch.stack([nhd(q[row], k[row, :n], v[row, :n], scale) for row, n in enumerate(used_k.tolist())])

    bhnd = attention.backend.BHND
    no_mask = (attention.constraints.NoMask(),)
    for name, varlen in (("cpu_maskless", None), ("cpu_maskless_varlen", attention.backend.Varlen(packed, key_lengths))):
        attention.registry._BY_NAME[name] = attention.Backend(
            name=name, family="smoke", description="CPU stand-in for a mask-less kernel", quantized=False,
            layouts=(bhnd,), constraints=no_mask, load=lambda: kernel,
            load_varlen=None if varlen is None else (lambda entry=varlen: entry))


def sdpa_with_mask(q, k, v, mask, heads: int, flat: bool):
    """ComfyUI's attention_pytorch: heads-first views, the mask unsqueezed to 4-D."""
    if flat:
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    m = mask[None] if mask.ndim == 2 else mask
    m = m.unsqueeze(1) if m.ndim == 3 else m
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1) if flat else out


def as_bhnd(out: torch.Tensor, heads: int, flat: bool) -> torch.Tensor:
    return out.view(out.shape[0], out.shape[1], heads, -1).transpose(1, 2) if flat else out


def reference_rows(q, k, v, mask, case: Case, rows: torch.Tensor) -> torch.Tensor:
    """float32 SDPA with the mask on the sampled query rows, (B, H, rows, D)."""
    qf, kf, vf = (as_bhnd(t, case.heads, case.flat).float() for t in (q, k, v))
    m = mask[None] if mask.ndim == 2 else mask
    m = (m.unsqueeze(1) if m.ndim == 3 else m).float()
    if m.shape[2] > 1:
        m = m[:, :, rows]
    return torch.nn.functional.scaled_dot_product_attention(qf[:, :, rows], kf, vf, attn_mask=m)


def bench_case(case: Case, attention, names, device, dtype, deadline: float, smoke: bool) -> list[dict]:
    from attention_backends_pack.attention.bench.inputs import make_qkv
    from attention_backends_pack.attention.measure import errors, interleaved_median_ms
    from attention_backends_pack.attention.shapes import ModelShape

    layout = attention.FLAT if case.flat else attention.HEADS_FIRST
    shape = ModelShape(case.key, case.label, case.batch, case.heads, case.seq_q, case.seq_k, case.head_dim, layout)
    q, k, v = make_qkv(shape, device, dtype)
    mask = case.mask(dtype, device)
    form = {"skip_reshape": not case.flat, "skip_output_reshape": not case.flat}
    rows = torch.linspace(0, case.seq_q - 1, min(COMPARED_ROWS, case.seq_q), device=device).long().unique()
    reference = reference_rows(q, k, v, mask, case, rows)

    def error_of(out: torch.Tensor) -> dict:
        return errors(as_bhnd(out, case.heads, case.flat)[:, :, rows], reference)

    cache = attention.masks.MaskCache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    batch, heads, seq_q, seq_k = case.batch, case.heads, case.seq_q, case.seq_k
    mask_class = cache.classify(mask, batch, heads, seq_q, seq_k)
    classify_ms = (time.perf_counter() - start) * 1e3

    baseline = {"sdpa_mask": lambda: sdpa_with_mask(q, k, v, mask, case.heads, case.flat),
                "sdpa_mask_again": lambda: sdpa_with_mask(q, k, v, mask, case.heads, case.flat)}
    sdpa_error = error_of(baseline["sdpa_mask"]())
    plans, fns, skipped = {}, {}, {}
    for name in names:
        if time.perf_counter() > deadline:
            skipped[name] = "time budget spent"
            continue
        dispatcher = attention.Dispatcher(name, strict=name != "auto", mask_cache=cache)
        try:
            out = dispatcher(q, k, v, case.heads, mask, **form)
        except attention.NoBackendError as error:
            skipped[name] = "; ".join("; ".join(r.reasons) for r in error.rejected)[:300]
            continue
        plan = dispatcher.plans()[-1]
        served = (plan.name, plan.mask_service)
        if served in plans.values():
            plans[name] = served
            continue
        plans[name] = served
        fns[name] = (lambda d=dispatcher: d(q, k, v, case.heads, mask, **form), error_of(out))
    timed = interleaved_median_ms({**baseline, **{n: f for n, (f, _) in fns.items()}}, device,
                                  warmup=1, reps=2 if smoke or case.seq_q > 50000 else 5, budget_s=20.0, min_reps=2)
    common = {"case": case.key, "label": case.label, "batch": case.batch, "heads": case.heads, "seq_q": case.seq_q,
              "seq_k": case.seq_k, "head_dim": case.head_dim, "form": layout, "mask": list(mask.shape),
              "mask_dtype": str(mask.dtype).replace("torch.", ""), "mask_class": mask_class.describe(case.seq_k),
              "classify_ms": round(classify_ms, 3), "sdpa_mask_ms": timed["sdpa_mask"],
              "noise_floor": timed["sdpa_mask_again"] / timed["sdpa_mask"], "sdpa_error": sdpa_error}
    result = []
    for name in names:
        if name in skipped:
            result.append({**common, "candidate": name, "skipped": skipped[name]})
            continue
        backend, service = plans[name]
        owner = next(n for n in fns if plans[n] == plans[name])
        ms = timed[owner]
        result.append({**common, "candidate": name, "backend": backend, "service": service, "ms": ms,
                       "speedup": timed["sdpa_mask"] / ms, "error": fns[owner][1], "same_as": None
                       if owner == name else owner})
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| case | mask | candidate | served by | how | ms | × SDPA+mask | noise | rel. L1 (SDPA's) | cosine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['case']} | {row['mask_class']} | {row['candidate']} | – | skipped: "
                         f"{row['skipped'][:80]} | | | | | |")
            continue
        lines.append(f"| {row['case']} | {row['mask_class']} | {row['candidate']} | {row['backend']} | "
                     f"{row['service']} | {row['ms']:.3f} | {row['speedup']:.2f} | {row['noise_floor']:.3f} | "
                     f"{row['error']['rel_l1']:.4f} ({row['sdpa_error']['rel_l1']:.4f}) | {row['error']['cosine']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (proves the script runs)")
    parser.add_argument("--cases", default="", help="comma-separated case keys (default: all)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="candidates met after this many seconds are skipped and listed as such")
    args = parser.parse_args(argv)
    load_pack()
    import attention_backends_pack.attention as attention
    import attention_backends_pack.attention.masks  # noqa: F401  (attention.masks below)
    from attention_backends_pack.attention.bench.report import write_result

    if args.smoke:
        device, dtype, names = torch.device("cpu"), torch.float32, SMOKE_CANDIDATES
        register_cpu_stand_ins(attention)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke on the CPU)")
        device, dtype, names = torch.device("cuda"), torch.bfloat16, CANDIDATES
    deadline = time.perf_counter() + args.budget_s
    wanted = [c for c in cases(args.smoke) if not args.cases or c.key in args.cases.split(",")]
    rows = []
    for case in wanted:
        case_rows = bench_case(case, attention, names, device, dtype, deadline, args.smoke)
        rows.extend(case_rows)
        for row in case_rows:
            if "skipped" not in row:
                print(f"{case.key:28s} {row['candidate']:30s} {row['backend']:30s} {row['service']:13s} "  # noqa: T201
                      f"{row['speedup']:5.2f}x  rel.L1 {row['error']['rel_l1']:.4f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_result(args.out, "masked.json", rows)
    with open(os.path.join(args.out, "masked.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
