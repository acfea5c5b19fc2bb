// Pure logic over a run report (the payload of the websocket event
// "attention_backends.report" and the values of GET /attention_backends/report; docs/api.md).
// No DOM, no ComfyUI imports.

import { parsePriority } from "./priority.js";
import { runTuning, shapeText } from "./tuning.js";

export const REPORT_EVENT = "attention_backends.report";

/** 0.947 → "94.7%", 1 → "100%", 0.0004 → "<0.1%". */
export function formatShare(share) {
  if (typeof share !== "number" || !Number.isFinite(share)) return "–";
  if (share <= 0) return "0%";
  if (share >= 1) return "100%";
  const pct = share * 100;
  if (pct < 0.1) return "<0.1%";
  if (pct > 99.9) return ">99.9%";
  return `${pct.toFixed(1).replace(/\.0$/, "")}%`;
}

/** 1520 → "1,520" without relying on the runtime's locale data. */
export function formatCount(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "?";
  return String(Math.round(n)).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

export function formatDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  return `${m} min ${Math.round(seconds - 60 * m)} s`;
}

/** [{backend, calls, share}] sorted by calls, from `served` (+ `shares` when given). */
export function shareRows(report) {
  const served = (report && report.served) || {};
  const shares = (report && report.shares) || {};
  const total = Object.values(served).reduce((a, b) => a + (Number(b) || 0), 0);
  const names = new Set([...Object.keys(served), ...Object.keys(shares)]);
  const rows = [...names].map((backend) => {
    const calls = Number(served[backend]) || 0;
    const share = typeof shares[backend] === "number" ? shares[backend] : (total ? calls / total : 0);
    return { backend, calls, share, label: formatShare(share) };
  });
  rows.sort((a, b) => (b.calls - a.calls) || (b.share - a.share) || a.backend.localeCompare(b.backend));
  return rows;
}

/** "flash4 → sdpa ×80: takes no mask (...)" */
export function fallbackLines(report) {
  return ((report && report.fallbacks) || []).map((f) => {
    const calls = typeof f.calls === "number" ? ` ×${formatCount(f.calls)}` : "";
    const route = `${f.wanted || "?"} → ${f.served_by || "?"}`;
    return { text: `${route}${calls}${f.reason ? `: ${f.reason}` : ""}`, wanted: f.wanted, servedBy: f.served_by };
  });
}

/** Notes from the routing and guard counters, only the ones that happened. */
export function noteLines(report) {
  const notes = [];
  const routing = (report && report.routing) || {};
  const labels = {
    exact_by_step_window: "exact outside the step window",
    exact_by_block_filter: "exact by block filter",
    exact_by_cross_rule: "exact by the cross-attention rule",
  };
  for (const [key, value] of Object.entries(routing)) {
    if (typeof value === "number" && value > 0) {
      notes.push(`${formatCount(value)} ${value === 1 ? "call" : "calls"} ${labels[key] || key.replace(/_/g, " ")}`);
    }
  }
  const guard = (report && report.guard) || {};
  if (guard.nonfinite_model_calls > 0) {
    notes.push(`guard: ${formatCount(guard.nonfinite_model_calls)} model call(s) produced NaN/Inf, ` +
      `${formatCount(guard.reruns || 0)} re-run with exact attention${guard.pinned_exact ? " (pinned exact)" : ""}`);
  } else if (guard.pinned_exact) {
    notes.push("guard: pinned exact attention");
  }
  return notes;
}

/** Sparse node: the sampled error per call shape, "sol · B=1 H=40 Nq=75600 …: worst rel. L1 0.031 in 16 sampled calls (budget 0.1)". */
export function qualityLines(report, limit = 4) {
  const quality = report && report.quality;
  if (!quality || !Array.isArray(quality.signatures)) return [];
  return quality.signatures.slice(0, limit).map((row) => {
    const calls = (row.checks || []).reduce((a, c) => a + (Number(c.calls) || 0), 0);
    const worst = typeof row.worst_rel_l1 === "number" ? `worst rel. L1 ${row.worst_rel_l1.toFixed(3)}` : "not checked";
    const dense = row.over_budget ? `; over budget, ${row.served_instead || "dense"} from then on` : "";
    return `${row.backend} · ${row.signature}: ${worst} in ${formatCount(calls)} sampled ` +
      `${calls === 1 ? "call" : "calls"} (budget ${quality.budget_rel_l1})${dense}`;
  });
}

/**
 * The "after a run" panel of a node.
 * Returns {level: "ok"|"warn"|"error", headline, rows, fallbacks, warnings, notes, stale, tuning}
 *   tuning: runTuning of the report: auto_tuned's measurements, or the contested calls auto
 *     timed; null when the run measured nothing
 *   currentSelection: the node's combo value now; a report from another selection is marked stale.
 */
export function summariseReport(report, { currentSelection = null } = {}) {
  if (!report || typeof report !== "object") return null;
  const rows = shareRows(report);
  const fallbacks = fallbackLines(report);
  const warnings = ((report.warnings) || []).map(String);
  const notes = [...noteLines(report), ...qualityLines(report)];
  const total = typeof report.total_calls === "number" ? report.total_calls
    : rows.reduce((a, r) => a + r.calls, 0);
  const parts = [`${formatCount(total)} attention ${total === 1 ? "call" : "calls"}`];
  if (typeof report.model_attention_calls === "number" && report.model_attention_calls !== total) {
    parts[0] += ` of ${formatCount(report.model_attention_calls)}`;
  }
  const refused = typeof report.refused_calls === "number" ? report.refused_calls : 0;
  if (refused) parts.push(`${formatCount(refused)} refused (stop)`);
  const duration = formatDuration(report.duration_s);
  if (duration) parts.push(duration);
  if (report.model) parts.push(String(report.model));
  let level = "ok";
  if (fallbacks.length || notes.some((n) => n.startsWith("guard"))) level = "warn";
  if (warnings.length) level = "warn";
  if (total === 0 || refused) level = "error";
  const selection = report.selection != null ? String(report.selection) : null;
  // The Advanced node reports its priority list as "a > b"; compare lists, not spellings.
  const norm = (x) => parsePriority(x).join(" > ");
  const stale = !!(currentSelection && selection && typeof currentSelection === "string" &&
    norm(currentSelection) !== norm(selection));
  return {
    level,
    headline: `Last run: ${parts.join(" · ")}`,
    selection,
    rows,
    fallbacks,
    warnings,
    notes,
    stale,
    staleText: stale ? `ran with "${selection}"; the node now says "${currentSelection}"` : "",
    tuning: runTuning(report),
  };
}

/** Compact bar: "flash4 94.7% · sdpa 5.3%" (used for tooltips and logs). */
export function oneLine(report) {
  return shareRows(report).map((r) => `${r.backend} ${r.label}`).join(" · ");
}

/** Per-signature plans for a tooltip: "B=1 H=24 Nq=4608 … → flash4 ×1,440" (+ " · tuned, saved"). */
export function planLines(report, limit = 8) {
  const plans = ((report && report.plans) || []).slice(0, limit);
  return plans.map((p) => `${shapeText(p.shape) || p.signature || "?"} → ${p.backend || "?"} ×${formatCount(p.calls)}` +
    (p.refused ? `, ${formatCount(p.refused)} refused` : "") + (p.tuned ? ` · tuned, ${p.tuned}` : ""));
}

/**
 * Whether a kernel raised during the run: a plan passed a backend over because it failed
 * (kind "failed"). The server then remembers a failure that the status lists.
 */
export function kernelFailedInRun(report) {
  return ((report && report.plans) || []).some((plan) => (plan.passed_over || []).some((r) => r && r.kind === "failed"));
}

/** Normalise GET /attention_backends/report into {nodeId: report}. */
export function reportsFromResponse(json) {
  if (!json || typeof json !== "object") return {};
  if (json.reports && typeof json.reports === "object") return { ...json.reports };
  if (json.node_id != null) return { [String(json.node_id)]: json };
  return {};
}
