// Headless Debian Chromium through playwright-core (never downloads a browser).

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

export function chromiumAvailable() {
  return fs.existsSync(CHROMIUM);
}

/** A fresh profile per launch; close() removes it. */
export async function launchBrowser({ width = 1400, height = 900 } = {}) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "ab-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width, height },
    timeout: 60_000,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  context.setDefaultTimeout(30_000);
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    try { await context.close(); } catch (_) { /* already gone */ }
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

/** Problems that come from this pack's code (its files in a stack, or its names in a message). */
export function ourProblems(problems) {
  return problems.filter((p) => /attention_backends\.js|\/lib\/(status|report|nodes|dom|tuning)\.js|AttentionBackends|attention_backends/i.test(p));
}

/** Open ComfyUI and wait until the app, its graph and this extension's status are ready. */
export async function openComfy(context, url, { timeoutMs = 90_000 } = {}) {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (err) => problems.push(`pageerror: ${err.message}\n${(err.stack || "").split("\n").slice(1, 8).join("\n")}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") problems.push(`console: ${msg.text()}`);
  });
  await page.goto(url, { timeout: timeoutMs, waitUntil: "domcontentloaded" });
  await page.waitForFunction(
    () => !!(window.app && window.app.graph && window.LiteGraph && window.__attentionBackends &&
      (window.__attentionBackends.state.status || window.__attentionBackends.state.statusError)),
    null, { timeout: timeoutMs });
  // Close whatever dialog a first start may show (templates, release notes, ...).
  await page.keyboard.press("Escape").catch(() => {});
  return { page, problems };
}
