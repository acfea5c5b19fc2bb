// The Advanced node's priority list, read the one way the nodes read it
// (attention.registry.parse_priority): names separated by ">" or ","; spaces around a name
// are dropped, spaces inside one belong to it ("flash4 sdpa" is one unknown name, as the
// node's validation says). tests/js/fixtures/priority_cases.json holds the server's reading
// of sample texts, made by the pack's Python; the tests check this file against it.

export const AUTO = "auto";
export const AUTO_TUNED = "auto_tuned";

/** "flash4 > sage, sdpa" → ["flash4", "sage", "sdpa"]; a list is trimmed the same way. */
export function parsePriority(text) {
  const parts = Array.isArray(text) ? text.map(String) : String(text ?? "").split(/[>,]/);
  return parts.map((s) => s.trim()).filter(Boolean);
}

/**
 * Why the node would refuse this list, or null: {empty: true} when it names nothing,
 * {unknown: [names]} for names that are neither a backend in `backendNames` nor auto/auto_tuned.
 */
export function priorityProblem(text, backendNames) {
  const names = parsePriority(text);
  if (names.length === 0) return { empty: true, unknown: [] };
  const known = new Set([...(backendNames || []), AUTO, AUTO_TUNED]);
  const unknown = names.filter((name) => !known.has(name));
  return unknown.length ? { empty: false, unknown } : null;
}
