import { test } from "node:test";
import assert from "node:assert/strict";
import {
  autoSource, backendTable, benchmarkRuns, describeAuto, describePriority, describeSelection, findBackend, groupTypical,
  installText, kernelFailures, machineSummary, missingFromAutoOrder, parsePriority, selectableNames,
} from "../../web/lib/status.js";
import { AUTO, AUTO_TUNED, BACKEND, priorityEntry, priorityProblem, readPriority } from "../../web/lib/priority.js";
import { fixture } from "./helpers.mjs";

// Made by the pack's Python on a simulated machine (tests/js_fixtures.py): a CPU with no
// optional package, and two H200s with flash4 and comfy-kitchen installed.
const cpu = fixture("status_cpu.json");
const gpu = fixture("status_gpu_synthetic.json");
const priorityCases = fixture("priority_cases.json");

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
  assert.ok(view.lines.some((l) => l.cls === "bad" && l.text === "sageattention is not installed"));
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
  // The simulated H200s have no calibration: the model shipped for sm90 decides (without
  // SageAttention 2 there, FA4 takes the video shapes).
  assert.match(text, /sdpa ← SD1\.5 level 1, SD1\.5 level 2, SD1\.5 level 3, SDXL level 1, SDXL level 2, SDXL cross-attn, Flux 1024²/);
  assert.match(text, /flash4 ← Qwen-Image 1328², Wan 2\.1 14B 480p 81f, Wan 2\.1 14B 720p 81f, HunyuanVideo 720p 129f/);
  assert.match(text, /Not installed here: sage_qk_int8_pv_fp8_cuda_sm90, flash3/);
  // Their install hints are notes (built from source), no command: no copy box, the hover text says it.
  assert.equal(view.hint, "");
  assert.ok(view.lines.some((l) => /sageattention is not installed \(SageAttention 2 is built from source/.test(l.title || "")));
});

test("groupTypical keeps first-appearance order", () => {
  assert.deepEqual(groupTypical(gpu.devices[0]).map((g) => g.backend), ["sdpa", "flash4"]);
  assert.deepEqual(groupTypical(null), []);
  assert.deepEqual(missingFromAutoOrder(gpu, gpu.devices[0]).map((m) => [m.backend, m.install]), [
    ["sage_qk_int8_pv_fp8_cuda_sm90", { command: null, note: "SageAttention 2 is built from source: see the README's 'Optional kernels'" }],
    ["flash3", { command: null, note: "FlashAttention 3 is built from source (hopper/ in the flash-attention repository)" }],
  ]);
});

test("unknown selection, loading and errors", () => {
  assert.equal(describeSelection(cpu, "flash9").kind, "unknown");
  assert.equal(describeSelection(null, "sdpa").kind, "loading");
  const err = describeSelection(null, "sdpa", { error: "HTTP 404" });
  assert.equal(err.kind, "error");
  assert.match(err.lines[0].text, /404/);
});

test("a priority list is read the way the nodes read it (the server's own readings)", () => {
  assert.ok(priorityCases.length >= 15);
  const names = cpu.backends.map((b) => b.name);
  for (const c of priorityCases) {
    const read = readPriority(c.text, names);
    const problem = priorityProblem(c.text, names);
    if (c.entries) {
      assert.deepEqual(read.entries, c.entries, c.text);
      assert.deepEqual(parsePriority(c.text), c.entries.map((e) => e.name), c.text);
      assert.equal(read.usesTuner, c.uses_tuner, c.text);
      assert.equal(problem, null, c.text);
    } else {
      assert.notEqual(problem, null, `${JSON.stringify(c.text)}: the node refuses it (${c.error})`);
      assert.equal(read.empty, c.empty, c.text);
      assert.deepEqual(read.unknown, c.unknown, c.text);
    }
  }
  assert.deepEqual(parsePriority(["a", " b "]), ["a", "b"]);
});

test("the strategies the browser knows are the ones the server offers", () => {
  const backends = new Set(cpu.backends.map((b) => b.name));
  const strategies = cpu.nodes.selectable.filter((name) => !backends.has(name));
  assert.deepEqual(strategies, [AUTO, AUTO_TUNED]);
  assert.deepEqual(strategies.map((name) => priorityEntry(name).kind), strategies);
  assert.equal(priorityEntry("sdpa").kind, BACKEND);
});

test("a priority the node would refuse is shown as such", () => {
  // Spaces separate nothing: "flash4 sdpa" is one unknown name to the node.
  const spaced = describePriority(cpu, "flash4 sdpa");
  assert.equal(spaced.kind, "unknown");
  assert.match(spaced.title, /refuse/);
  assert.deepEqual(spaced.lines.map((l) => l.cls), ["bad"]);
  assert.match(spaced.lines[0].text, /^flash4 sdpa ✗ unknown backend name/);
  const empty = describePriority(cpu, " > ");
  assert.equal(empty.kind, "unknown");
  assert.match(empty.title, /empty/);
});

test("describePriority marks each entry and the first that runs", () => {
  const view = describePriority(cpu, "flash4 > sage > sdpa");
  assert.equal(view.kind, "ok");
  assert.match(view.title, /sdpa first/);
  assert.equal(view.lines.filter((l) => l.cls === "bad").length, 2);
  assert.equal(view.hint, findBackend(cpu, "flash4").install.command); // the first missing one's command
  assert.equal(view.hint, "pip install --pre flash-attn-4");
  assert.equal(describePriority(cpu, "flash4 > bogus").kind, "unknown");
  assert.equal(describePriority(cpu, "flash4").kind, "unavailable");
  assert.equal(describePriority(cpu, "").kind, "unknown"); // the node refuses an empty list
});

test("backendTable puts available backends first and records auto's picks", () => {
  const rows = backendTable(cpu);
  assert.equal(rows.length, cpu.backends.length);
  const firstUnavailable = rows.findIndex((r) => !r.available);
  assert.ok(rows.slice(firstUnavailable).every((r) => !r.available));
  const sdpa = rows.find((r) => r.name === "sdpa");
  assert.equal(sdpa.autoFor.length, cpu.devices[0].typical.length);
  const sage = rows.find((r) => r.name === "sage");
  assert.deepEqual(sage.install, { command: "pip install sageattention", note: "" });
  assert.equal(sage.reason, "sageattention is not installed");
  assert.equal(rows.find((r) => r.name === "sdpa_cudnn").install, null); // no package would help: no GPU
});

test("machineSummary", () => {
  assert.equal(machineSummary(cpu), "3 of 20 backends available on the CPU (torch 2.13.0+cpu)");
  assert.match(machineSummary(gpu), /NVIDIA H200 \(sm90\), NVIDIA H200 \(sm90\)/);
});

test("benchmarkRuns: the server's runs, each with its chart path or none", () => {
  assert.deepEqual(benchmarkRuns(gpu), [{
    name: "h200", title: "NVIDIA H200 · torch 2.11.0 · CUDA 13.0", url: "/attention_backends/benchmarks/h200/chart.png",
  }]);
  assert.deepEqual(benchmarkRuns(cpu), benchmarkRuns(gpu)); // the committed runs, whatever the machine
  assert.deepEqual(benchmarkRuns({ ...cpu, benchmarks: undefined }), []); // a server without the field
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

test("install hints: the server's command is copyable, its note is shown once", () => {
  assert.equal(installText({ command: "pip install x", note: "" }), "pip install x");
  assert.equal(installText({ command: "pip install x", note: "builds from source" }), "pip install x (builds from source)");
  assert.equal(installText({ command: null, note: "built from source" }), "built from source");
  assert.equal(installText(null), "");
  const source = describeSelection(cpu, "sage_qk_int8_pv_fp8_cuda");
  assert.equal(source.kind, "unavailable");
  assert.equal(source.hint, "");
  assert.deepEqual(source.lines.map((l) => l.text).slice(0, 2),
    ["sageattention is not installed", "SageAttention 2 is built from source: see the README's 'Optional kernels'"]);
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
  assert.deepEqual(flash4.autoFor, ["Qwen-Image 1328²", "Wan 2.1 14B 480p 81f", "Wan 2.1 14B 720p 81f",
    "HunyuanVideo 720p 129f"]);
});

test("a command with a note: the command in the copy box, the note as a line", () => {
  assert.deepEqual(findBackend(cpu, "flash").install,
    { command: "pip install flash-attn", note: "builds from source unless a wheel matches your torch/CUDA" });
  const flash = describeSelection(cpu, "flash");
  assert.equal(flash.hint, "pip install flash-attn");
  assert.ok(flash.lines.some((l) => l.cls === "muted" && l.text === "builds from source unless a wheel matches your torch/CUDA"));
});

test("no install command when the package is not what is missing", () => {
  // comfy-kitchen installed on a machine without a GPU: the server sends no install hint.
  const kitchen = { ...findBackend(cpu, "kitchen_int8"), version: "0.2.40", reasons: ["no CUDA GPU is visible to PyTorch"],
                    install: null };
  const status = { ...cpu, backends: cpu.backends.map((b) => (b.name === "kitchen_int8" ? kitchen : b)) };
  const view = describeSelection(status, "kitchen_int8");
  assert.equal(view.kind, "unavailable");
  assert.equal(view.hint, "");
  assert.deepEqual(view.lines.map((l) => l.cls), ["bad", "warn"]);
});

test("auto says whether it runs on this GPU's calibration, the default model or the rules", () => {
  const text = describeAuto(gpu).lines.map((l) => l.text);
  // The simulated H200s have no calibration: the model shipped for sm90.
  assert.ok(text.includes("auto runs on the default cost model (fitted on NVIDIA H200); python -m attention calibrate "
    + "fits this GPU's own"), JSON.stringify(text));
  assert.equal(autoSource({ auto_source: { source: "default", gpu: "NVIDIA H200" } }).kind, "default");
  assert.equal(autoSource({ auto_source: { source: "calibrated", gpu: "NVIDIA H200" } }).text,
    "auto runs on this GPU's calibration");
  // A server that sends no auto_source: the rules.
  assert.equal(autoSource({}).text, "auto runs on the rule table (no cost model for this GPU class)");
  assert.equal(autoSource(null).kind, "rules");
  // The CPU has SDPA only: no line about models.
  assert.ok(!describeAuto(cpu).lines.some((l) => /auto runs on/.test(l.text)));
});

test("kernel failures: each remembered one with its reason and whether the next run retries it", () => {
  // A kernel that raised once on one call shape and RETRY_LIMIT times on another (tests/js_fixtures.py).
  const failures = kernelFailures({ ...cpu, kernel_failures: fixture("status_kernel_failures.json") });
  assert.equal(failures.title, "Kernel failures (2)");
  assert.equal(failures.clearRoute, "/attention_backends/failures/clear");
  assert.deepEqual(failures.rows.map((r) => [r.backend, r.signature, r.count, r.permanent, r.state]), [
    ["sage", "B=1 H=2 Nq=16 Nk=16 D=32 float32 cpu", 1, false, "tried again at the next run (1 failure of 3)"],
    ["sage", "B=1 H=2 Nq=32 Nk=32 D=32 float32 cpu", 3, true, "off for this call shape until cleared (3 failures)"],
  ]);
  assert.ok(failures.rows.every((r) => r.reason === "raised RuntimeError: CUDA error: an illegal memory access was encountered"));
});

test("kernel failures: none, a server without the field, and a clear route off this server", () => {
  const none = kernelFailures(cpu);
  assert.deepEqual([none.title, none.rows, none.clearRoute], ["Kernel failures", [], "/attention_backends/failures/clear"]);
  assert.match(none.empty, /No kernel has raised/);
  assert.deepEqual([kernelFailures(null).rows, kernelFailures(null).clearRoute], [[], null]);
  const routes = ["//evil.example/clear", "/\\evil.example", "https://example.com/x", 42].map(
    (clear_route) => kernelFailures({ kernel_failures: { clear_route, failures: [] } }).clearRoute);
  assert.deepEqual(routes, [null, null, null, null]);
  const odd = kernelFailures({ kernel_failures: { failures: [null, { backend: 7 }, { backend: "flash4" }] } });
  assert.deepEqual(odd.rows.map((r) => [r.backend, r.signature, r.state]),
    [["flash4", "?", "tried again at the next run (0 failures)"]]);
});
