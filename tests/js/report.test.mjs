import { test } from "node:test";
import assert from "node:assert/strict";
import {
  REPORT_EVENT, fallbackLines, kernelFailedInRun, planLines, formatCount, formatDuration, formatShare, noteLines, oneLine, qualityLines,
  reportsFromResponse, shareRows, summariseReport,
} from "../../web/lib/report.js";
import { fixture } from "./helpers.mjs";

// Made by the pack's Python (tests/js_fixtures.py): Flux on an H200 with flash4 named
// (masked calls fall back to sdpa), and a node whose model never called the override.
const flux = fixture("report_flux.json");
const never = fixture("report_never_invoked.json");

test("the event name is the documented one", () => {
  assert.equal(REPORT_EVENT, "attention_backends.report");
});

test("formatting", () => {
  const cases = [
    [formatShare, 0.947, "94.7%"], [formatShare, 0.5, "50%"], [formatShare, 1, "100%"], [formatShare, 0, "0%"],
    [formatShare, 0.0004, "<0.1%"], [formatShare, 0.99999, ">99.9%"], [formatShare, undefined, "–"],
    [formatCount, 1520, "1,520"], [formatCount, 1234567, "1,234,567"], [formatCount, 12, "12"],
    [formatDuration, 3.24, "3.2 s"], [formatDuration, 0.25, "250 ms"], [formatDuration, 125, "2 min 5 s"],
    [formatDuration, null, ""],
  ];
  for (const [format, value, expected] of cases) assert.equal(format(value), expected, `${format.name}(${value})`);
});

test("shares are sorted by calls and use the report's shares", () => {
  const rows = shareRows(flux);
  assert.deepEqual(rows.map((r) => [r.backend, r.calls, r.label]), [["flash4", 1440, "94.7%"], ["sdpa", 80, "5.3%"]]);
  // Without `shares`, computed from `served`.
  const computed = shareRows({ served: { a: 1, b: 3 } });
  assert.deepEqual(computed.map((r) => [r.backend, r.label]), [["b", "75%"], ["a", "25%"]]);
  assert.equal(oneLine(flux), "flash4 94.7% · sdpa 5.3%");
});

test("fallbacks carry route, count and reason", () => {
  assert.deepEqual(fallbackLines(flux).map((f) => f.text), ["flash4 → sdpa ×80: takes no mask (the call has a additive mask)"]);
});

test("notes only for counters that happened", () => {
  assert.deepEqual(noteLines(flux), []);
  const notes = noteLines({ routing: { exact_by_step_window: 40, exact_by_block_filter: 1 },
                            guard: { nonfinite_model_calls: 2, reruns: 2, pinned_exact: true } });
  assert.deepEqual(notes, [
    "40 calls exact outside the step window",
    "1 call exact by block filter",
    "guard: 2 model call(s) produced NaN/Inf, 2 re-run with exact attention (pinned exact)",
  ]);
});

test("summary of a normal run", () => {
  const s = summariseReport(flux, { currentSelection: "flash4" });
  assert.equal(s.level, "warn"); // it had a fallback
  assert.equal(s.headline, "Last run: 1,520 attention calls · 3.2 s · Flux");
  assert.equal(s.rows.length, 2);
  assert.equal(s.stale, false);
  assert.equal(s.warnings.length, 0);
});

test("summary of a run where the override never fired", () => {
  const s = summariseReport(never, { currentSelection: "sage" });
  assert.equal(s.level, "error");
  assert.match(s.headline, /0 attention calls/);
  assert.match(s.warnings[0], /never invoked/);
});

test("a report from another selection is marked stale", () => {
  const s = summariseReport(flux, { currentSelection: "sdpa" });
  assert.equal(s.stale, true);
  assert.match(s.staleText, /ran with "flash4"/);
});

test("partial coverage shows both counts", () => {
  const s = summariseReport({ ...flux, model_attention_calls: 2000 });
  assert.match(s.headline, /1,520 attention calls of 2,000/);
  assert.equal(summariseReport(null), null);
});

test("reportsFromResponse accepts the route's shapes", () => {
  assert.deepEqual(Object.keys(reportsFromResponse({ reports: { 12: flux, "5:3": never } })).sort(), ["12", "5:3"]);
  assert.deepEqual(Object.keys(reportsFromResponse(flux)), ["12"]);
  assert.deepEqual(reportsFromResponse(null), {});
  assert.deepEqual(reportsFromResponse({}), {});
});

test("the Advanced node's priority spelling does not make a report stale", () => {
  const adv = { ...flux, node_type: "AttentionBackendAdvanced", selection: "flash4 > sage > sdpa" };
  assert.equal(summariseReport(adv, { currentSelection: "flash4>sage, sdpa" }).stale, false);
  assert.equal(summariseReport(adv, { currentSelection: "sage > sdpa" }).stale, true);
});

test("plan lines for tooltips, from the plans' shapes", () => {
  assert.deepEqual(planLines(flux), [
    "B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16 cuda sm90 → flash4 ×1,440",
    "B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16 cuda sm90 mask=additive:1x1x4608x4608 → sdpa ×80",
  ]);
  assert.deepEqual(planLines({}), []);
  // A report without shapes (a server before them) shows its signature text.
  assert.deepEqual(planLines({ plans: [{ signature: "B=1 H=2", backend: "sdpa", calls: 3 }] }), ["B=1 H=2 → sdpa ×3"]);
});

test("calls refused in stop mode are counted apart and make the run an error", () => {
  const stopped = { ...flux, served: {}, shares: {}, total_calls: 0, model_attention_calls: 1, refused_calls: 1,
                    plans: [{ ...flux.plans[1], backend: "comfyui", calls: 0, refused: 1 }], fallbacks: [] };
  const s = summariseReport(stopped, { currentSelection: "flash4" });
  assert.equal(s.level, "error");
  assert.equal(s.headline, "Last run: 0 attention calls of 1 · 1 refused (stop) · 3.2 s · Flux");
  assert.match(planLines(stopped)[0], /→ comfyui ×0, 1 refused$/);
});

test("calls passed on to an earlier override show under its name", () => {
  const chained = { ...flux, served: { "attention_sage (ComfyUI-KJNodes)": 80, flash4: 1440 },
                    shares: { "attention_sage (ComfyUI-KJNodes)": 0.0526, flash4: 0.9474 },
                    passed_on_to: "attention_sage (ComfyUI-KJNodes)" };
  assert.equal(oneLine(chained), "flash4 94.7% · attention_sage (ComfyUI-KJNodes) 5.3%");
});

test("the sparse node's quality lines", () => {
  const report = {
    ...flux, node_type: "AttentionBackendSparse", selection: "sol",
    quality: {
      budget_rel_l1: 0.1, rows: 256, calls_per_check: 4, checkpoints: [0.375, 0.55, 0.725], sampled_calls: 9,
      signatures: [
        { signature: "B=1 H=40 Nq=75600 Nk=75600 D=128 bfloat16 cuda sm90", backend: "sol", settings: "tau 0.5",
          checks: [{ check: 0, calls: 4 }, { check: 1, calls: 4 }], worst_rel_l1: 0.0312, over_budget: false,
          served_instead: null },
        { signature: "B=1 H=40 Nq=32760 Nk=32760 D=128 bfloat16 cuda sm90", backend: "sol", settings: "tau 0.5",
          checks: [{ check: 0, calls: 1 }], worst_rel_l1: 0.2, over_budget: true, served_instead: "sdpa" },
      ],
    },
  };
  assert.deepEqual(qualityLines(report), [
    "sol · B=1 H=40 Nq=75600 Nk=75600 D=128 bfloat16 cuda sm90: worst rel. L1 0.031 in 8 sampled calls (budget 0.1)",
    "sol · B=1 H=40 Nq=32760 Nk=32760 D=128 bfloat16 cuda sm90: worst rel. L1 0.200 in 1 sampled call (budget 0.1)" +
      "; over budget, sdpa from then on",
  ]);
  assert.deepEqual(summariseReport(report, { currentSelection: "sol" }).notes, qualityLines(report));
  assert.deepEqual(qualityLines(flux), []);
});

test("a run whose kernel raised is told apart (the sidebar then reloads the remembered failures)", () => {
  // sage raised on its first call; the rest of the run went to sdpa (tests/js_fixtures.py).
  const failed = fixture("report_kernel_failed.json");
  assert.equal(kernelFailedInRun(failed), true);
  assert.deepEqual(fallbackLines(failed).map((l) => l.text),
    ["sage → sdpa ×3: raised RuntimeError: CUDA error: an illegal memory access was encountered"]);
  for (const name of ["report_flux.json", "report_auto_tuned.json", "report_never_invoked.json"]) {
    assert.equal(kernelFailedInRun(fixture(name)), false, name);
  }
  assert.equal(kernelFailedInRun(null), false);
  assert.equal(kernelFailedInRun({ plans: [{ passed_over: [null] }, {}] }), false);
});
