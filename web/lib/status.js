// Pure logic over the JSON of GET /attention_backends/status (docs/api.md).
// No DOM, no ComfyUI imports: Node's test runner imports this file directly.
//
// Every function returns plain "view models" ({kind, title, lines, ...}); the glue in
// ../attention_backends.js turns them into DOM.

import { AUTO, AUTO_TUNED, priorityEntry, readPriority } from "./priority.js";
import { tunedOnThisMachine } from "./tuning.js";

export { parsePriority } from "./priority.js";
/** The node's `tuning` choice that measures every call shape again. */
const RETUNE = "re-tune";

/** The backend row of `name`, or null. */
export function findBackend(status, name) {
  const rows = (status && Array.isArray(status.backends)) ? status.backends : [];
  return rows.find((row) => row && row.name === name) || null;
}

/** Names the node's combo offers: `nodes.selectable` when the server sends it, else auto + backends. */
export function selectableNames(status) {
  if (status && status.nodes && Array.isArray(status.nodes.selectable)) return status.nodes.selectable.slice();
  const names = (status && Array.isArray(status.backends)) ? status.backends.map((b) => b.name) : [];
  return [AUTO, ...names];
}

function deviceLabel(device) {
  if (!device) return "this machine";
  if (device.type === "cpu") return "the CPU";
  const parts = [device.name || `${device.type}:${device.index}`];
  if (device.class) parts.push(`(${device.class})`);
  return parts.join(" ");
}

/** Number of distinct devices worth naming: a one-GPU box says "on NVIDIA H200", not "on cuda:0". */
function devicePrefix(status, device) {
  const devices = (status && status.devices) || [];
  const label = deviceLabel(device);
  if (devices.length > 1 && device && device.type !== "cpu") return `GPU ${device.index}: ${label}`;
  return label;
}

/**
 * What `auto` picks for the typical shapes of one device, grouped by backend in the
 * order the backends first appear: [{backend, shapes: [label, ...]}].
 */
export function groupTypical(device) {
  const groups = [];
  const byBackend = new Map();
  for (const row of (device && device.typical) || []) {
    const backend = row.backend || "?";
    if (!byBackend.has(backend)) {
      const group = { backend, shapes: [] };
      byBackend.set(backend, group);
      groups.push(group);
    }
    byBackend.get(backend).shapes.push(row.shape || row.key || "?");
  }
  return groups;
}

/** Backends of the device's auto order that are not available here: [{backend, reason, install}]. */
export function missingFromAutoOrder(status, device) {
  const out = [];
  const seen = new Set();
  for (const entry of (device && device.auto_order) || []) {
    if (entry.available || seen.has(entry.backend)) continue;
    seen.add(entry.backend);
    const row = findBackend(status, entry.backend);
    out.push({
      backend: entry.backend,
      reason: (entry.reasons && entry.reasons[0]) || (row && row.reasons && row.reasons[0]) || "unavailable",
      install: entry.install || (row && row.install) || null,
    });
  }
  return out;
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

/**
 * The server's install hint ({command, note}, null when installing would not help) in one
 * line: "pip install x (note)", the note alone, or "".
 */
export function installText(install) {
  if (!install) return "";
  if (install.command && install.note) return `${install.command} (${install.note})`;
  return install.command || install.note || "";
}

/**
 * The "before a run" panel of an Attention Backend node.
 *   status: the status JSON (or null while loading), error: a fetch error message
 *   selection: the combo value, onUnsupported: "fall back" | "stop" (optional),
 *   tuning: the node's tuning choice ("reuse saved" | "re-tune"; only auto_tuned reads it)
 * Returns {kind, title, lines: [{text, cls?, title?}], hint}
 *   kind: "loading" | "error" | "ok" | "unavailable" | "unknown" | "auto" | "auto_tuned"
 */
export function describeSelection(status, selection, { error = null, onUnsupported = null, tuning = null } = {}) {
  if (error) {
    return { kind: "error", title: "Backend status unavailable", lines: [{ text: String(error), cls: "muted" }], hint: "" };
  }
  if (!status) return { kind: "loading", title: "Checking backends…", lines: [], hint: "" };
  const kind = selection ? priorityEntry(selection).kind : AUTO;
  if (kind === AUTO) return describeAuto(status);
  if (kind === AUTO_TUNED) return describeAutoTuned(status, { tuning });

  const row = findBackend(status, selection);
  if (!row) {
    return {
      kind: "unknown", title: `${selection}: unknown backend`,
      lines: [{ text: "This ComfyUI's pack does not know this backend (workflow from a newer version?).", cls: "muted" }],
      hint: "",
    };
  }
  const lines = [];
  if (row.available) {
    if (row.description) lines.push({ text: row.description, cls: "muted" });
    const version = row.version ? ` · ${row.version}` : "";
    lines.unshift({ text: `Runs on this machine${version}${row.quantized ? " · quantized" : ""}`, cls: "good" });
    lines.push({ text: "Calls it cannot serve (head dim, mask, dtype…) " +
      (onUnsupported === "stop" ? "stop the run with the reasons." : "fall back to the auto choice."), cls: "muted" });
    return { kind: "ok", title: `${row.name} ✓ available`, tooltip: row.description || "", lines, hint: "" };
  }
  for (const reason of [...(row.reasons || [])].reverse()) lines.unshift({ text: reason, cls: "bad" });
  if (!row.reasons || row.reasons.length === 0) lines.unshift({ text: "Not available on this machine.", cls: "bad" });
  const install = row.install || null;
  if (install && install.note) lines.push({ text: install.note, cls: "muted" });
  lines.push({
    text: onUnsupported === "stop"
      ? "on_unsupported = stop: the run will stop."
      : "on_unsupported = fall back: every call goes to the auto choice instead.",
    cls: "warn",
  });
  return { kind: "unavailable", title: `${row.name} ✗ not available here`, tooltip: row.description || "", lines,
           hint: (install && install.command) || "" };
}

/**
 * What `auto` decides by on a device (`device.auto_source`, docs/api.md):
 * {kind: "calibrated" | "default" | "rules", text}. Older servers send nothing: "rules".
 */
export function autoSource(device) {
  const source = (device && device.auto_source) || {};
  if (source.source === "calibrated") {
    return { kind: "calibrated", text: "auto runs on this GPU's calibration" };
  }
  if (source.source === "default") {
    const fitted = source.gpu ? ` (fitted on ${source.gpu})` : "";
    return { kind: "default", text: `auto runs on the default cost model${fitted}; python -m attention calibrate fits this GPU's own` };
  }
  return { kind: "rules", text: "auto runs on the rule table (no cost model for this GPU class)" };
}

/** `auto`: per device, which backend serves each typical shape, and what is missing from the order. */
export function describeAuto(status) {
  const devices = (status && status.devices) || [];
  const lines = [];
  let hint = "";
  if (devices.length === 0) lines.push({ text: "No device reported.", cls: "muted" });
  for (const device of devices) {
    const groups = groupTypical(device);
    const prefix = devicePrefix(status, device);
    if (groups.length === 0) {
      lines.push({ text: `On ${prefix}: no typical shapes reported`, cls: "muted" });
      continue;
    }
    if (groups.length === 1) {
      lines.push({ text: `On ${prefix}: ${groups[0].backend} for all ${plural(groups[0].shapes.length, "typical shape", "typical shapes")}`, cls: "good" });
    } else {
      lines.push({ text: `On ${prefix}:`, cls: "head" });
      for (const group of groups) {
        lines.push({ text: `${group.backend} ← ${group.shapes.join(", ")}`, cls: "good", indent: true });
      }
    }
    if (device.type !== "cpu") {
      const source = autoSource(device);
      lines.push({ text: source.text, cls: source.kind === "calibrated" ? "good" : "muted" });
    }
    const missing = missingFromAutoOrder(status, device);
    if (missing.length) {
      lines.push({
        text: `Not installed here: ${missing.map((m) => m.backend).join(", ")}`,
        cls: "muted",
        title: missing.map((m) => `${m.backend}: ${m.reason}${m.install ? ` (${installText(m.install)})` : ""}`).join("\n"),
      });
      if (!hint) hint = missing.map((m) => m.install && m.install.command).find(Boolean) || "";
    }
  }
  return { kind: "auto", title: "auto → best available per call", lines, hint };
}

/**
 * `auto_tuned`: what is saved for each GPU (status.tuning), and what the next run will
 * measure. Not a backend row: the tuner picks among the available backends per call shape.
 */
export function describeAutoTuned(status, { tuning = null } = {}) {
  const tuned = tunedOnThisMachine(status);
  const lines = [];
  for (const device of (tuned && tuned.devices) || []) {
    const where = `On ${device.label}${device.gpu}`;
    lines.push(device.count
      ? { text: `${where}: ${plural(device.count, "call shape", "call shapes")} tuned and saved`, cls: "good",
          title: device.decisions.map((d) => d.line).join("\n") }
      : { text: `${where}: nothing saved yet`, cls: "muted" });
    if (device.problem) lines.push({ text: device.problem, cls: "bad" });
  }
  lines.push(tuning === RETUNE
    ? { text: "tuning = re-tune: every call shape of the next run is measured again and replaces what was saved.",
        cls: "warn" }
    : { text: "A call shape met for the first time is measured once (a few seconds at most) and the fastest " +
        "backend inside the error budget is saved.", cls: "muted" });
  return { kind: "auto_tuned", title: "auto_tuned → fastest accurate backend, measured here", lines, hint: "" };
}

/**
 * The "before a run" panel of the Advanced node: each name of its priority list with
 * availability, and which one a call is most likely to reach first.
 */
export function describePriority(status, priorityText, { error = null, onUnsupported = null, tuning = null } = {}) {
  if (error) return describeSelection(null, null, { error });
  if (!status) return describeSelection(null, null);
  const { entries, empty, unknown } = readPriority(priorityText, ((status && status.backends) || []).map((b) => b.name));
  const problem = empty || unknown.length > 0;
  if (empty) {
    return { kind: "unknown", title: "Priority: the list is empty",
             lines: [{ text: "Name at least one backend, e.g. 'flash4 > sdpa' (names separated by > or ,).", cls: "bad" }],
             hint: "" };
  }
  if (entries.length === 1 && entries[0].kind === AUTO) return describeAuto(status);
  if (entries.length === 1 && entries[0].kind === AUTO_TUNED) return describeAutoTuned(status, { tuning });
  const lines = [];
  let first = null;
  let hint = "";
  for (const entry of entries) {
    const name = entry.name;
    if (entry.kind === AUTO) {
      lines.push({ text: `${name} — the rest of the auto order`, cls: "good" });
      if (!first) first = name;
      continue;
    }
    if (entry.kind === AUTO_TUNED) {
      lines.push({ text: `${name} — the backend measured fastest on this GPU${tuning === RETUNE ? " (re-tuned)" : ""}`,
                   cls: "good" });
      if (!first) first = name;
      continue;
    }
    const row = findBackend(status, name);
    if (!row) {
      lines.push({ text: `${name} ✗ unknown backend name (separate names with > or ,)`, cls: "bad" });
    } else if (row.available) {
      lines.push({ text: `${name} ✓ available`, cls: "good", title: row.description || "" });
      if (!first) first = name;
    } else {
      lines.push({ text: `${name} ✗ ${(row.reasons && row.reasons[0]) || "not available"}`, cls: "bad",
                   title: installText(row.install) });
      if (!hint) hint = (row.install && row.install.command) || "";
    }
  }
  let kind = first ? "ok" : "unavailable";
  if (problem) kind = "unknown";
  const title = problem ? "Priority: the node will refuse this list"
    : first ? `Priority: calls go to ${first} first (when it can serve them)` : "Priority: nothing in the list runs here";
  if (!first && !problem) {
    lines.push({
      text: onUnsupported === "stop" ? "on_unsupported = stop: the run will stop." : "Calls fall back to the auto choice.",
      cls: "warn",
    });
  }
  return { kind, title, lines, hint };
}

/**
 * Rows of the sidebar's backend table, sorted available first (in registry order):
 * [{name, family, available, version, quantized, description, reason, install, autoFor: [shape labels]}]
 */
export function backendTable(status) {
  const backends = (status && status.backends) || [];
  const autoFor = new Map();
  const allShapes = new Set();
  for (const device of (status && status.devices) || []) {
    for (const row of device.typical || []) allShapes.add(row.shape || row.key);
    for (const row of device.typical || []) {
      if (!autoFor.has(row.backend)) autoFor.set(row.backend, new Set());
      autoFor.get(row.backend).add(row.shape || row.key);
    }
  }
  const rows = backends.map((b, index) => ({
    index,
    name: b.name,
    family: b.family || "",
    available: !!b.available,
    version: b.version || "",
    quantized: !!b.quantized,
    description: b.description || "",
    reason: (b.reasons || []).join("; "),
    install: b.install || null,
    autoFor: autoFor.has(b.name) ? [...autoFor.get(b.name)] : [],
    autoForAll: autoFor.has(b.name) && autoFor.get(b.name).size === allShapes.size,
  }));
  rows.sort((a, b) => (Number(b.available) - Number(a.available)) || (a.index - b.index));
  return rows;
}

/** One-line summary of the machine for the sidebar header. */
export function machineSummary(status) {
  if (!status) return "";
  const backends = status.backends || [];
  const available = backends.filter((b) => b.available).length;
  const devices = (status.devices || []).map(deviceLabel);
  const parts = [`${available} of ${backends.length} backends available`];
  if (devices.length) parts.push(`on ${devices.join(", ")}`);
  const soft = [];
  if (status.torch) soft.push(`torch ${status.torch}`);
  if (status.cuda) soft.push(`CUDA ${status.cuda}`);
  if (soft.length) parts.push(`(${soft.join(", ")})`);
  return parts.join(" ");
}

/**
 * The committed benchmark runs the server lists (`status.benchmarks`, docs/api.md):
 * [{name, title, url}], where url is the chart's path on this server, or null when the
 * run has no chart.
 */
export function benchmarkRuns(status) {
  const runs = (status && Array.isArray(status.benchmarks)) ? status.benchmarks : [];
  return runs
    .filter((run) => run && typeof run.name === "string" && run.name)
    .map((run) => ({
      name: run.name,
      title: run.title || run.name,
      // It becomes a link and goes through api.apiURL: a path on this server, nothing else
      // ("//host" and "/\host" are other hosts to a browser).
      url: typeof run.chart === "string" && /^\/(?![/\\])/.test(run.chart) ? run.chart : null,
    }));
}

/**
 * The kernel failures the server remembers (`status.kernel_failures`, docs/api.md), for the
 * sidebar: {title, rows: [{backend, signature, reason, count, permanent, state}], clearRoute,
 * empty}. A server without the field sends no rows and no route (nothing to clear).
 */
export function kernelFailures(status) {
  const block = (status && status.kernel_failures) || {};
  const limit = Number(block.retry_limit) || 0;
  const rows = (Array.isArray(block.failures) ? block.failures : [])
    .filter((f) => f && typeof f.backend === "string")
    .map((f) => {
      const count = Number(f.count) || 0;
      const permanent = f.retried_next_run === false;
      return {
        backend: f.backend, signature: String(f.signature || "?"), reason: String(f.reason || ""), count, permanent,
        state: permanent
          ? `off for this call shape until cleared (${plural(count, "failure", "failures")})`
          : `tried again at the next run (${plural(count, "failure", "failures")}${limit ? ` of ${limit}` : ""})`,
      };
    });
  // POSTed to: a path on this server, nothing else (benchmarkRuns' rule).
  const clearRoute = typeof block.clear_route === "string" && /^\/(?![/\\])/.test(block.clear_route)
    ? block.clear_route : null;
  return {
    title: rows.length ? `Kernel failures (${rows.length})` : "Kernel failures",
    rows,
    clearRoute,
    empty: "No kernel has raised since ComfyUI started or the failures were last cleared.",
  };
}
