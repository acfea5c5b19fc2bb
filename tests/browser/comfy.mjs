// Starts and stops a real ComfyUI server with this pack mounted, for the browser tests.
//
// ComfyUI trees and their virtual environments are found at
//   $COMFY_ROOT/<version>  and  $COMFY_ROOT/venv-<version>   (COMFY_ROOT defaults to /work/comfy)
// or per version with COMFYUI_PATH_<version with _ for .> / COMFYUI_PYTHON_<...>.
//
// Every server gets a fresh temporary folder holding: custom_nodes/ with a symlink to the
// repository named with hyphens (as users clone it) and one to the test fixture pack,
// the user, input, output and temp directories, and the extra-model-paths YAML.

import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, "..", "..");
// The pack to mount: this checkout, or AB_PACK_PATH (e.g. an installed copy).
const PACK = path.resolve(process.env.AB_PACK_PATH || REPO);
export const PACK_DIR_NAME = "ComfyUI-Attention-Backends";
const FIXTURES = path.join(REPO, "tests", "comfyui", "fixture_nodes");

export function comfyPaths(version) {
  const key = version.replace(/\./g, "_");
  const root = process.env.COMFY_ROOT || "/work/comfy";
  const tree = process.env[`COMFYUI_PATH_${key}`] || path.join(root, version);
  const python = process.env[`COMFYUI_PYTHON_${key}`] || path.join(root, `venv-${version}`, "bin", "python");
  return { tree, python };
}

export function comfyAvailable(version) {
  const { tree, python } = comfyPaths(version);
  return fs.existsSync(path.join(tree, "main.py")) && fs.existsSync(python);
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Settings for a fresh user: no first-run template browser. */
const USER_SETTINGS = {
  "Comfy.TutorialCompleted": true,
  // 1.27 migrates these on a fresh profile and throws inside its own settings store.
  "Comfy.Canvas.NavigationMode": "legacy",
  "Comfy.Canvas.LeftMouseClickBehavior": "panning",
  "Comfy.Canvas.MouseWheelScroll": "zoom",
};

/**
 * Start ComfyUI `version`; resolves when /object_info lists the Attention Backend node.
 * Returns {url, port, version, log(), stop()}. stop() is safe to call more than once.
 */
export async function startComfy(version, { timeoutMs = 240_000, fixtures = true } = {}) {
  const { tree, python } = comfyPaths(version);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), `ab-comfy-${version}-`));
  const customNodes = path.join(work, "custom_nodes");
  fs.mkdirSync(customNodes);
  fs.symlinkSync(PACK, path.join(customNodes, PACK_DIR_NAME));
  if (fixtures && fs.existsSync(FIXTURES)) {
    fs.symlinkSync(FIXTURES, path.join(customNodes, "attention_backends_test_fixtures"));
  }
  for (const dir of ["user/default", "input", "output", "temp"]) fs.mkdirSync(path.join(work, dir), { recursive: true });
  fs.writeFileSync(path.join(work, "user", "default", "comfy.settings.json"), JSON.stringify(USER_SETTINGS));
  const yaml = path.join(work, "extra_model_paths.yaml");
  fs.writeFileSync(yaml, `attention_backends_browser_tests:\n  custom_nodes: ${customNodes}\n`);

  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const logPath = path.join(work, "server.log");
  const logFd = fs.openSync(logPath, "a");
  const child = spawn(python, [
    "main.py", "--cpu", "--listen", "127.0.0.1", "--port", String(port),
    "--extra-model-paths-config", yaml,
    "--user-directory", path.join(work, "user"),
    "--input-directory", path.join(work, "input"),
    "--output-directory", path.join(work, "output"),
    "--temp-directory", path.join(work, "temp"),
    "--disable-auto-launch",
  ], { cwd: tree, stdio: ["ignore", logFd, logFd], detached: true, env: { ...process.env, PYTHONUNBUFFERED: "1" } });
  fs.closeSync(logFd);
  let exited = null;
  child.on("exit", (code, signal) => { exited = { code, signal }; });

  const log = () => { try { return fs.readFileSync(logPath, "utf8"); } catch (_) { return ""; } };
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    if (exited === null) {
      try { process.kill(-child.pid, "SIGTERM"); } catch (_) { /* already gone */ }
      for (let i = 0; i < 100 && exited === null; i += 1) await sleep(100);
      if (exited === null) {
        try { process.kill(-child.pid, "SIGKILL"); } catch (_) { /* already gone */ }
        for (let i = 0; i < 50 && exited === null; i += 1) await sleep(100);
      }
    }
    if (!process.env.KEEP_COMFY_TMP) fs.rmSync(work, { recursive: true, force: true });
  };

  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      if (exited !== null) throw new Error(`ComfyUI ${version} exited (${JSON.stringify(exited)}):\n${log().slice(-4000)}`);
      if (Date.now() > deadline) throw new Error(`ComfyUI ${version} did not come up in ${timeoutMs} ms:\n${log().slice(-4000)}`);
      try {
        const res = await fetch(`${url}/object_info/AttentionBackend`, { signal: AbortSignal.timeout(5000) });
        if (res.ok) {
          const info = await res.json();
          if (info.AttentionBackend) break;
          throw new Error(`ComfyUI ${version} is up but has no AttentionBackend node:\n${log().slice(-4000)}`);
        }
      } catch (err) {
        if (String(err.message || "").includes("has no AttentionBackend")) throw err;
      }
      await sleep(500);
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return { url, port, version, work, log, stop };
}
