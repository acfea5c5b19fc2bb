// DOM rendering of the view models built by status.js and report.js.
// Needs `document` (a browser) but nothing from ComfyUI, so the glue stays thin.

import { backendTable, benchmarkRuns, describeAuto, kernelFailures, machineSummary } from "./status.js";
import { formatCount } from "./report.js";
import { tunedOnThisMachine } from "./tuning.js";

// auto_tuned decisions listed on a node; the rest (and every table) is in the sidebar.
const NODE_DECISIONS = 3;

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value == null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function lineEl(line) {
  return h("div", {
    class: `ab-line ab-${line.cls || "plain"}${line.indent ? " ab-indent" : ""}`,
    title: line.title || null,
  }, line.text);
}

/** Copies text to the clipboard where the browser allows it (secure contexts). */
function copyButton(text) {
  return h("button", {
    class: "ab-copy", title: "Copy the install command", type: "button",
    onclick: (e) => {
      e.stopPropagation();
      try { navigator.clipboard?.writeText(text); } catch (_) { /* not allowed on http://host:port */ }
    },
  }, "copy");
}

/** The node's "before a run" block. */
export function statusSection(view) {
  return h("section", { class: `ab-status ab-kind-${view.kind}`, dataset: { kind: view.kind } },
    h("div", { class: "ab-title", title: view.tooltip || null }, view.title),
    view.lines.map(lineEl),
    view.hint ? h("div", { class: "ab-hint" }, h("code", {}, view.hint), copyButton(view.hint)) : null);
}

/** The node's compact view of a run's tuning: the summary line and the first decisions. */
function nodeTuning(tuning) {
  const more = tuning.decisions.length - NODE_DECISIONS;
  return h("div", { class: "ab-tuning" },
    h("div", { class: `ab-line ab-${tuning.cls} ab-tuning-line`, title: tuning.file ? `saved in ${tuning.file}` : null },
      tuning.text),
    tuning.decisions.slice(0, NODE_DECISIONS).map((d) => h("div", {
      class: "ab-line ab-muted ab-indent ab-tuning-decision", title: `${d.signature}\n${d.runnerUpText}`,
    }, d.line)),
    more > 0 ? h("div", { class: "ab-line ab-muted ab-indent" }, `+${more} more in the Attention panel`) : null);
}

/** The node's "after a run" block (summary from summariseReport), or a placeholder. */
export function reportSection(summary) {
  if (!summary) {
    return h("section", { class: "ab-report ab-report-empty", dataset: { level: "none" } },
      h("div", { class: "ab-line ab-muted" }, "Last run: none yet (the report appears here after the sampler runs)"));
  }
  const bars = h("div", { class: "ab-bars" },
    summary.rows.map((row) => h("div", { class: "ab-bar", title: `${formatCount(row.calls)} calls` },
      h("span", { class: "ab-bar-name" }, row.backend),
      h("span", { class: "ab-bar-track" },
        h("span", { class: "ab-bar-fill", style: { width: `${Math.max(1, Math.min(100, row.share * 100))}%` } })),
      h("span", { class: "ab-bar-pct" }, row.label))));
  return h("section", { class: `ab-report ab-level-${summary.level}`, dataset: { level: summary.level } },
    h("div", { class: "ab-title" }, summary.headline),
    summary.stale ? h("div", { class: "ab-line ab-muted" }, summary.staleText) : null,
    summary.rows.length ? bars : null,
    summary.fallbacks.map((f) => h("div", { class: "ab-line ab-warn ab-fallback" }, `↪ ${f.text}`)),
    summary.tuning ? nodeTuning(summary.tuning) : null,
    summary.notes.map((n) => h("div", { class: "ab-line ab-muted" }, n)),
    summary.warnings.map((w) => h("div", { class: "ab-line ab-bad ab-warning" }, `⚠ ${w}`)));
}

/** The whole panel inside a node. */
export function nodePanel(statusView, reportSummary) {
  return h("div", { class: "ab-panel" }, statusSection(statusView), reportSection(reportSummary));
}

/** Rough height (px) of a node panel before the browser has laid it out. */
export function estimateHeight(statusView, reportSummary, width = 300) {
  const charsPerLine = Math.max(24, Math.floor((width - 24) / 6.2));
  const lines = (text) => Math.max(1, Math.ceil(String(text || "").length / charsPerLine));
  let n = lines(statusView.title) + statusView.lines.reduce((a, l) => a + lines(l.text), 0) + (statusView.hint ? 1.4 : 0);
  if (reportSummary) {
    n += lines(reportSummary.headline) + reportSummary.rows.length * 1.1 + (reportSummary.stale ? 1 : 0);
    n += reportSummary.fallbacks.reduce((a, f) => a + lines(f.text), 0);
    n += reportSummary.warnings.reduce((a, w) => a + lines(w), 0) + reportSummary.notes.length;
    const tuning = reportSummary.tuning;
    if (tuning) {
      n += lines(tuning.text) + tuning.decisions.slice(0, NODE_DECISIONS).reduce((a, d) => a + lines(d.line), 0);
      if (tuning.decisions.length > NODE_DECISIONS) n += 1;
    }
  } else {
    n += 2;
  }
  return Math.round(n * 15 + 26);
}

/** One committed benchmark run: its title, and its chart linked to the full-size image. */
function benchmarkFigure(run, chartSrc) {
  if (!run.url) {
    return h("div", { class: "ab-line ab-chart-none", dataset: { benchmark: run.name } },
      run.title, h("span", { class: "ab-muted" }, " — no chart in this run"));
  }
  const src = chartSrc(run.url);
  // The sidebar is narrow: the chart opens in a tab of its own to be read.
  const link = { href: src, target: "_blank", rel: "noopener" };
  return h("figure", { class: "ab-chart", dataset: { benchmark: run.name } },
    h("figcaption", { class: "ab-chart-title" }, run.title),
    h("a", { ...link, class: "ab-chart-image", title: "Open the chart full size" },
      h("img", { src, alt: `Benchmark chart: ${run.title}` })),
    h("a", { ...link, class: "ab-chart-open" }, "Open full size ↗"));
}

/** A backend name that may wrap after its underscores in a narrow column (sage_qk_int8_pv_ / fp8_cuda). */
function breakable(name) {
  return name.split(/(?<=_)/).flatMap((part, i) => (i ? [h("wbr"), part] : [part]));
}

/** A decision's candidates: time, time against the chosen one, error against the reference, verdict. */
function candidatesTable(decision) {
  const head = ["backend", "ms", "× chosen", "rel. L1", "cosine", "verdict"];
  // In a narrow sidebar the table scrolls sideways rather than squeezing the numbers.
  return h("div", { class: "ab-candidates-scroll" }, h("table", { class: "ab-table ab-candidates" },
    h("thead", {}, h("tr", {}, head.map((label) => h("th", {}, label)))),
    h("tbody", {}, decision.rows.map((row) => h("tr", { class: row.chosen ? "ab-chosen" : null, dataset: { backend: row.backend } },
      h("td", { class: "ab-name" }, breakable(row.backend)),
      h("td", { class: "ab-num" }, row.msText),
      h("td", { class: "ab-num" }, row.chosen ? "" : row.ratioText),
      h("td", { class: "ab-num" }, row.relL1Text),
      h("td", { class: "ab-num" }, row.cosineText),
      h("td", { class: `ab-${row.verdict.cls}`, title: row.verdict.title || null }, row.verdict.label))))));
}

/**
 * One decision, folded: the line (and runner-up) as its summary, the candidates table
 * inside. `expanded` holds the keys of the open ones; the glue keeps it across re-renders
 * so an open table stays open when a report or the status arrives.
 */
function decisionDetails(decision, key, expanded) {
  const details = h("details", { class: "ab-decision", open: expanded.has(key), dataset: { signature: decision.signature } },
    h("summary", { title: decision.signature },
      h("span", { class: "ab-decision-line" }, decision.line),
      h("span", { class: "ab-muted" }, ` · ${decision.runnerUpText}`)),
    candidatesTable(decision),
    decision.facts ? h("div", { class: "ab-muted ab-small" }, decision.facts) : null);
  details.addEventListener("toggle", () => {
    if (details.open) expanded.add(key);
    else expanded.delete(key);
  });
  return details;
}

/**
 * "Tuned on this GPU" (what auto_tuned has saved for each visible GPU, status.tuning) or
 * "Timed by auto on this GPU" (status.auto_measured): tunedOnThisMachine's view.
 */
function tunedBlock(tuned, expanded) {
  return h("div", { class: "ab-tuned", dataset: { file: tuned.key } },
    h("div", { class: "ab-title" }, tuned.title),
    h("div", { class: "ab-muted ab-small ab-tuned-file" },
      `File: ${tuned.file || "?"}${tuned.exists ? "" : " (not written yet)"}`),
    tuned.note ? h("div", { class: "ab-line ab-muted" }, tuned.note) : null,
    tuned.devices.map((device) => h("div", { class: "ab-tuned-device", dataset: { device: String(device.index) } },
      h("div", { class: "ab-line ab-head ab-fingerprint", title: device.details || null }, `${device.label}${device.summary}`),
      device.details ? h("div", { class: "ab-muted ab-small" }, device.details) : null,
      device.problem ? h("div", { class: "ab-line ab-bad ab-tuned-problem" }, `⚠ ${device.problem}`) : null,
      h("div", { class: `ab-line ${device.count ? "ab-good" : "ab-muted"} ab-tuned-count` }, device.countText),
      device.decisions.map((d) => decisionDetails(d, `${tuned.key}|gpu${device.index}|${d.signature}`, expanded)))));
}

/**
 * "Kernel failures": what the server keeps off a call shape because its kernel raised, and
 * a Clear button (onClear(route)) that makes the server try every one of them again.
 */
function failuresBlock(failures, onClear, clearError) {
  return h("div", { class: "ab-failures", dataset: { count: String(failures.rows.length) } },
    h("div", { class: "ab-title" }, failures.title),
    failures.rows.length
      ? failures.rows.map((row) => h("div", { class: "ab-failure", dataset: { backend: row.backend } },
          h("div", { class: `ab-line ${row.permanent ? "ab-bad" : "ab-warn"}` },
            h("span", { class: "ab-name" }, row.backend), ` ✗ ${row.signature}`),
          h("div", { class: "ab-muted ab-small ab-sub ab-failure-reason" }, row.reason),
          h("div", { class: "ab-muted ab-small ab-sub" }, row.state)))
      : h("div", { class: "ab-line ab-muted" }, failures.empty),
    failures.rows.length && failures.clearRoute && onClear
      ? h("button", { class: "ab-clear-failures", type: "button", onclick: () => onClear(failures.clearRoute),
                      title: "Forget these failures: every backend is tried again on its next call" }, "Clear")
      : null,
    clearError ? h("div", { class: "ab-line ab-bad ab-clear-error" }, `Could not clear the failures: ${clearError}`) : null);
}

/** The sidebar / floating panel content. */
export function sidebarContent({ status, error, reports = [], onRefresh, onClearFailures, clearError = null,
                                 chartSrc = (u) => u, expanded = new Set() }) {
  const header = h("div", { class: "ab-side-head" },
    h("h3", {}, "Attention backends"),
    onRefresh ? h("button", { class: "ab-refresh", type: "button", onclick: onRefresh, title: "Reload from the server" }, "Refresh") : null);
  if (error) {
    return h("div", { class: "ab-side" }, header, h("div", { class: "ab-line ab-bad" }, `Could not load the status: ${error}`));
  }
  if (!status) return h("div", { class: "ab-side" }, header, h("div", { class: "ab-line ab-muted" }, "Loading…"));

  const rows = backendTable(status);
  const list = h("div", { class: "ab-list" }, rows.map((r) => h("div", {
    class: `ab-item ${r.available ? "ab-row-ok" : "ab-row-no"}`, dataset: { backend: r.name, available: String(r.available) },
    title: r.description || null,
  },
  h("div", { class: "ab-item-head" },
    h("span", { class: r.available ? "ab-good ab-mark" : "ab-bad ab-mark" }, r.available ? "✓" : "✗"),
    h("span", { class: "ab-name" }, r.name),
    r.quantized ? h("span", { class: "ab-tag", title: "quantized kernel" }, "quantized") : null,
    r.available && r.version ? h("span", { class: "ab-muted ab-version" }, r.version) : null),
  r.available && r.autoFor.length
    ? h("div", { class: "ab-muted ab-small ab-sub" }, `auto uses it for ${r.autoForAll ? "every typical shape" : r.autoFor.join(", ")}`) : null,
  !r.available && r.reason ? h("div", { class: "ab-muted ab-small ab-sub" }, r.reason) : null,
  !r.available && r.install && r.install.note ? h("div", { class: "ab-muted ab-small ab-sub" }, r.install.note) : null,
  !r.available && r.install && r.install.command
    ? h("div", { class: "ab-hint ab-sub" }, h("code", {}, r.install.command), copyButton(r.install.command)) : null)));

  const auto = describeAuto(status);
  const autoBlock = h("div", { class: "ab-auto" },
    h("div", { class: "ab-title" }, "auto on this machine"),
    auto.lines.map(lineEl));

  const runs = benchmarkRuns(status);
  const chartBlock = h("div", { class: "ab-charts" },
    h("div", { class: "ab-title" }, "Benchmark"),
    runs.length
      ? runs.map((run) => benchmarkFigure(run, chartSrc))
      : h("div", { class: "ab-line ab-muted" }, "No benchmark results ship with this version."));

  const reportBlock = h("div", { class: "ab-reports" },
    h("div", { class: "ab-title" }, "Last runs"),
    reports.length
      ? reports.map((r) => h("div", { class: "ab-run", dataset: { node: r.nodeId } },
          h("div", { class: "ab-line" }, h("span", { class: "ab-name" }, `#${r.nodeId} ${r.selection}`), ` — ${r.text}`),
          r.tuning ? h("div", { class: "ab-run-tuning" },
            h("div", { class: `ab-line ab-${r.tuning.cls} ab-tuning-line` }, r.tuning.text),
            r.tuning.decisions.map((d) => decisionDetails(d, `run${r.nodeId}|${d.signature}`, expanded))) : null))
      : h("div", { class: "ab-line ab-muted" }, "No run reports yet."));

  const tuned = tunedOnThisMachine(status);
  // Shown once there is something to show: most machines never time a contested call.
  const timed = tunedOnThisMachine(status, "auto_measured");
  const timedShown = timed && timed.devices.some((device) => device.count || device.problem);
  return h("div", { class: "ab-side" }, header,
    h("div", { class: "ab-muted ab-summary" }, machineSummary(status)),
    autoBlock,
    status.kernel_failures ? failuresBlock(kernelFailures(status), onClearFailures, clearError) : null,
    tuned ? tunedBlock(tuned, expanded) : null,
    timedShown ? tunedBlock(timed, expanded) : null,
    reportBlock,
    h("div", { class: "ab-title" }, "Backends"), list,
    chartBlock);
}
