// Pure logic over `auto_tuned`'s decisions (docs/api.md): the run report's `tuning`
// and the status route's `tuning`. No DOM, no ComfyUI imports.
//
// A decision is {signature, backend, reference, tuning_ms, tuned_at, budget, candidates,
// and in a run report source + complete}; candidates are {name: {ms, rel_l1, cosine,
// max_abs, nonfinite, verdict}}.

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
const isNumber = (x) => typeof x === "number" && Number.isFinite(x);

/**
 * The tuner's signature key ("bfloat16|B1|H24|Hkv24|Nq4608|Nk4608|D128|Dv128|mask=none|...")
 * in the words of the report's plans ("B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16"), so the two
 * can be matched by eye; fields at their usual value are left out. Anything else is returned as is.
 */
export function shortSignature(key) {
  const text = String(key ?? "");
  const parts = text.split("|");
  if (parts.length < 8) return text;
  const fields = {};
  for (const part of parts.slice(1)) {
    const eq = part.indexOf("=");
    if (eq > 0) fields[part.slice(0, eq)] = part.slice(eq + 1);
    else {
      const m = /^([A-Za-z]+?)(\d+)$/.exec(part);
      if (m) fields[m[1]] = m[2];
    }
  }
  if (fields.B == null || fields.H == null || fields.Nq == null || fields.D == null) return text;
  const heads = fields.Hkv && fields.Hkv !== fields.H ? `${fields.H}/${fields.Hkv}kv` : fields.H;
  const out = [`B=${fields.B}`, `H=${heads}`, `Nq=${fields.Nq}`, `Nk=${fields.Nk ?? fields.Nq}`, `D=${fields.D}`];
  if (fields.Dv && fields.Dv !== fields.D) out.push(`Dv=${fields.Dv}`);
  out.push(parts[0]);
  if (fields.mask && fields.mask !== "none") out.push(`mask=${fields.mask}`);
  if (fields.prec && fields.prec !== "-") out.push(`precision=${fields.prec}`);
  if (fields.lowp === "0") out.push("low precision refused");
  if (fields.scale === "1") out.push("custom scale");
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

/**
 * A verdict as a short label for a table cell ({label, cls}); the full text goes into the
 * cell's tooltip. The tuner's verdicts: "chosen", "slower: 1.254x the chosen time",
 * "over the error budget: …", "N non-finite values", "not measured: …", "raised …".
 */
export function verdictLabel(verdict) {
  const text = String(verdict ?? "");
  if (text === "chosen") return { label: "chosen", cls: "good" };
  if (text.startsWith("slower")) return { label: "slower", cls: "muted" };
  if (text.startsWith("over the error budget")) return { label: "over budget", cls: "bad" };
  if (/non-finite/.test(text)) return { label: "non-finite", cls: "bad" };
  if (text.startsWith("raised")) return { label: "raised", cls: "bad" };
  if (text.startsWith("not ")) return { label: text.split(":")[0], cls: "muted" };
  return { label: text || "?", cls: "muted" };
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
      verdict: { ...verdictLabel(r.verdict), title: String(r.verdict ?? "") },
    };
  });
  rows.sort((a, b) => (Number(b.chosen) - Number(a.chosen)) ||
    ((a.ms == null) - (b.ms == null)) || ((a.ms ?? 0) - (b.ms ?? 0)) || a.backend.localeCompare(b.backend));
  return rows;
}

/** One decision as the UI shows it. */
export function decisionView(decision) {
  const d = decision || {};
  const short = shortSignature(d.signature);
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
  const decisions = (Array.isArray(tuning.decisions) ? tuning.decisions : []).map(decisionView);
  const measured = isNumber(tuning.measured) ? tuning.measured : decisions.filter((d) => d.source === "measured").length;
  const reused = isNumber(tuning.reused) ? tuning.reused : decisions.filter((d) => d.source === "saved").length;
  const left = Array.isArray(tuning.left_to_auto) ? tuning.left_to_auto.length : 0;
  const partial = decisions.filter((d) => !d.complete).length;
  // A node that samples again with unchanged inputs (ComfyUI reuses its output) keeps its
  // plans, tuned ones included: the tuner is not asked again. The server counts those
  // shapes as `kept` (and lists them with this_run: false); a report without the count
  // is worked out from the plans.
  const tunedPlans = (Array.isArray(plans) ? plans : []).filter((p) => p && p.tuned).length;
  const kept = isNumber(tuning.kept) ? tuning.kept : Math.max(0, tunedPlans - decisions.length);
  const parts = [];
  if (measured) {
    const took = formatSeconds(tuning.tuning_s);
    parts.push(`${plural(measured, "shape", "shapes")} measured${took ? ` in ${took}` : ""}`);
  }
  if (reused) parts.push(parts.length ? `${reused} reused` : `${plural(reused, "shape", "shapes")} reused`);
  if (kept) {
    parts.push(`${parts.length ? kept : plural(kept, "shape", "shapes")} kept from this node's earlier run`);
  }
  if (partial) parts.push(`${partial} partial (not saved)`);
  if (left) parts.push(`${left} left to auto (budget spent)`);
  return {
    text: `auto_tuned: ${parts.length ? parts.join(", ") : "no call shape measured or reused"}`,
    cls: left || partial ? "warn" : "plain",
    decisions,
    left,
    partial,
    kept,
    file: tuning.file ? String(tuning.file) : "",
  };
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

/**
 * The status route's `tuning` for the sidebar: {file, exists, note, devices: [{index,
 * label, gpu, summary, details, count, countText, problem, decisions}]}, or null when the
 * server sends none (a pack without auto_tuned). label names the GPU's index when there
 * are several. The server lists the newest decisions only and counts them all (`count`;
 * a server without it listed every one).
 */
export function tunedOnThisMachine(status) {
  const tuning = status && status.tuning;
  if (!tuning || typeof tuning !== "object") return null;
  const devices = (Array.isArray(tuning.devices) ? tuning.devices : []).filter((d) => d && typeof d === "object");
  return {
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
          : "No decisions saved for this GPU yet: auto_tuned measures each call shape on first use.",
        problem: device.ignored_file_problem
          ? `The tuning file was ignored: ${device.ignored_file_problem}. Nothing in it is used; it is moved to ` +
            "tuning.json.ignored when new decisions are saved."
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
