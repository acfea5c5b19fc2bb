// The nodes' priority list, read the one way the server reads it
// (attention/priority_list.py): names separated by ">" or ","; spaces around a name are
// dropped, spaces inside one belong to it ("flash4 sdpa" is one unknown name, as the
// node's validation says). Each name is an entry of a kind: one of the two selection
// strategies, "auto" and "auto_tuned", or "backend". tests/js/fixtures/priority_cases.json
// holds the server's reading of sample texts, made by the pack's Python; the tests check
// this file against it.

export const AUTO = "auto";
export const AUTO_TUNED = "auto_tuned";
/** The kind of an entry that names a backend. */
export const BACKEND = "backend";

const STRATEGIES = new Set([AUTO, AUTO_TUNED]);

/** "flash4 > sage, sdpa" → ["flash4", "sage", "sdpa"]; a list is trimmed the same way. */
export function parsePriority(text) {
  const parts = Array.isArray(text) ? text.map(String) : String(text ?? "").split(/[>,]/);
  return parts.map((s) => s.trim()).filter(Boolean);
}

/** One name of a list as its entry: {kind: "auto" | "auto_tuned" | "backend", name}. */
export function priorityEntry(name) {
  return { kind: STRATEGIES.has(name) ? name : BACKEND, name };
}

/**
 * The list as the node reads it: {entries: [{kind, name}], usesTuner, empty, unknown}.
 * unknown: the backend entries not in `backendNames`; with `empty` or `unknown` the node
 * refuses the list.
 */
export function readPriority(text, backendNames) {
  const entries = parsePriority(text).map(priorityEntry);
  const known = new Set(backendNames || []);
  return {
    entries,
    usesTuner: entries.some((entry) => entry.kind === AUTO_TUNED),
    empty: entries.length === 0,
    unknown: entries.filter((entry) => entry.kind === BACKEND && !known.has(entry.name)).map((entry) => entry.name),
  };
}

/**
 * Why the node would refuse this list, or null: {empty: true} when it names nothing,
 * {unknown: [names]} for names that are neither a backend in `backendNames` nor a strategy.
 */
export function priorityProblem(text, backendNames) {
  const { empty, unknown } = readPriority(text, backendNames);
  if (empty) return { empty: true, unknown: [] };
  return unknown.length ? { empty: false, unknown } : null;
}
