// Which graph nodes are ours, which widgets they carry, and which node a report belongs to.
// Pure: works on anything shaped like a LiteGraph graph/node, so Node's test runner can
// exercise it with plain objects.

import { AUTO } from "./priority.js";

/** Node type (ComfyUI class name) → what the extension reads from it. */
export const NODE_KINDS = {
  AttentionBackend: { kind: "simple", selectionWidget: "backend", policyWidget: "on_unsupported", tuningWidget: "tuning" },
  AttentionBackendAdvanced: {
    kind: "advanced", selectionWidget: "priority", policyWidget: "on_unsupported", tuningWidget: "tuning",
  },
  // Sparse backends (sol, sparge); calls they do not serve fall back to auto, no tuning.
  AttentionBackendSparse: { kind: "sparse", selectionWidget: "backend", policyWidget: null, tuningWidget: null },
};

/** Name of the extension's own (display-only, never serialised) widget. */
export const PANEL_WIDGET = "attention_status";

/** The kind entry for a node type, or null (only the pack's own node types). */
export function nodeKind(type) {
  if (!type) return null;
  return Object.prototype.hasOwnProperty.call(NODE_KINDS, type) ? NODE_KINDS[type] : null;
}

export function nodeType(node) {
  return (node && (node.comfyClass || node.type || (node.constructor && node.constructor.comfyClass))) || null;
}

export function isAttentionNode(node) {
  return nodeKind(nodeType(node)) !== null;
}

export function findWidget(node, name) {
  return ((node && node.widgets) || []).find((w) => w && w.name === name) || null;
}

/** The current selection of a node: the backend combo, or the advanced node's priority text. */
export function nodeSelection(node) {
  const kind = nodeKind(nodeType(node));
  if (!kind) return null;
  const w = findWidget(node, kind.selectionWidget);
  if (w) return w.value;
  // Fallback: the first widget whose value looks like a backend choice.
  const combo = ((node && node.widgets) || []).find((x) => x && x.options && Array.isArray(x.options.values) &&
    x.options.values.includes(AUTO));
  return combo ? combo.value : null;
}

export function nodePolicy(node) {
  const kind = nodeKind(nodeType(node));
  const w = kind ? findWidget(node, kind.policyWidget) : null;
  return w ? w.value : null;
}

/** The node's `tuning` choice ("reuse saved" | "re-tune"), or null (a workflow from before it existed). */
export function nodeTuning(node) {
  const kind = nodeKind(nodeType(node));
  const w = kind ? findWidget(node, kind.tuningWidget) : null;
  return w ? w.value : null;
}

function lookup(graph, id) {
  if (!graph) return null;
  if (typeof graph.getNodeById === "function") {
    const n = graph.getNodeById(id) ?? (/^-?\d+$/.test(String(id)) ? graph.getNodeById(Number(id)) : null);
    if (n) return n;
  }
  const nodes = graph._nodes || graph.nodes || [];
  return nodes.find((n) => String(n.id) === String(id)) || null;
}

/**
 * The node a report's node_id names. Top-level ids are "12"; nodes inside subgraphs
 * are executed as "5:12" (subgraph node 5, inner node 12), possibly nested.
 * Returns the node or null.
 */
export function resolveReportNode(rootGraph, nodeId) {
  if (nodeId == null || !rootGraph) return null;
  const path = String(nodeId).split(":").filter((s) => s.length > 0);
  if (path.length === 0) return null;
  let graph = rootGraph;
  let node = null;
  for (let i = 0; i < path.length; i += 1) {
    node = lookup(graph, path[i]);
    if (!node) return null;
    if (i < path.length - 1) {
      graph = node.subgraph || null;
      if (!graph) return null;
    }
  }
  return node;
}

/**
 * Does this report belong on this node? Same id path is required; when the report names a
 * node type, it must match too (a report from another workflow with a clashing id is ignored).
 */
export function reportMatchesNode(report, node) {
  if (!report || !node) return false;
  const type = nodeType(node);
  if (report.node_type && type && report.node_type !== type) return false;
  return true;
}

/** Every one of our nodes in a graph and its subgraphs: [{node, path: "5:12"}]. */
export function attentionNodes(rootGraph, prefix = "", depth = 0) {
  const out = [];
  if (!rootGraph || depth > 8) return out;
  for (const node of rootGraph._nodes || rootGraph.nodes || []) {
    const path = prefix ? `${prefix}:${node.id}` : String(node.id);
    if (isAttentionNode(node)) out.push({ node, path });
    if (node.subgraph) out.push(...attentionNodes(node.subgraph, path, depth + 1));
  }
  return out;
}
