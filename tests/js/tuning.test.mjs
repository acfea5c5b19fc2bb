import { test } from "node:test";
import assert from "node:assert/strict";
import {
  budgetText, candidateRows, decisionView, fingerprintDetails, fingerprintSummary, formatCosine, formatError, formatMs,
  formatRatio, formatSeconds, formatTunedAt, runnerUp, runnerUpText, runTuning, shapeText, summariseTuning, tunedOnThisMachine,
  tuningTooltipLines, verdictLabel,
} from "../../web/lib/tuning.js";
import { describePriority, describeSelection } from "../../web/lib/status.js";
import { planLines, summariseReport } from "../../web/lib/report.js";
import { fixture } from "./helpers.mjs";

// Made by the pack's Python (tests/js_fixtures.py): the status route's `tuning` for the
// committed H200 file, and an SDXL run report whose decisions are three of that file's
// (two measured this run, one saved, one shape left to auto).
const h200 = fixture("status_tuning_h200.json");
const sdxl = fixture("report_auto_tuned.json");
// A Wan run with `auto`: its one contested call timed once this run (tests/js_fixtures.py).
const wan = fixture("report_auto_measured.json");
const gpu = fixture("status_gpu_synthetic.json");
const cpu = fixture("status_cpu.json");

const FLUX = "bfloat16|B1|H24|Hkv24|Nq4608|Nk4608|D128|Dv128|mask=none|in=B,H,N,D|out=B,H,N,D|prec=-|lowp=1|scale=0";
const CROSS = "bfloat16|B2|H20|Hkv20|Nq1024|Nk77|D64|Dv64|mask=none|in=B,N,H*D|out=B,N,H*D|prec=-|lowp=1|scale=0";
const decisionOf = (signature) => h200.devices[0].decisions.find((d) => d.signature === signature);

test("a call's shape reads like the plans' signatures", () => {
  assert.equal(shapeText(decisionOf(FLUX).shape), "B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16");
  assert.equal(shapeText(decisionOf(CROSS).shape), "B=2 H=20 Nq=1024 Nk=77 D=64 bfloat16");
  assert.equal(shapeText({ dtype: "float16", batch: 1, heads: 32, kv_heads: 8, q_tokens: 512, k_tokens: 512,
    head_dim: 128, v_head_dim: 64, mask: { kind: "additive", shape: [1, 1, 512, 512] }, precision: "float32",
    low_precision_ok: false, custom_scale: true, device: "cuda", capability: "9.0" }),
  "B=1 H=32/8kv Nq=512 Nk=512 D=128 Dv=64 float16 cuda sm90 mask=additive:1x1x512x512 precision=float32 " +
    "low precision refused custom scale");
  // A plan's shape names its device; a saved decision's does not (the store files it under one).
  assert.equal(planLines(sdxl)[0].split(" → ")[0], "B=2 H=20 Nq=1024 Nk=1024 D=64 bfloat16 cuda sm90");
  assert.equal(shapeText(null), "");
});

test("numbers in the candidates table", () => {
  const cases = [
    [formatMs, 0.4209618848912856, "0.421"], [formatMs, 1.5974879264831543, "1.60"], [formatMs, 31.24, "31.2"],
    [formatMs, 312.04, "312"], [formatMs, null, "–"],
    [formatRatio, 1.0612, "1.06×"], [formatRatio, undefined, "–"],
    [formatError, 0, "0"], [formatError, 0.013947332155725425, "0.014"], [formatError, 0.0006207198498132725, "6.2e-4"],
    [formatError, 7.407114924967636e-06, "7.4e-6"], [formatError, null, "–"],
    [formatCosine, 1, "1"], [formatCosine, 0.9999997610196918, ">0.999999"], [formatCosine, 0.9998089, "0.999809"],
    [formatCosine, NaN, "–"],
    [formatSeconds, 0.61, "0.61 s"], [formatSeconds, 12.34, "12.3 s"], [formatSeconds, null, ""],
    [formatTunedAt, "2026-11-21T10:42:13+00:00", "2026-11-21 10:42 UTC"], [formatTunedAt, "2026-11-21T10:42:13+02:00",
      "2026-11-21 10:42 +02:00"], [formatTunedAt, "yesterday", "yesterday"], [formatTunedAt, "", ""],
  ];
  for (const [format, value, expected] of cases) assert.equal(format(value), expected, `${format.name}(${value})`);
  assert.equal(budgetText({ rel_l1: 0.02, min_cosine: 0.9995 }), "rel. L1 ≤ 0.02, cosine ≥ 0.9995");
  assert.equal(budgetText(null), "");
});

test("verdicts become short labels by their kind, the text stays for the tooltip", () => {
  const labels = (kind, text = "") => [verdictLabel({ kind, text }).label, verdictLabel({ kind, text }).cls];
  assert.deepEqual(labels("chosen", "chosen"), ["chosen", "good"]);
  assert.deepEqual(labels("slower", "slower: 1.254x the chosen time"), ["slower", "muted"]);
  assert.deepEqual(labels("inside_noise", "inside the noise floor: 0.979x the chosen time"), ["inside noise", "muted"]);
  assert.deepEqual(labels("over_budget"), ["over budget", "bad"]);
  assert.deepEqual(labels("nonfinite"), ["non-finite", "bad"]);
  assert.deepEqual(labels("raised"), ["raised", "bad"]);
  assert.deepEqual(labels("not_measured"), ["not measured", "muted"]);
  assert.deepEqual(labels("not_timed"), ["not timed", "muted"]);
  assert.deepEqual(labels("unknown", "a verdict from a newer tuner"), ["a verdict from a newer tuner", "muted"]);
  assert.deepEqual(verdictLabel(undefined), { label: "?", cls: "muted" });
  // Every verdict the server sent for the committed H200 file has a kind this page knows.
  for (const d of h200.devices[0].decisions) {
    for (const row of Object.values(d.candidates)) assert.notEqual(row.verdict.kind, "unknown", row.verdict.text);
  }
});

test("the runner-up is the fastest other candidate inside the error budget", () => {
  const flux = decisionOf(FLUX);
  const r = runnerUp(flux);
  assert.equal(r.backend, "sdpa");
  assert.equal(formatRatio(r.ratio), "1.06×");
  assert.equal(runnerUpText(flux), "runner-up sdpa 1.06×");
  // SDXL's 77-key cross-attention: the FP8 Sage kernels were over the budget, not runners-up.
  assert.equal(runnerUp(decisionOf(CROSS)).backend, "sdpa_efficient");
  // A faster candidate outside the budget is passed over.
  const v = (kind, text) => ({ kind, text });
  const refused = { backend: "sdpa", budget: { rel_l1: 0.02, min_cosine: 0.9995 }, candidates: {
    sdpa: { ms: 1.0, rel_l1: 0, cosine: 1, verdict: v("chosen", "chosen") },
    fast: { ms: 0.5, rel_l1: 0.03, cosine: 0.9999, verdict: v("over_budget", "over the error budget: rel. L1 0.0300 > 0.02") },
    nan: { ms: 0.4, rel_l1: 0, cosine: 1, nonfinite: 2, verdict: v("nonfinite", "2 non-finite values") },
    untimed: { ms: null, rel_l1: 0, cosine: 1, verdict: v("not_timed", "not timed") },
    slow: { ms: 2.0, rel_l1: 0.001, cosine: 0.99999, verdict: v("slower", "slower: 2.000x the chosen time") },
  } };
  assert.deepEqual(runnerUp(refused), { backend: "slow", ms: 2.0, ratio: 2 });
  // Nothing else inside the budget, or nothing at all.
  assert.equal(runnerUp({ backend: "sdpa", candidates: { sdpa: { ms: 1, verdict: v("chosen", "chosen") } } }), null);
  assert.equal(runnerUpText({ backend: "sdpa", candidates: {} }), "no runner-up inside the error budget");
  // A ratio closer to 1 than the reference's two timings is marked as noise.
  assert.equal(runnerUpText({ ...flux, noise_floor: 0.07 }), "runner-up sdpa 1.06× (inside the noise floor)");
  assert.equal(runnerUpText({ ...flux, noise_floor: 0.02 }), "runner-up sdpa 1.06×");
  assert.equal(runnerUp({}), null);
});

test("candidate rows: the chosen one first, then by time, untimed last", () => {
  const rows = candidateRows(decisionOf(CROSS));
  assert.equal(rows[0].backend, "sdpa");
  assert.equal(rows[0].chosen, true);
  assert.equal(rows[0].verdict.label, "chosen");
  const timed = rows.filter((r) => r.ms != null).map((r) => r.ms);
  assert.deepEqual(timed.slice(1), [...timed.slice(1)].sort((a, b) => a - b));
  assert.deepEqual(rows.slice(-2).map((r) => [r.backend, r.msText, r.ratioText, r.relL1Text, r.verdict.label]), [
    ["sage_qk_int8_pv_fp8_cuda", "–", "–", "0.026", "over budget"],
    ["sage_qk_int8_pv_fp8_cuda_sm90", "–", "–", "0.026", "over budget"],
  ]);
  assert.equal(rows[1].backend, "sdpa_efficient");
  assert.equal(rows[1].ratioText, "1.38×");
  assert.equal(rows[1].verdict.title, "slower: 1.376x the chosen time");
  assert.deepEqual(candidateRows({}), []);
});

test("a decision's view: backend, shape, source, facts", () => {
  const view = decisionView({ ...decisionOf(FLUX), source: "measured", complete: true });
  assert.equal(view.line, "flash4 ← B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16 · measured");
  assert.equal(view.signature, FLUX);
  assert.equal(view.short, "B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16");
  assert.equal(view.rows.length, Object.keys(decisionOf(FLUX).candidates).length);
  assert.match(view.facts, /^reference sdpa · budget rel\. L1 ≤ 0\.02, cosine ≥ 0\.9995 · tuned in \d+ ms · 2026-11-21 \d\d:\d\d UTC$/);
  // A saved decision (status route) names no source; a partial one says it was not saved.
  assert.equal(decisionView(decisionOf(FLUX)).line, "flash4 ← B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16");
  const partial = decisionView({ ...decisionOf(FLUX), source: "measured", complete: false });
  assert.equal(partial.complete, false);
  assert.match(partial.line, /measured \(partial, not saved\)$/);
  assert.equal(decisionView(null).line, "? ← ");
});

test("the run's tuning line", () => {
  const s = summariseTuning(sdxl.tuning);
  assert.equal(s.text, "auto_tuned: 2 shapes measured in 0.29 s, 1 reused, 1 left to auto (budget spent)");
  assert.equal(s.cls, "warn");
  assert.deepEqual(s.decisions.map((d) => [d.backend, d.source]), [["sdpa_cudnn", "measured"], ["sdpa", "measured"], ["sdpa", "saved"]]);
  assert.equal(s.file, "/home/me/ComfyUI/user/attention_backends/tuning.json");
  // The example of the brief's wording, and the other cases.
  assert.equal(summariseTuning({ measured: 2, reused: 3, tuning_s: 0.61, left_to_auto: [], decisions: [] }).text,
    "auto_tuned: 2 shapes measured in 0.61 s, 3 reused");
  const reused = summariseTuning({ ...sdxl.tuning, measured: 0, reused: 3, tuning_s: 0, left_to_auto: [] });
  assert.equal(reused.text, "auto_tuned: 3 shapes reused");
  assert.equal(reused.cls, "plain");
  assert.equal(summariseTuning({ measured: 1, reused: 0, tuning_s: 0.2, left_to_auto: [] }).text,
    "auto_tuned: 1 shape measured in 0.20 s");
  assert.equal(summariseTuning({ measured: 0, reused: 0, left_to_auto: [], decisions: [] }).text,
    "auto_tuned: no call shape measured or reused");
  const partial = summariseTuning({ ...sdxl.tuning, left_to_auto: [],
    decisions: [{ ...sdxl.tuning.decisions[0], complete: false }] });
  assert.equal(partial.text, "auto_tuned: 2 shapes measured in 0.29 s, 1 reused, 1 partial (not saved)");
  assert.equal(partial.cls, "warn");
  // Sampling again with the node's output reused: its plans keep their tuned backends, the
  // tuner is not asked, and the run's counts are zero for those shapes.
  const again = { measured: 0, reused: 0, tuning_s: 0, left_to_auto: [], decisions: [] };
  const plans = [{ tuned: "measured" }, { tuned: "saved" }, { tuned: null }];
  assert.equal(summariseTuning(again, { plans }).text, "auto_tuned: 2 shapes kept from this node's earlier run");
  assert.equal(summariseTuning(again, { plans }).kept, 2);
  assert.equal(sdxl.tuning.kept, 0);
  assert.equal(summariseTuning({ ...sdxl.tuning, kept: undefined, left_to_auto: [] },
    { plans: [...sdxl.plans, { tuned: "saved" }] }).text,
    "auto_tuned: 2 shapes measured in 0.29 s, 1 reused, 1 kept from this node's earlier run");
  assert.equal(summariseTuning(sdxl.tuning, { plans: sdxl.plans }).kept, 0);
  // The server's own count, with the kept decisions listed as from an earlier run.
  const served = { ...again, kept: 1, decisions: [{ ...sdxl.tuning.decisions[0], this_run: false }] };
  assert.equal(summariseTuning(served, { plans }).text, "auto_tuned: 1 shape kept from this node's earlier run");
  assert.match(summariseTuning(served).decisions[0].line, / · earlier run$/);
  // Counts missing (an older report shape): counted from the decisions.
  assert.equal(summariseTuning({ decisions: sdxl.tuning.decisions }).text, "auto_tuned: 2 shapes measured, 1 reused");
  assert.equal(summariseTuning(null), null);
  assert.equal(summariseTuning("nope"), null);
});

test("the run report carries the tuning summary; plans say which were tuned", () => {
  const s = summariseReport(sdxl, { currentSelection: "auto_tuned" });
  assert.equal(s.level, "ok"); // a shape left to auto is not a fallback
  assert.equal(s.stale, false);
  assert.match(s.tuning.text, /^auto_tuned: 2 shapes measured/);
  assert.equal(summariseReport(fixture("report_flux.json")).tuning, null);
  assert.deepEqual(planLines(sdxl).slice(0, 2), [
    "B=2 H=20 Nq=1024 Nk=1024 D=64 bfloat16 cuda sm90 → sdpa ×600 · tuned, saved",
    "B=2 H=20 Nq=1024 Nk=77 D=64 bfloat16 cuda sm90 → sdpa ×400 · tuned, measured",
  ]);
  assert.equal(planLines(sdxl)[3], "B=2 H=10 Nq=4096 Nk=77 D=64 bfloat16 cuda sm90 → sdpa ×200");
});

test("tooltip lines: the tuning line, then each decision with its runner-up", () => {
  const lines = tuningTooltipLines(summariseTuning(sdxl.tuning));
  assert.equal(lines.length, 4);
  assert.equal(lines[1], "sdpa_cudnn ← B=2 H=10 Nq=4096 Nk=4096 D=64 bfloat16 · measured · runner-up sdpa 1.01×");
  assert.equal(tuningTooltipLines(summariseTuning(sdxl.tuning), 1).at(-1), "… 2 more in the Attention panel");
  assert.deepEqual(tuningTooltipLines(null), []);
});

test("fingerprints: one line, and the rest that must match", () => {
  const fp = h200.devices[0].fingerprint;
  assert.equal(fingerprintSummary(fp), "NVIDIA H200 · driver 580.159.04 · torch 2.11.0+cu130");
  assert.equal(fingerprintDetails(fp),
    "capability 9.0 · CUDA 13.0 · cuDNN 91900 · comfy-kitchen 0.2.40 · flash-attn-4 4.0.0b36 · sageattention 2.2.0");
  assert.equal(fingerprintSummary({ gpu: "cpu", driver: null, torch: "2.9.0" }), "cpu · torch 2.9.0");
  assert.equal(fingerprintSummary(null), "unknown machine");
  assert.equal(fingerprintDetails(null), "");
});

test("Tuned on this GPU: the H200 file's decisions", () => {
  const tuned = tunedOnThisMachine({ ...gpu, tuning: h200 });
  assert.equal(tuned.file, "/home/me/ComfyUI/user/attention_backends/tuning.json");
  assert.equal(tuned.exists, true);
  assert.equal(tuned.note, "");
  assert.equal(tuned.devices.length, 1);
  const [device] = tuned.devices;
  assert.equal(device.label, "");
  assert.equal(device.gpu, "NVIDIA H200");
  assert.equal(device.summary, "NVIDIA H200 · driver 580.159.04 · torch 2.11.0+cu130");
  assert.equal(device.count, 9);
  assert.equal(device.countText, "9 saved decisions");
  assert.equal(device.problem, "");
  assert.deepEqual(device.decisions.map((d) => `${d.backend} | ${d.runnerUpText}`), [
    "flash4 | runner-up sdpa 1.06×",
    "sdpa_cudnn | runner-up sdpa 1.01×",
    "sdpa | runner-up sdpa_cudnn 1.27×",
    "sdpa | runner-up sdpa_efficient 1.38×",
    "flash4 | runner-up sdpa_cudnn 1.20×",
    "sage_qk_int8_pv_fp8_cuda_sm90 | runner-up flash4 1.07×",
    "sdpa | runner-up sdpa_flash 1.49×",
    "sdpa | runner-up sdpa_efficient 1.40×",
    "flash4 | runner-up sdpa 1.10×",
  ]);
});

test("Tuned on this GPU: nothing, no GPU, several GPUs", () => {
  assert.equal(tunedOnThisMachine(null), null);
  assert.equal(tunedOnThisMachine({ ...cpu, tuning: undefined }), null); // a server without auto_tuned
  const onCpu = tunedOnThisMachine(cpu); // auto_tuned tunes CPU calls too: one row, nothing saved
  assert.deepEqual(onCpu.devices.map((d) => [d.index, d.gpu, d.count]), [[null, "cpu", 0]]);
  assert.equal(onCpu.exists, false);
  const none = tunedOnThisMachine({ tuning: { file: "/u/attention_backends/tuning.json", exists: false, devices: [] } });
  assert.equal(none.exists, false);
  assert.match(none.note, /No CUDA GPU is visible/);
  const fresh = tunedOnThisMachine({ tuning: { ...h200, devices: [{ ...h200.devices[0], count: 0, decisions: [] }] } });
  assert.equal(fresh.devices[0].count, 0);
  assert.match(fresh.devices[0].countText, /No decisions saved for this GPU yet/);
  const two = tunedOnThisMachine({ tuning: { ...h200, devices: [h200.devices[0], { ...h200.devices[0], index: 1 }] } });
  assert.deepEqual(two.devices.map((d) => d.label), ["GPU 0: ", "GPU 1: "]);
});

test("a long list: the server's count, and the newest decisions it lists", () => {
  const many = { ...h200, devices: [{ ...h200.devices[0], count: 1000, decisions: h200.devices[0].decisions.slice(0, 3) }] };
  const [device] = tunedOnThisMachine({ tuning: many }).devices;
  assert.equal(device.count, 1000);
  assert.equal(device.countText, "1000 saved decisions (the 3 newest listed)");
  assert.equal(device.decisions.length, 3);
  const view = describeSelection({ ...gpu, tuning: many }, "auto_tuned");
  assert.ok(view.lines.some((l) => /1000 call shapes tuned and saved/.test(l.text)), JSON.stringify(view.lines));
  // A server that sends no count listed every decision.
  const all = tunedOnThisMachine({ tuning: h200 }).devices[0];
  assert.equal(all.count, h200.devices[0].decisions.length);
  assert.equal(all.countText, `${all.count} saved decisions`);
});

test("a damaged tuning file is shown as a warning", () => {
  const damaged = { ...h200, devices: [{ ...h200.devices[0], count: 0, decisions: [],
    ignored_file_problem: "not JSON (Expecting value: line 1 column 1 (char 0))" }] };
  const [device] = tunedOnThisMachine({ tuning: damaged }).devices;
  assert.equal(device.problem, "The tuning file was ignored: not JSON (Expecting value: line 1 column 1 (char 0)). " +
    "Nothing in it is used; it is moved to tuning.json.ignored when new decisions are saved.");
  assert.equal(device.count, 0);
  const view = describeSelection({ ...gpu, tuning: damaged }, "auto_tuned");
  assert.ok(view.lines.some((l) => l.cls === "bad" && /ignored: not JSON/.test(l.text)), JSON.stringify(view.lines));
  assert.ok(view.lines.some((l) => l.text === "On NVIDIA H200: nothing saved yet"));
});

test("auto_tuned before a run: what is saved per GPU and what the next run measures", () => {
  const view = describeSelection({ ...gpu, tuning: h200 }, "auto_tuned", { tuning: "reuse saved" });
  assert.equal(view.kind, "auto_tuned");
  assert.equal(view.hint, "");
  assert.deepEqual(view.lines.map((l) => l.cls), ["good", "muted"]);
  assert.equal(view.lines[0].text, "On NVIDIA H200: 9 call shapes tuned and saved");
  assert.match(view.lines[0].title, /^flash4 ← B=1 H=24 Nq=4608/);
  assert.match(view.lines[1].text, /measured once/);
  const retune = describeSelection({ ...gpu, tuning: h200 }, "auto_tuned", { tuning: "re-tune" });
  assert.match(retune.lines.at(-1).text, /re-tune: every call shape of the next run is measured again/);
  assert.equal(retune.lines.at(-1).cls, "warn");
  // On the CPU (no GPU listed) and from a server without the field: the general line only.
  assert.equal(describeSelection({ ...cpu, tuning: { file: "x", exists: false, devices: [] } }, "auto_tuned").lines.length, 1);
  assert.equal(describeSelection(cpu, "auto_tuned").kind, "auto_tuned");
});

test("auto_tuned in the Advanced node's priority list", () => {
  const view = describePriority(cpu, "auto_tuned > sdpa");
  assert.equal(view.kind, "ok");
  assert.match(view.title, /calls go to auto_tuned first/);
  assert.equal(view.lines[0].cls, "good");
  assert.match(describePriority(cpu, "auto_tuned > sdpa", { tuning: "re-tune" }).lines[0].text, /\(re-tuned\)$/);
  assert.equal(describePriority(cpu, "auto_tuned").kind, "auto_tuned");
  assert.equal(describePriority(cpu, "flash4 > auto_tuned").kind, "ok");
});

test("the committed H200 tuning file, as the status route sends it, gives a consistent view", () => {
  const [device] = tunedOnThisMachine({ tuning: h200 }).devices;
  assert.ok(device.count > 0);
  assert.match(device.summary, /^NVIDIA H200 · driver \S+ · torch \S+$/);
  for (const [i, d] of device.decisions.entries()) {
    const saved = h200.devices[0].decisions[i];
    assert.equal(d.rows[0].backend, saved.backend, d.signature);
    assert.equal(d.rows[0].verdict.label, "chosen", d.signature);
    assert.doesNotMatch(d.short, /\|/, d.signature);
    if (d.runnerUp) {
      const row = saved.candidates[d.runnerUp.backend];
      assert.ok(d.runnerUp.ratio >= 1, `${d.signature}: runner-up faster than the chosen backend`);
      assert.ok(row.rel_l1 <= saved.budget.rel_l1 && row.cosine >= saved.budget.min_cosine, d.signature);
    }
  }
});

test("auto's measured contested calls are their own line, not auto_tuned's", () => {
  assert.equal(wan.tuning, null);
  assert.equal(wan.auto_measured.strategy, "auto");
  const s = runTuning(wan);
  assert.equal(s.text, "auto measured: 1 contested shape measured in 1.07 s");
  assert.equal(s.cls, "plain");
  assert.deepEqual(s.decisions.map((d) => [d.backend, d.source]), [["sage_qk_int8_pv_fp8_cuda_sm90", "measured"]]);
  // FA4 measured 2.4% faster, inside the floor of the model's choice timed twice: kept, and said so.
  const rows = candidateRows(wan.auto_measured.decisions[0]);
  const fa4 = rows.find((r) => r.backend === "flash4");
  assert.equal(rows[0].backend, "sage_qk_int8_pv_fp8_cuda_sm90");
  assert.equal(fa4.verdict.label, "inside noise");
  assert.match(fa4.verdict.title, /inside the noise floor: 0\.976x the chosen time/);
  assert.equal(fa4.ratioText, "0.98×");
  assert.match(s.file, /auto_measured\.json$/);
  // Kept from the node's earlier run: only plans `auto` measured count, not auto_tuned's.
  const again = { strategy: "auto", measured: 0, reused: 0, tuning_s: 0, left_to_auto: [], decisions: [] };
  const plans = [{ tuned: "measured", tuned_by: "auto" }, { tuned: "saved", tuned_by: "auto_tuned" }, { tuned: null }];
  assert.equal(summariseTuning(again, { plans }).text, "auto measured: 1 contested shape kept from this node's earlier run");
  assert.equal(summariseTuning({ ...again, left_to_auto: ["x"] }).text,
    "auto measured: 1 left to the cost model's choice (budget spent)");
  // The report panel and the tooltip carry it like auto_tuned's.
  assert.equal(summariseReport(wan, { currentSelection: "auto" }).tuning.text, s.text);
  assert.equal(tuningTooltipLines(s)[0], s.text);
  // auto_tuned's report is unchanged, and a run that measured nothing has no line.
  assert.equal(runTuning(sdxl).text, summariseTuning(sdxl.tuning, { plans: sdxl.plans }).text);
  assert.equal(runTuning({ ...wan, auto_measured: null }), null);
});

test("Timed by auto on this GPU: the same view of auto_measured.json", () => {
  // The CPU server's status: the file exists nowhere, nothing timed (the sidebar hides the block).
  const onCpu = tunedOnThisMachine(cpu, "auto_measured");
  assert.equal(onCpu.key, "auto_measured");
  assert.equal(onCpu.title, "Timed by auto on this GPU");
  assert.match(onCpu.file, /auto_measured\.json$/);
  assert.deepEqual(onCpu.devices.map((d) => [d.index, d.count]), [[null, 0]]);
  assert.match(onCpu.devices[0].countText, /auto times a call shape its cost model cannot decide, once/);
  // Saved measurements read as auto_tuned's do; a damaged file names its own .ignored file.
  const file = "/home/me/ComfyUI/user/attention_backends/auto_measured.json";
  const timed = tunedOnThisMachine({ auto_measured: { ...h200, file } }, "auto_measured");
  assert.equal(timed.devices[0].countText, "9 saved decisions");
  assert.equal(timed.file, file);
  const damaged = tunedOnThisMachine({ auto_measured: { ...h200, devices: [{ ...h200.devices[0],
    ignored_file_problem: "not JSON" }] } }, "auto_measured");
  assert.match(damaged.devices[0].problem, /^The measurements file was ignored: not JSON\. .*auto_measured\.json\.ignored/);
  assert.equal(tunedOnThisMachine({ ...cpu, auto_measured: undefined }, "auto_measured"), null);
  assert.equal(tunedOnThisMachine(cpu, "no_such_file"), null);
  assert.equal(tunedOnThisMachine({ ...gpu, tuning: h200 }).title, "Tuned on this GPU");
});
