// Pure logic over `auto_tuned`'s decisions (docs/api.md): the run report's `tuning`
// and the status route's `tuning`. No DOM, no ComfyUI imports.
//
// A decision is {signature, shape, backend, reference, tuning_ms, tuned_at, budget,
// candidates, and in a run report source + complete}; candidates are {name: {ms, rel_l1,
// cosine, max_abs, nonfinite, verdict: {kind, text}}}. `signature` is the tuner's key (an
// identifier); `shape` is the same call as fields (attention.contract), which is what is shown.

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
const isNumber = (x) => typeof x === "number" && Number.isFinite(x);

const dtypeShort = (dtype) => String(dtype ?? "?");

/**
 * A call's shape (the server's signature fields) in the words of the report's plans:
 * "B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16", with the fields that are not at their usual
 * value after it (value head dim, mask, precision requests, device of a plan).
 */
export function shapeText(shape) {
  if (!shape || typeof shape !== "object") return "";
  const heads = shape.kv_heads != null && shape.kv_heads !== shape.heads ? `${shape.heads}/${shape.kv_heads}kv` : `${shape.heads}`;
  const out = [`B=${shape.batch}`, `H=${heads}`, `Nq=${shape.q_tokens}`, `Nk=${shape.k_tokens}`, `D=${shape.head_dim}`];
  if (shape.v_head_dim != null && shape.v_head_dim !== shape.head_dim) out.push(`Dv=${shape.v_head_dim}`);
  out.push(dtypeShort(shape.dtype));
  if (shape.device) out.push(shape.capability ? `${shape.device} sm${String(shape.capability).replace(".", "")}` : shape.device);
  if (shape.mask) out.push(`mask=${shape.mask.kind}${(shape.mask.shape || []).length ? `:${shape.mask.shape.join("x")}` : ""}`);
  if (shape.precision) out.push(`precision=${shape.precision}`);
  if (shape.low_precision_ok === false) out.push("low precision refused");
  if (shape.custom_scale) out.push("custom scale");
  return out.join(" ");
}

/** Kernel time: 0.42096 → "0.421", 1.5975 → "1.60", 31.2 → "31.2", 312 → "312". */
export function formatMs(ms) {
  if (!isNumber(ms)) return "–";
  if (ms < 1) return ms.toFixed(3);
  if (ms < 10) return ms.toFixed(2);
  if (ms < 100) return ms.toFixed(1);
  return ms.toFixed(0);
}

/** Time against the chosen backend's: 1.0612 → "1.06×". */
export function formatRatio(ratio) {
  return isNumber(ratio) ? `${ratio.toFixed(2)}×` : "–";
}

/** Relative L1 error: 0 → "0", 0.013947 → "0.014", 0.00062 → "6.2e-4". */
export function formatError(x) {
  if (!isNumber(x)) return "–";
  if (x === 0) return "0";
  if (Math.abs(x) < 0.001) return x.toExponential(1);
  return String(Number(x.toPrecision(2)));
}

/**
 * Cosine similarity with six decimals, enough to compare with the budgets (0.9995,
 * 0.99995); a value that would round up to 1 is not shown as a perfect match.
 */
export function formatCosine(c) {
  if (!isNumber(c)) return "–";
  if (c === 1) return "1";
  if (c >= 0.9999995) return ">0.999999";
  return c.toFixed(6);
}

/** Tuning time of a run: 0.61 → "0.61 s", 12.34 → "12.3 s". */
export function formatSeconds(s) {
  if (!isNumber(s)) return "";
  return `${s < 10 ? s.toFixed(2) : s.toFixed(1)} s`;
}

/** "2026-11-21T10:40:00+00:00" → "2026-11-21 10:40 UTC"; other text as is. */
export function formatTunedAt(iso) {
  const m = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(?::\d\d(?:\.\d+)?)?(Z|[+-]\d\d:\d\d)?$/.exec(String(iso ?? ""));
  if (!m) return iso ? String(iso) : "";
  const zone = !m[3] ? "" : (m[3] === "Z" || m[3] === "+00:00" ? " UTC" : ` ${m[3]}`);
  return `${m[1]} ${m[2]}${zone}`;
}

/** The budget as the tuner applied it: "rel. L1 ≤ 0.02, cosine ≥ 0.9995". */
export function budgetText(budget) {
  const parts = [];
  if (budget && isNumber(budget.rel_l1)) parts.push(`rel. L1 ≤ ${budget.rel_l1}`);
  if (budget && isNumber(budget.min_cosine)) parts.push(`cosine ≥ ${budget.min_cosine}`);
  return parts.join(", ");
}

// The server's verdict kinds (attention.contract) → the label of a table cell and its colour.
const VERDICTS = {
  chosen: ["chosen", "good"],
  slower: ["slower", "muted"],
  inside_noise: ["inside noise", "muted"],
  over_budget: ["over budget", "bad"],
  nonfinite: ["non-finite", "bad"],
  raised: ["raised", "bad"],
  not_measured: ["not measured", "muted"],
  not_timed: ["not timed", "muted"],
};

/**
 * A verdict ({kind, text}) as a short label for a table cell ({label, cls}); the text, as
 * the tuner wrote it, goes into the cell's tooltip. A kind this page does not know shows its text.
 */
export function verdictLabel(verdict) {
  const known = verdict && Object.prototype.hasOwnProperty.call(VERDICTS, verdict.kind) ? VERDICTS[verdict.kind] : null;
  if (known) return { label: known[0], cls: known[1] };
  return { label: (verdict && verdict.text) || "?", cls: "muted" };
}

function candidatesOf(decision) {
  const c = decision && decision.candidates;
  return c && typeof c === "object" && !Array.isArray(c) ? c : {};
}

function chosenMs(decision) {
  const row = candidatesOf(decision)[decision && decision.backend];
  return row && isNumber(row.ms) && row.ms > 0 ? row.ms : null;
}

/** Inside the decision's error budget by its own numbers (the budget it was tuned with). */
function insideBudget(row, budget) {
  if (!row || row.nonfinite) return false;
  if (budget && isNumber(budget.rel_l1) && !(isNumber(row.rel_l1) && row.rel_l1 <= budget.rel_l1)) return false;
  if (budget && isNumber(budget.min_cosine) && !(isNumber(row.cosine) && row.cosine >= budget.min_cosine)) return false;
  return true;
}

/**
 * The backend the tuner would have picked without the chosen one: the fastest other
 * candidate that was timed and is inside the error budget. {backend, ms, ratio} or null.
 */
export function runnerUp(decision) {
  const base = chosenMs(decision);
  let best = null;
  for (const [backend, row] of Object.entries(candidatesOf(decision))) {
    if (backend === decision.backend || !row || !isNumber(row.ms) || !insideBudget(row, decision.budget)) continue;
    if (!best || row.ms < best.ms || (row.ms === best.ms && backend < best.backend)) best = { backend, ms: row.ms };
  }
  if (!best) return null;
  return { ...best, ratio: base ? best.ms / base : null };
}

/**
 * "runner-up sdpa 1.06×", "runner-up sdpa 1.01× (inside the noise floor)" when the ratio is
 * closer to 1 than the reference timed twice (decision.noise_floor), or "no runner-up
 * inside the error budget".
 */
export function runnerUpText(decision) {
  const r = runnerUp(decision);
  if (!r) return "no runner-up inside the error budget";
  if (!isNumber(r.ratio)) return `runner-up ${r.backend}`;
  const noise = decision && decision.noise_floor;
  const inside = isNumber(noise) && Math.abs(1 - r.ratio) <= noise;
  return `runner-up ${r.backend} ${formatRatio(r.ratio)}${inside ? " (inside the noise floor)" : ""}`;
}

/**
 * The candidates of a decision as table rows: the chosen one first, then by time, then
 * the untimed ones by name.
 */
export function candidateRows(decision) {
  const base = chosenMs(decision);
  const rows = Object.entries(candidatesOf(decision)).map(([backend, row]) => {
    const r = row || {};
    const ms = isNumber(r.ms) ? r.ms : null;
    const ratio = ms != null && base ? ms / base : null;
    return {
      backend,
      chosen: backend === decision.backend,
      ms,
      ratio,
      msText: formatMs(ms),
      ratioText: formatRatio(ratio),
      relL1Text: formatError(r.rel_l1),
      cosineText: formatCosine(r.cosine),
      verdict: { ...verdictLabel(r.verdict), title: String((r.verdict && r.verdict.text) ?? "") },
    };
  });
  rows.sort((a, b) => (Number(b.chosen) - Number(a.chosen)) ||
    ((a.ms == null) - (b.ms == null)) || ((a.ms ?? 0) - (b.ms ?? 0)) || a.backend.localeCompare(b.backend));
  return rows;
}

/** One decision as the UI shows it. */
export function decisionView(decision) {
  const d = decision || {};
  const short = shapeText(d.shape) || String(d.signature ?? "");
  const source = d.this_run === false ? "earlier run"
    : d.source === "measured" || d.source === "saved" ? d.source : null;
  const facts = [];
  if (d.reference) facts.push(`reference ${d.reference}`);
  const budget = budgetText(d.budget);
  if (budget) facts.push(`budget ${budget}`);
  if (isNumber(d.tuning_ms) && d.tuning_ms > 0) facts.push(`tuned in ${formatMs(d.tuning_ms)} ms`);
  const at = formatTunedAt(d.tuned_at);
  if (at) facts.push(at);
  return {
    signature: String(d.signature ?? ""),
    short,
    backend: d.backend || "?",
    source,
    complete: d.complete !== false,
    runnerUp: runnerUp(d),
    runnerUpText: runnerUpText(d),
    facts: facts.join(" · "),
    rows: candidateRows(d),
    // "flash4 ← B=1 H=24 … · measured": the backend first, it is what the line is about.
    line: `${d.backend || "?"} ← ${short}${source ? ` · ${source}` : ""}${d.complete === false ? " (partial, not saved)" : ""}`,
  };
}

/**
 * The run report's `tuning` (null unless auto_tuned was selected) → {text, cls, decisions,
 * left, partial, kept, file}, or null. text: "auto_tuned: 2 shapes measured in 0.61 s, 3 reused".
 *   plans: the report's plans (their `tuned` marks the shapes a tuner decided).
 */
export function summariseTuning(tuning, { plans = [] } = {}) {
  if (!tuning || typeof tuning !== "object") return null;
  // `auto` measures only the calls its cost model cannot separate ("contested"); a report
  // from before the field was sent is auto_tuned's.
  const byAuto = tuning.strategy === "auto";
  const [one, many] = byAuto ? ["contested shape", "contested shapes"] : ["shape", "shapes"];
  const decisions = (Array.isArray(tuning.decisions) ? tuning.decisions : []).map(decisionView);
  const measured = isNumber(tuning.measured) ? tuning.measured : decisions.filter((d) => d.source === "measured").length;
  const reused = isNumber(tuning.reused) ? tuning.reused : decisions.filter((d) => d.source === "saved").length;
  const left = Array.isArray(tuning.left_to_auto) ? tuning.left_to_auto.length : 0;
  const partial = decisions.filter((d) => !d.complete).length;
  // A node that samples again with unchanged inputs (ComfyUI reuses its output) keeps its
  // plans, tuned ones included: the tuner is not asked again. The server counts those
  // shapes as `kept` (and lists them with this_run: false); a report without the count
  // is worked out from the plans.
  const tunedPlans = (Array.isArray(plans) ? plans : [])
    .filter((p) => p && p.tuned && (p.tuned_by ?? "auto_tuned") === (byAuto ? "auto" : "auto_tuned")).length;
  const kept = isNumber(tuning.kept) ? tuning.kept : Math.max(0, tunedPlans - decisions.length);
  const parts = [];
  if (measured) {
    const took = formatSeconds(tuning.tuning_s);
    parts.push(`${plural(measured, one, many)} measured${took ? ` in ${took}` : ""}`);
  }
  if (reused) parts.push(parts.length ? `${reused} reused` : `${plural(reused, one, many)} reused`);
  if (kept) {
    parts.push(`${parts.length ? kept : plural(kept, one, many)} kept from this node's earlier run`);
  }
  if (partial) parts.push(`${partial} partial (not saved)`);
  if (left) parts.push(`${left} left to ${byAuto ? "the cost model's choice" : "auto"} (budget spent)`);
  return {
    text: `${byAuto ? "auto measured" : "auto_tuned"}: ${parts.length ? parts.join(", ") : "no call shape measured or reused"}`,
    cls: left || partial ? "warn" : "plain",
    decisions,
    left,
    partial,
    kept,
    file: tuning.file ? String(tuning.file) : "",
  };
}

/**
 * The measured part of a run report: auto_tuned's `tuning`, else the contested calls
 * `auto` timed (`auto_measured`); null when the run measured and reused nothing.
 */
export function runTuning(report) {
  if (!report || typeof report !== "object") return null;
  return summariseTuning(report.tuning || report.auto_measured, { plans: report.plans });
}

/** A fingerprint in one line: "NVIDIA H200 · driver 580.159.04 · torch 2.11.0+cu130". */
export function fingerprintSummary(fp) {
  if (!fp || typeof fp !== "object") return "unknown machine";
  const parts = [fp.gpu || "unknown GPU"];
  if (fp.driver) parts.push(`driver ${fp.driver}`);
  if (fp.torch) parts.push(`torch ${fp.torch}`);
  return parts.join(" · ");
}

/** The rest of the fingerprint (every field must match for a decision to be reused). */
export function fingerprintDetails(fp) {
  if (!fp || typeof fp !== "object") return "";
  const parts = [];
  if (fp.capability) parts.push(`capability ${fp.capability}`);
  if (fp.cuda) parts.push(`CUDA ${fp.cuda}`);
  if (fp.cudnn) parts.push(`cuDNN ${fp.cudnn}`);
  const packages = fp.packages && typeof fp.packages === "object" ? Object.entries(fp.packages) : [];
  for (const [name, version] of packages) parts.push(`${name} ${version}`);
  return parts.join(" · ");
}

// The sidebar's words for each saved-decisions file the status route lists.
const SAVED_FILES = {
  tuning: {
    title: "Tuned on this GPU",
    empty: "No decisions saved for this GPU yet: auto_tuned measures each call shape on first use.",
    ignored: "tuning.json.ignored",
    what: "tuning file",
  },
  auto_measured: {
    title: "Timed by auto on this GPU",
    empty: "Nothing timed on this GPU yet: auto times a call shape its cost model cannot decide, once.",
    ignored: "auto_measured.json.ignored",
    what: "measurements file",
  },
};

/**
 * The status route's `tuning` (auto_tuned's file) or, with key "auto_measured", the contested
 * calls `auto` timed, for the sidebar: {key, title, file, exists, note, devices: [{index,
 * label, gpu, summary, details, count, countText, problem, decisions}]}, or null when the
 * server sends none (a pack without it). label names the GPU's index when there
 * are several. The server lists the newest decisions only and counts them all (`count`;
 * a server without it listed every one).
 */
export function tunedOnThisMachine(status, key = "tuning") {
  const tuning = status && status[key];
  const words = SAVED_FILES[key];
  if (!words || !tuning || typeof tuning !== "object") return null;
  const devices = (Array.isArray(tuning.devices) ? tuning.devices : []).filter((d) => d && typeof d === "object");
  return {
    key,
    title: words.title,
    file: tuning.file ? String(tuning.file) : "",
    exists: !!tuning.exists,
    note: devices.length ? "" : "No CUDA GPU is visible: saved decisions are listed per GPU.",
    devices: devices.map((device) => {
      const decisions = (Array.isArray(device.decisions) ? device.decisions : []).map(decisionView);
      const count = isNumber(device.count) ? Math.max(device.count, decisions.length) : decisions.length;
      const listed = count > decisions.length ? ` (the ${decisions.length} newest listed)` : "";
      return {
        index: device.index ?? null,
        label: devices.length > 1 ? `GPU ${device.index}: ` : "",
        gpu: (device.fingerprint && device.fingerprint.gpu) || "unknown GPU",
        summary: fingerprintSummary(device.fingerprint),
        details: fingerprintDetails(device.fingerprint),
        count,
        countText: count
          ? `${plural(count, "saved decision", "saved decisions")}${listed}`
          : words.empty,
        problem: device.ignored_file_problem
          ? `The ${words.what} was ignored: ${device.ignored_file_problem}. ` +
            `Nothing in it is used; it is moved to ${words.ignored} when new decisions are saved.`
          : "",
        decisions,
      };
    }),
  };
}

/** Tooltip lines for a run's tuning: one per decision, with its runner-up. */
export function tuningTooltipLines(summary, limit = 8) {
  if (!summary) return [];
  const lines = [summary.text];
  for (const d of summary.decisions.slice(0, limit)) lines.push(`${d.line} · ${d.runnerUpText}`);
  if (summary.decisions.length > limit) lines.push(`… ${summary.decisions.length - limit} more in the Attention panel`);
  return lines;
}
