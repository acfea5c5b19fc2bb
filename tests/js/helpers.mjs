import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, "..", "..");
export const fixture = (name) => JSON.parse(fs.readFileSync(path.join(here, "fixtures", name), "utf8"));

/**
 * The status route's `tuning` for a saved tuning file ({format, version, machines:
 * [{fingerprint, decisions: {signature: decision}}]}), built the way nodes/tuning.py's
 * tuning_status() does: one machine becomes devices[index], its decisions sorted by
 * signature. fixtures/status_tuning_h200.json was made this way from
 * benchmarks/results/h200/tuning.json (file path made up).
 */
export function statusTuningFromFile(file, { machine = 0, index = 0, shownPath = file } = {}) {
  const saved = JSON.parse(fs.readFileSync(file, "utf8"));
  const m = saved.machines[machine];
  return {
    file: shownPath,
    exists: true,
    listed_at_most: 50,
    devices: [{
      index,
      type: "cuda",
      fingerprint: m.fingerprint,
      ignored_file_problem: null,
      count: Object.keys(m.decisions).length,
      // The server lists the 50 newest; the committed file holds fewer.
      decisions: Object.keys(m.decisions).sort().map((signature) => ({ signature, ...m.decisions[signature] })),
    }],
  };
}
