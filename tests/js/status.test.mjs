import { test } from "node:test";
import assert from "node:assert/strict";
import {
  autoSource, backendTable, benchmarkRuns, describeAuto, describePriority, describeSelection, findBackend, groupTypical,
  isCommand, machineSummary, missingFromAutoOrder, parsePriority, presentHint, selectableNames,
} from "../../web/lib/status.js";
import { fixture } from "./helpers.mjs";

const cpu = fixture("status_cpu.json");
const gpu = fixture("status_gpu_synthetic.json");

test("findBackend and selectableNames", () => {
  assert.equal(findBackend(cpu, "sdpa").available, true);
  assert.equal(findBackend(cpu, "nope"), null);
  assert.equal(findBackend(null, "sdpa"), null);
  const names = selectableNames(cpu);
  assert.equal(names[0], "auto");
  assert.ok(names.includes("sage") && names.includes("flash4"));
  assert.deepEqual(selectableNames(gpu), gpu.nodes.selectable);
  assert.deepEqual(selectableNames(gpu).slice(0, 2), ["auto", "auto_tuned"]);
});

test("an available backend says it runs here, with its version", () => {
  const view = describeSelection(cpu, "sdpa");
  assert.equal(view.kind, "ok");
  assert.match(view.title, /sdpa/);
  assert.ok(view.lines.some((l) => l.cls === "good" && l.text.includes(cpu.torch)));
  assert.equal(view.hint, "");
});

test("an unavailable backend gives the reason and the install hint", () => {
  const view = describeSelection(cpu, "sage", { onUnsupported: "fall back" });
  assert.equal(view.kind, "unavailable");
  assert.match(view.title, /not available/);
  assert.ok(view.lines.some((l) => l.cls === "bad" && /sageattention is not installed/.test(l.text)));
  assert.equal(view.hint, "pip install sageattention");
  assert.ok(view.lines.some((l) => /fall back/.test(l.text)));
  const strict = describeSelection(cpu, "sage", { onUnsupported: "stop" });
  assert.ok(strict.lines.some((l) => /stop/.test(l.text)));
});

test("a CUDA-only backend on the CPU names the missing GPU", () => {
  const view = describeSelection(cpu, "sdpa_cudnn");
  assert.equal(view.kind, "unavailable");
  assert.ok(view.lines.some((l) => /no CUDA GPU/.test(l.text)));
});

test("auto on a CPU resolves every typical shape to one backend", () => {
  const view = describeSelection(cpu, "auto");
  assert.equal(view.kind, "auto");
  const n = cpu.devices[0].typical.length;
  assert.ok(view.lines.some((l) => l.text === `On the CPU: sdpa for all ${n} typical shapes`), JSON.stringify(view.lines));
});

test("auto on GPUs groups shapes by backend and lists what is missing", () => {
  const view = describeAuto(gpu);
  const text = view.lines.map((l) => l.text).join("\n");
  assert.match(text, /GPU 0: NVIDIA H200 \(sm90\)/);
  assert.match(text, /GPU 1: NVIDIA H200 \(sm90\)/);
  assert.match(text, /flash4 ← Flux 1024², Wan 2\.1 14B 720p 81f/);
  assert.match(text, /sdpa ← SDXL level 1/);
  assert.match(text, /Not installed here: sage_qk_int8_pv_fp8_cuda_sm90/);
  // Its install hint is prose, not a command: no copy box, but the hover text says it.
  assert.equal(view.hint, "");
  assert.ok(view.lines.some((l) => /built from source/.test(l.title || "")));
});

test("groupTypical keeps first-appearance order", () => {
  assert.deepEqual(groupTypical(gpu.devices[0]).map((g) => g.backend), ["sdpa", "flash4"]);
  assert.deepEqual(groupTypical(null), []);
  assert.equal(missingFromAutoOrder(gpu, gpu.devices[0]).length, 1);
});

test("unknown selection, loading and errors", () => {
  assert.equal(describeSelection(cpu, "flash9").kind, "unknown");
  assert.equal(describeSelection(null, "sdpa").kind, "loading");
  const err = describeSelection(null, "sdpa", { error: "HTTP 404" });
  assert.equal(err.kind, "error");
  assert.match(err.lines[0].text, /404/);
});

test("parsePriority accepts > , ; | and whitespace", () => {
  assert.deepEqual(parsePriority("flash4 > sage >sdpa"), ["flash4", "sage", "sdpa"]);
  assert.deepEqual(parsePriority("flash4,sage; sdpa | xformers"), ["flash4", "sage", "sdpa", "xformers"]);
  assert.deepEqual(parsePriority(""), []);
  assert.deepEqual(parsePriority(["a", " b "]), ["a", "b"]);
});

test("describePriority marks each entry and the first that runs", () => {
  const view = describePriority(cpu, "flash4 > sage > sdpa");
  assert.equal(view.kind, "ok");
  assert.match(view.title, /sdpa first/);
  assert.equal(view.lines.filter((l) => l.cls === "bad").length, 2);
  assert.equal(view.hint, findBackend(cpu, "flash4").install_hint); // the first missing one's hint
  assert.equal(describePriority(cpu, "flash4 > bogus").kind, "unknown");
  assert.equal(describePriority(cpu, "flash4").kind, "unavailable");
  assert.equal(describePriority(cpu, "").kind, "auto");
});

test("backendTable puts available backends first and records auto's picks", () => {
  const rows = backendTable(cpu);
  assert.equal(rows.length, cpu.backends.length);
  const firstUnavailable = rows.findIndex((r) => !r.available);
  assert.ok(rows.slice(firstUnavailable).every((r) => !r.available));
  const sdpa = rows.find((r) => r.name === "sdpa");
  assert.equal(sdpa.autoFor.length, cpu.devices[0].typical.length);
  const sage = rows.find((r) => r.name === "sage");
  assert.equal(sage.hint, "pip install sageattention");
  assert.match(sage.reason, /not installed/);
});

test("machineSummary", () => {
  assert.match(machineSummary(cpu), /^\d+ of \d+ backends available on the CPU \(torch /);
  assert.match(machineSummary(gpu), /NVIDIA H200 \(sm90\), NVIDIA H200 \(sm90\)/);
});

test("benchmarkRuns: the server's runs, each with its chart path or none", () => {
  assert.deepEqual(benchmarkRuns(gpu), [{
    name: "h200", title: "NVIDIA H200 · torch 2.11.0 · CUDA 13.0", url: "/attention_backends/benchmarks/h200/chart.png",
  }]);
  assert.deepEqual(benchmarkRuns(cpu), []); // a server without the field
  assert.deepEqual(benchmarkRuns(null), []);
  assert.deepEqual(benchmarkRuns({ benchmarks: {} }), []);
  assert.deepEqual(benchmarkRuns({ benchmarks: [{ name: "cpu", title: "", chart: null }, null, { title: "no name" }] }),
    [{ name: "cpu", title: "cpu", url: null }]);
});

test("benchmarkRuns keeps only chart paths on this server", () => {
  const urls = (charts) => benchmarkRuns({ benchmarks: charts.map((chart) => ({ name: "x", chart })) }).map((r) => r.url);
  assert.deepEqual(urls(["/attention_backends/benchmarks/x/chart.png", "//evil.example/x.png", "/\\evil.example/x.png",
    "javascript:alert(1)", "https://example.com/x.png", "chart.png", 42, ""]),
  ["/attention_backends/benchmarks/x/chart.png", null, null, null, null, null, null, null]);
});

test("install hints: commands are copyable, prose is shown once", () => {
  assert.ok(isCommand("pip install sageattention"));
  assert.ok(isCommand("pip install --pre flash-attn-4"));
  assert.ok(!isCommand("SageAttention 2 is built from source: see the README"));
  assert.deepEqual(presentHint("pip install x", ["x is not installed (pip install x)"]), { command: "pip install x" });
  assert.deepEqual(presentHint("built from source", ["x is not installed (built from source)"]), {});
  assert.deepEqual(presentHint("built from source", []), { text: "built from source" });
  assert.deepEqual(presentHint("built from source", ["flash_attn_3 is not installed"]), { text: "built from source" });
  assert.deepEqual(presentHint("built from source", ["no GPU"]), {});
  assert.deepEqual(presentHint("", []), {});
  const source = describeSelection(cpu, "sage_qk_int8_pv_fp8_cuda");
  assert.equal(source.kind, "unavailable");
  assert.equal(source.hint, "");
});

test("a priority of just auto reads like auto; stop is named when nothing runs", () => {
  assert.equal(describePriority(cpu, "auto").kind, "auto");
  const strict = describePriority(cpu, "flash4 > sage", { onUnsupported: "stop" });
  assert.equal(strict.kind, "unavailable");
  assert.ok(strict.lines.some((l) => /stop/.test(l.text)));
});

test("backendTable says when auto uses a backend for every shape", () => {
  const sdpa = backendTable(cpu).find((r) => r.name === "sdpa");
  assert.equal(sdpa.autoForAll, true);
  const flash4 = backendTable(gpu).find((r) => r.name === "flash4");
  assert.equal(flash4.autoForAll, false);
  assert.deepEqual(flash4.autoFor, ["Flux 1024²", "Wan 2.1 14B 720p 81f"]);
});

test("a command hint with a parenthesised note is split", () => {
  assert.deepEqual(presentHint("pip install flash-attn (builds from source unless a wheel matches your torch/CUDA)"),
    { command: "pip install flash-attn", note: "builds from source unless a wheel matches your torch/CUDA" });
  const flash = describeSelection(cpu, "flash");
  assert.equal(flash.hint, "pip install flash-attn");
});

test("no install command when the package is not what is missing", () => {
  assert.deepEqual(presentHint("pip install -U comfy-kitchen", ["no CUDA GPU is visible to PyTorch"]), {});
  assert.deepEqual(presentHint("pip install --pre flash-attn-4", ["cannot load: ModuleNotFoundError: No module named 'cutlass.cute'"]),
    { command: "pip install --pre flash-attn-4" });
  assert.deepEqual(presentHint("pip install sageattention", ["sageattention 1.0.6 is older than the 2.0.0 this backend needs"]),
    { command: "pip install sageattention" });
  const kitchen = describeSelection(cpu, "kitchen_int8");
  assert.equal(kitchen.kind, "unavailable");
  assert.equal(kitchen.hint, "");
});

test("auto says whether it runs on this GPU's calibration, the default model or the rules", () => {
  const text = describeAuto(gpu).lines.map((l) => l.text);
  // GPU 0 is calibrated; GPU 1 comes from a server that sends no auto_source: the rules.
  assert.ok(text.includes("auto runs on this GPU's calibration"), JSON.stringify(text));
  assert.ok(text.includes("auto runs on the rule table (no cost model for this GPU class)"));
  assert.equal(autoSource({ auto_source: { source: "default", gpu: "NVIDIA H200" } }).text,
    "auto runs on the default cost model (fitted on NVIDIA H200); python -m attention calibrate fits this GPU's own");
  assert.equal(autoSource(null).kind, "rules");
  // The CPU has SDPA only: no line about models.
  assert.ok(!describeAuto(cpu).lines.some((l) => /auto runs on/.test(l.text)));
});
