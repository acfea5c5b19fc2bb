// DOM rendering of the view models built by status.js and report.js.
// Needs `document` (a browser) but nothing from ComfyUI, so the glue stays thin.

import { backendTable, benchmarkRuns, describeAuto, machineSummary } from "./status.js";
import { formatCount } from "./report.js";

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

/** The sidebar / floating panel content. */
export function sidebarContent({ status, error, reports = [], onRefresh, chartSrc = (u) => u }) {
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
  !r.available && r.hintShown.text ? h("div", { class: "ab-muted ab-small ab-sub" }, r.hintShown.text) : null,
  !r.available && r.hintShown.command
    ? h("div", { class: "ab-hint ab-sub" }, h("code", {}, r.hintShown.command), copyButton(r.hintShown.command)) : null)));

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
      ? reports.map((r) => h("div", { class: "ab-line", dataset: { node: r.nodeId } },
          h("span", { class: "ab-name" }, `#${r.nodeId} ${r.selection}`), ` — ${r.text}`))
      : h("div", { class: "ab-line ab-muted" }, "No run reports yet."));

  return h("div", { class: "ab-side" }, header,
    h("div", { class: "ab-muted ab-summary" }, machineSummary(status)),
    autoBlock,
    reportBlock,
    h("div", { class: "ab-title" }, "Backends"), list,
    chartBlock);
}
