import { test } from "node:test";
import assert from "node:assert/strict";
import {
  NODE_KINDS, attentionNodes, findWidget, isAttentionNode, nodeKind, nodePolicy, nodeSelection, nodeTuning,
  reportMatchesNode, resolveReportNode,
} from "../../web/lib/nodes.js";

// Minimal stand-ins for LiteGraph graphs and nodes.
class Graph {
  constructor(nodes) { this._nodes = nodes; this._nodes_by_id = Object.fromEntries(nodes.map((n) => [n.id, n])); }
  getNodeById(id) { return this._nodes_by_id[id] ?? null; }
}
const node = (id, type, widgets = [], extra = {}) => ({ id, type, comfyClass: type, widgets, ...extra });
const combo = (name, value, values) => ({ name, value, options: { values } });

const inner = node(3, "AttentionBackend", [combo("backend", "sage", ["auto", "sage"]), combo("on_unsupported", "stop", ["fall back", "stop"])]);
const subgraphNode = node(5, "some-subgraph-uuid", [], { subgraph: new Graph([node(1, "KSampler"), inner]) });
const top = node(12, "AttentionBackend", [combo("backend", "auto", ["auto", "sdpa"]), combo("on_unsupported", "fall back", ["fall back", "stop"]),
  combo("tuning", "reuse saved", ["reuse saved", "re-tune"])]);
const adv = node(7, "AttentionBackendAdvanced", [{ name: "priority", value: "flash4 > sdpa" }, combo("tuning", "re-tune", ["reuse saved", "re-tune"])]);
const root = new Graph([node(1, "CheckpointLoaderSimple"), top, adv, subgraphNode]);

test("node kinds", () => {
  assert.equal(nodeKind("AttentionBackend"), NODE_KINDS.AttentionBackend);
  assert.equal(nodeKind("AttentionBackendAdvanced").kind, "advanced");
  assert.equal(nodeKind("AttentionBackendSparse").kind, "sparse");
  const sparse = node(8, "AttentionBackendSparse", [combo("backend", "sol", ["sol", "sparge"])]);
  assert.equal(nodeSelection(sparse), "sol");
  assert.equal(nodePolicy(sparse), null);
  assert.equal(nodeTuning(sparse), null);
  // Other types that merely start with the name (e.g. test fixtures) are not ours.
  assert.equal(nodeKind("AttentionBackendsTestTinyFlux"), null);
  assert.equal(nodeKind("toString"), null);
  assert.equal(nodeKind("KSampler"), null);
  assert.equal(nodeKind(undefined), null);
  assert.ok(isAttentionNode(top));
  assert.ok(!isAttentionNode(node(1, "KSampler")));
});

test("selection and policy come from the widgets", () => {
  assert.equal(nodeSelection(top), "auto");
  assert.equal(nodePolicy(top), "fall back");
  assert.equal(nodeSelection(inner), "sage");
  assert.equal(nodePolicy(inner), "stop");
  assert.equal(nodeSelection(adv), "flash4 > sdpa");
  assert.equal(nodePolicy(adv), null);
  assert.equal(findWidget(top, "nope"), null);
  assert.equal(nodeTuning(top), "reuse saved");
  assert.equal(nodeTuning(adv), "re-tune");
  assert.equal(nodeTuning(inner), null); // a workflow saved before the input existed
  assert.equal(nodeTuning(node(1, "KSampler")), null);
  // A renamed combo is still found by its values.
  assert.equal(nodeSelection(node(9, "AttentionBackend", [combo("kernel", "sdpa", ["auto", "sdpa"])])), "sdpa");
});

test("top-level report ids resolve, as strings or numbers", () => {
  assert.equal(resolveReportNode(root, "12"), top);
  assert.equal(resolveReportNode(root, 12), top);
  assert.equal(resolveReportNode(root, "99"), null);
  assert.equal(resolveReportNode(root, null), null);
  assert.equal(resolveReportNode(null, "12"), null);
});

test("subgraph paths resolve through the subgraph node", () => {
  assert.equal(resolveReportNode(root, "5:3"), inner);
  assert.equal(resolveReportNode(root, "5:99"), null);
  assert.equal(resolveReportNode(root, "12:3"), null); // 12 is not a subgraph
});

test("graphs without getNodeById are searched by id", () => {
  assert.equal(resolveReportNode({ nodes: [top] }, "12"), top);
});

test("a report for another node type does not match", () => {
  assert.ok(reportMatchesNode({ node_id: "12", node_type: "AttentionBackend" }, top));
  assert.ok(reportMatchesNode({ node_id: "12" }, top));
  assert.ok(!reportMatchesNode({ node_id: "12", node_type: "AttentionBackendAdvanced" }, top));
  assert.ok(!reportMatchesNode(null, top));
});

test("attentionNodes walks subgraphs and gives execution paths", () => {
  assert.deepEqual(attentionNodes(root).map((e) => e.path), ["12", "7", "5:3"]);
  assert.deepEqual(attentionNodes(null), []);
});
