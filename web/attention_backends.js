// ComfyUI frontend extension of ComfyUI Attention Backends.
//
// - On every Attention Backend node: what the selected backend will do on this machine
//   (GET /attention_backends/status) and, after a run, the run report (websocket event
//   "attention_backends.report", also GET /attention_backends/report).
// - An "Attention" sidebar tab with the backend table, auto's choices, what auto_tuned has
//   saved for this GPU, the kernel failures the server remembers (with a Clear button), the
//   last runs (with their tuning decisions) and the benchmark chart.
//
// Extension APIs used (present in comfyui-frontend-package 1.27 … 1.42):
//   app.registerExtension({setup, nodeCreated, loadedGraphNode}), node.addDOMWidget,
//   api.addEventListener, api.fetchApi, api.apiURL, app.extensionManager.registerSidebarTab.
// The logic lives in ./lib/*.js (pure, tested with `node --test`); this file is the glue.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { describePriority, describeSelection } from "./lib/status.js";
import { REPORT_EVENT, kernelFailedInRun, oneLine, planLines, reportsFromResponse, summariseReport } from "./lib/report.js";
import {
  PANEL_WIDGET, attentionNodes, findWidget, isAttentionNode, nodeKind, nodePolicy, nodeSelection, nodeTuning, nodeType,
  reportMatchesNode, resolveReportNode,
} from "./lib/nodes.js";
import { runTuning, tuningTooltipLines } from "./lib/tuning.js";
import { estimateHeight, nodePanel, sidebarContent } from "./lib/dom.js";

const EXTENSION = "AttentionBackends.Frontend";
const STATUS_ROUTE = "/attention_backends/status";
const REPORT_ROUTE = "/attention_backends/report";

const state = {
  status: null,
  statusError: null,
  statusPromise: null,
  reports: new Map(), // node id path ("12", "5:12") → latest report
  panels: new Set(), // live panel controllers
  sidebarEls: new Set(),
  expanded: new Set(), // open decision tables in the sidebar, kept across re-renders
  clearError: null, // why the last "Clear" of the kernel failures did not work
};

// ---------------------------------------------------------------- server data

async function fetchJson(route) {
  const res = await api.fetchApi(route, { cache: "no-store" });
  if (!res.ok) throw new Error(`${route}: HTTP ${res.status}`);
  return res.json();
}

function loadStatus(force = false) {
  if (!state.statusPromise || force) {
    state.statusPromise = fetchJson(STATUS_ROUTE)
      .then((json) => { state.status = json; state.statusError = null; })
      .catch((err) => { state.statusError = err && err.message ? err.message : String(err); })
      .finally(refreshEverything);
  }
  return state.statusPromise;
}

/** POST the clear route, then show the server's status (the failures it still holds). */
async function clearFailures(route) {
  state.clearError = null;
  try {
    const res = await api.fetchApi(route, { method: "POST", cache: "no-store" });
    if (!res.ok) throw new Error(`${route}: HTTP ${res.status}`);
  } catch (err) {
    state.clearError = err && err.message ? err.message : String(err);
  }
  await loadStatus(true);
}

async function loadReports() {
  try {
    const reports = reportsFromResponse(await fetchJson(REPORT_ROUTE));
    for (const [id, report] of Object.entries(reports)) {
      if (!state.reports.has(id)) state.reports.set(id, report);
    }
  } catch (err) {
    console.debug(`[${EXTENSION}] no stored reports:`, err);
  }
  refreshEverything();
}

function rootGraph() {
  return app.rootGraph || app.graph;
}

function onReport(event) {
  const report = event && event.detail;
  if (!report || report.node_id == null) return;
  state.reports.set(String(report.node_id), report);
  const node = resolveReportNode(rootGraph(), report.node_id);
  if (node && reportMatchesNode(report, node)) {
    const panel = node.__attentionPanel;
    if (panel) panel.render();
  }
  renderSidebars();
  // The server now remembers a failure: the sidebar lists it (with its Clear button).
  if (kernelFailedInRun(report)) loadStatus(true);
}

// ---------------------------------------------------------------- node panel

function nodePath(node) {
  const hit = attentionNodes(rootGraph()).find((entry) => entry.node === node);
  return hit ? hit.path : String(node.id);
}

function reportFor(node) {
  const report = state.reports.get(nodePath(node));
  return report && reportMatchesNode(report, node) ? report : null;
}

function statusViewFor(node) {
  const kind = nodeKind(nodeType(node));
  const options = { error: state.statusError, onUnsupported: nodePolicy(node), tuning: nodeTuning(node) };
  if (kind && kind.kind === "advanced" && findWidget(node, kind.selectionWidget)) {
    return describePriority(state.status, nodeSelection(node), options);
  }
  return describeSelection(state.status, nodeSelection(node), options);
}

function chainCallback(widget, after) {
  if (!widget || widget.__attentionChained) return;
  const original = widget.callback;
  widget.callback = function (...args) {
    const result = original ? original.apply(this, args) : undefined;
    try { after(); } catch (err) { console.error(`[${EXTENSION}]`, err); }
    return result;
  };
  widget.__attentionChained = true;
}

/** The widget values the panel depends on; a change re-renders it. */
function widgetsKey(node) {
  return `${nodeSelection(node)}|${nodePolicy(node)}|${nodeTuning(node)}`;
}

function attachPanel(node) {
  if (node.__attentionPanel || typeof node.addDOMWidget !== "function") return;
  const element = document.createElement("div");
  element.className = "ab-node";
  const panel = {
    node,
    element,
    height: 120,
    lastKey: null,
    render() {
      const selection = nodeSelection(node);
      const view = statusViewFor(node);
      const report = reportFor(node);
      const summary = report ? summariseReport(report, { currentSelection: typeof selection === "string" ? selection : null }) : null;
      element.replaceChildren(nodePanel(view, summary));
      element.dataset.selection = selection == null ? "" : String(selection);
      element.dataset.kind = view.kind;
      element.dataset.report = summary ? summary.level : "none";
      element.title = report
        ? [oneLine(report), ...planLines(report), ...tuningTooltipLines(summary.tuning)].join("\n") : "";
      this.lastKey = widgetsKey(node);
      this.resize(estimateHeight(view, summary, node.size ? node.size[0] : 300) + 20);
      this.scheduleMeasure();
    },
    scheduleMeasure() {
      if (this.measuring) return;
      this.measuring = true;
      requestAnimationFrame(() => { this.measuring = false; this.measure(); });
    },
    measure() {
      const content = element.firstElementChild;
      if (!content || !element.isConnected || content.offsetParent === null) return;
      const margin = typeof this.widget?.margin === "number" ? this.widget.margin : 10;
      const wanted = Math.ceil(content.scrollHeight) + 2 * margin + 2;
      if (wanted > 20 && Math.abs(wanted - this.height) > 4) this.resize(wanted);
    },
    resize(height) {
      this.height = height;
      try {
        const size = node.computeSize();
        node.setSize([Math.max(node.size[0], size[0]), size[1]]);
      } catch (_) { /* node not in a graph yet */ }
      node.setDirtyCanvas?.(true, true);
      app.graph?.setDirtyCanvas?.(true, true);
    },
  };
  const widget = node.addDOMWidget(PANEL_WIDGET, "attention_backends_panel", element, {
    serialize: false, // not an input of the prompt
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => panel.height,
    getMaxHeight: () => panel.height,
  });
  widget.serialize = false; // not in the workflow's widgets_values either
  panel.widget = widget;
  node.__attentionPanel = panel;
  state.panels.add(panel);

  const kind = nodeKind(nodeType(node));
  if (kind) {
    chainCallback(findWidget(node, kind.selectionWidget), () => panel.render());
    chainCallback(findWidget(node, kind.policyWidget), () => panel.render());
    chainCallback(findWidget(node, kind.tuningWidget), () => panel.render());
  }
  // Values set without a callback (workflow load, undo, links) are caught on the next draw.
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (...args) {
    const result = onDrawForeground ? onDrawForeground.apply(this, args) : undefined;
    if (panel.lastKey !== widgetsKey(node)) panel.render();
    return result;
  };
  const onResize = node.onResize;
  node.onResize = function (...args) {
    const result = onResize ? onResize.apply(this, args) : undefined;
    panel.scheduleMeasure(); // text re-wraps when the node gets narrower or wider
    return result;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    state.panels.delete(panel);
    return onRemoved ? onRemoved.apply(this, args) : undefined;
  };
  panel.render();
}

function refreshEverything() {
  for (const panel of state.panels) {
    // Nodes dropped with their graph (graph.clear()) never get onRemoved.
    if (panel.node.graph) panel.seenInGraph = true;
    else if (panel.seenInGraph) { state.panels.delete(panel); continue; }
    try { panel.render(); } catch (err) { console.error(`[${EXTENSION}]`, err); }
  }
  renderSidebars();
}

// ---------------------------------------------------------------- sidebar

function sidebarReports() {
  const out = [];
  for (const [nodeId, report] of state.reports) {
    const parts = [oneLine(report) || "no attention calls"];
    const fallbacks = (report.fallbacks || []).reduce((n, f) => n + (Number(f.calls) || 0), 0);
    if (fallbacks) parts.push(`${fallbacks} fell back`);
    if (report.refused_calls) parts.push(`${report.refused_calls} refused`);
    if ((report.warnings || []).length) parts.push(`⚠ ${report.warnings.length}`);
    out.push({
      nodeId, selection: report.selection ?? "?", text: parts.join(" · "),
      tuning: runTuning(report),
    });
  }
  return out;
}

function renderSidebar(el) {
  el.replaceChildren(sidebarContent({
    status: state.status,
    error: state.statusError,
    reports: sidebarReports(),
    onRefresh: () => { loadStatus(true); loadReports(); },
    onClearFailures: clearFailures,
    clearError: state.clearError,
    chartSrc: (url) => api.apiURL(url), // under /api, and the frontend's API base
    expanded: state.expanded,
  }));
}

function renderSidebars() {
  for (const el of state.sidebarEls) {
    if (!el.isConnected) { state.sidebarEls.delete(el); continue; }
    renderSidebar(el);
  }
}

function mountSidebar(el) {
  el.classList.add("ab-sidebar-root");
  state.sidebarEls.add(el);
  renderSidebar(el);
}

function registerPanel() {
  const manager = app.extensionManager;
  if (manager && typeof manager.registerSidebarTab === "function") {
    manager.registerSidebarTab({
      id: "attention-backends",
      icon: "pi pi-bolt",
      title: "Attention",
      tooltip: "Attention backends on this machine",
      type: "custom",
      render: (el) => mountSidebar(el),
      destroy: () => state.sidebarEls.clear(),
    });
    return;
  }
  // Degraded: a small floating button that opens the same panel.
  const box = document.createElement("div");
  box.className = "ab-floating ab-hidden";
  const button = document.createElement("button");
  button.className = "ab-floating-button";
  button.textContent = "Attention";
  button.title = "Attention backends on this machine";
  button.addEventListener("click", () => {
    box.classList.toggle("ab-hidden");
    if (!box.classList.contains("ab-hidden")) mountSidebar(box);
  });
  document.body.append(button, box);
}

// ---------------------------------------------------------------- registration

function addStylesheet() {
  if (document.querySelector("link[data-attention-backends]")) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = new URL("./attention_backends.css", import.meta.url).href;
  link.dataset.attentionBackends = "";
  document.head.append(link);
}

// ComfyUI serves a pack's web folder once per name it finds (WEB_DIRECTORY under the
// folder's name, `[tool.comfy] web` under the project name): a second copy stays idle.
const alreadyLoaded = !!window.__attentionBackends;
if (alreadyLoaded) {
  console.warn(`[${EXTENSION}] loaded twice (${import.meta.url}); this copy stays idle.`);
} else {
  window.__attentionBackends = { state, loadStatus, loadReports, refreshEverything, source: import.meta.url };
}

if (!alreadyLoaded) app.registerExtension({
  name: EXTENSION,
  async setup() {
    addStylesheet();
    api.addEventListener(REPORT_EVENT, onReport);
    registerPanel();
    loadStatus();
    loadReports();
  },
  nodeCreated(node) {
    if (isAttentionNode(node)) attachPanel(node);
  },
  loadedGraphNode(node) {
    if (node.__attentionPanel) node.__attentionPanel.render();
  },
});
