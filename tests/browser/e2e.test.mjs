// End-to-end tests of web/ in headless Chromium against real ComfyUI servers.
//
//   cd tests/browser && npm ci && node --test --test-concurrency=1 e2e.test.mjs
//
// Versions: AB_COMFY_VERSIONS (default "0.19.3 0.3.64"), one server at a time.
// Screenshots go to AB_SCREENSHOT_DIR (default tests/browser/screenshots/, git-ignored);
// AB_SCREENSHOT_DIR=../../docs/screenshots refreshes the ones the docs use.
//
// The server runs on the CPU, where the status route lists no GPU for auto_tuned; the
// "Tuned on this GPU" section is also checked with the committed H200 decisions
// (tests/js/fixtures/status_tuning_h200.json) put into the page's status.

import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { comfyAvailable, comfyPaths, startComfy } from "./comfy.mjs";
import { chromiumAvailable, launchBrowser, openComfy, ourProblems } from "./browser.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const VERSIONS = (process.env.AB_COMFY_VERSIONS || "0.19.3 0.3.64").split(/[\s,]+/).filter(Boolean);
const SHOTS = path.resolve(here, process.env.AB_SCREENSHOT_DIR || "screenshots");
const RUN_TIMEOUT = 180_000;
const H200_TUNING = JSON.parse(fs.readFileSync(path.join(here, "..", "js", "fixtures", "status_tuning_h200.json"), "utf8"));
// A Wan run in which `auto` timed its one contested call (tests/js_fixtures.py): a CPU
// server never contests a call (no cost model there), so the page is given this report.
const WAN_MEASURED = JSON.parse(fs.readFileSync(path.join(here, "..", "js", "fixtures", "report_auto_measured.json"), "utf8"));

function skipReason(version) {
  if (!chromiumAvailable()) return "no Chromium at /usr/bin/chromium (apt-get install chromium, or set CHROMIUM_PATH)";
  if (!comfyAvailable(version)) return `no ComfyUI ${version} at ${comfyPaths(version).tree}`;
  return false;
}

// ------------------------------------------------------------------ in-page helpers

/** Load an empty workflow (as a user would) and put the view at scale 1 with a fixed offset. */
async function resetGraph(page) {
  await page.evaluate(async () => {
    const app = window.app;
    const view = { scale: 1, offset: [90, 110] }; // clear of the side toolbar and the top bar
    // loadGraphData also resets per-workflow state such as 1.42's missing-model flags,
    // which app.clean() keeps (they would mark the new node with a reused id in red).
    await app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {},
                              extra: { ds: view }, version: 0.4 });
    const ds = app.canvas.ds;
    ds.scale = view.scale;
    ds.offset[0] = view.offset[0];
    ds.offset[1] = view.offset[1];
    app.graph.setDirtyCanvas(true, true);
  });
}

/** Add nodes: specs = [{key, type, pos, widgets}]; returns {key: id}. */
async function addNodes(page, specs) {
  return page.evaluate((specs) => {
    const { app, LiteGraph } = window;
    const ids = {};
    for (const spec of specs) {
      const node = LiteGraph.createNode(spec.type);
      if (!node) throw new Error(`cannot create ${spec.type}`);
      node.pos = spec.pos;
      app.graph.add(node);
      for (const [name, value] of Object.entries(spec.widgets || {})) {
        const w = node.widgets.find((x) => x.name === name);
        if (!w) throw new Error(`${spec.type} has no widget ${name}`);
        w.value = value;
        w.callback?.(value, app.canvas, node);
      }
      ids[spec.key] = node.id;
    }
    app.graph.setDirtyCanvas(true, true);
    return ids;
  }, specs);
}

/** links = [[fromId, outputIndex, toId, inputName]] */
async function connect(page, links) {
  await page.evaluate((links) => {
    const { app } = window;
    for (const [from, output, to, inputName] of links) {
      const source = app.graph.getNodeById(from);
      const target = app.graph.getNodeById(to);
      const slot = target.findInputSlot(inputName);
      if (slot < 0) throw new Error(`node ${to} has no input ${inputName}`);
      if (!source.connect(output, target, slot)) throw new Error(`could not connect ${from}:${output} → ${to}.${inputName}`);
    }
    app.graph.setDirtyCanvas(true, true);
  }, links);
}

async function setWidget(page, id, name, value) {
  await page.evaluate(({ id, name, value }) => {
    const node = window.app.graph.getNodeById(id);
    const w = node.widgets.find((x) => x.name === name);
    w.value = value;
    w.callback?.(value, window.app.canvas, node);
    window.app.graph.setDirtyCanvas(true, true);
  }, { id, name, value });
}

/** The panel element of a node as the page shows it. */
async function panel(page, id) {
  return page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id);
    const p = node && node.__attentionPanel;
    if (!p) return null;
    const el = p.element;
    const rect = el.getBoundingClientRect();
    return {
      kind: el.dataset.kind, selection: el.dataset.selection, report: el.dataset.report,
      text: el.innerText, hint: el.querySelector(".ab-hint code")?.textContent || "",
      visible: el.isConnected && rect.width > 0 && rect.height > 0,
      overflow: el.firstElementChild ? el.firstElementChild.scrollHeight - el.clientHeight : 0,
    };
  }, id);
}

async function waitPanel(page, id, predicate, description, timeout = 15_000) {
  const start = Date.now();
  let last = null;
  while (Date.now() - start < timeout) {
    last = await panel(page, id);
    if (last && predicate(last)) return last;
    await page.waitForTimeout(200);
  }
  throw new Error(`node ${id}: ${description} not reached in ${timeout} ms; last panel: ${JSON.stringify(last)}`);
}

/** The node's panel once its content shows whole: the panel renders at an estimated
 * height and sizes itself to its content on the next animation frame, so a read right
 * after a render can catch that one frame cut off. Fails when it is still cut off after
 * `timeout`. */
async function laidOut(page, id, timeout = 5_000) {
  return waitPanel(page, id, (p) => p.overflow <= 2, "its content shown whole, not cut off", timeout);
}

/** Screenshot of the screen area covering the given nodes (plus a margin). */
async function shotNodes(page, ids, file) {
  await page.waitForTimeout(400); // let the DOM widgets settle on the canvas
  const clip = await page.evaluate((ids) => {
    const { app } = window;
    const canvasRect = app.canvas.canvas.getBoundingClientRect();
    let x0 = Infinity; let y0 = Infinity; let x1 = -Infinity; let y1 = -Infinity;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
    for (const id of ids) {
      const n = app.graph.getNodeById(id);
      const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
      const s = app.canvas.ds.scale;
      x0 = Math.min(x0, x); y0 = Math.min(y0, y);
      x1 = Math.max(x1, x + n.size[0] * s); y1 = Math.max(y1, y + (n.size[1] + title) * s);
    }
    const m = 16;
    return { x: Math.max(0, canvasRect.left + x0 - m), y: Math.max(0, canvasRect.top + y0 - m),
             width: x1 - x0 + 2 * m, height: y1 - y0 + 2 * m };
  }, ids);
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, file), clip });
}

/** Screenshot of one element, scrolled to its top, with a margin (cut at the window's bottom). */
async function shotElement(page, selector, file) {
  await page.evaluate((selector) => document.querySelector(selector).scrollIntoView({ block: "start" }), selector);
  await page.waitForTimeout(300);
  const clip = await page.evaluate((selector) => {
    const r = document.querySelector(selector).getBoundingClientRect();
    const m = 8;
    const top = Math.max(0, r.top - m);
    return { x: Math.max(0, r.left - m), y: top, width: r.width + 2 * m, height: Math.min(window.innerHeight, r.bottom + m) - top };
  }, selector);
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, file), clip });
}

/** Screenshot of the sidebar scrolled to its end (last runs, benchmark). */
async function shotSidebarBottom(page, file) {
  await page.evaluate(() => document.querySelector(".ab-side .ab-charts").scrollIntoView({ block: "end" }));
  await page.waitForTimeout(300);
  const clip = await page.evaluate(() => {
    const r = document.querySelector(".ab-side").parentElement.getBoundingClientRect();
    const top = Math.max(0, r.top);
    return { x: r.left, y: top, width: r.width, height: Math.min(window.innerHeight, r.bottom) - top };
  });
  fs.mkdirSync(SHOTS, { recursive: true });
  if (clip.width > 0 && clip.height > 0) await page.screenshot({ path: path.join(SHOTS, file), clip });
}

/** The Attention sidebar as the page shows it (opened first when closed). */
async function openSidebar(page) {
  if (!(await page.isVisible(".ab-side"))) await page.click(".attention-backends-tab-button", { timeout: 15_000 });
  await page.waitForSelector(".ab-side .ab-list .ab-item", { timeout: 15_000 });
}

async function closeSidebar(page) {
  if (await page.isVisible(".ab-side")) await page.click(".attention-backends-tab-button");
}

/** The "Tuned on this GPU" section: its text and each decision (open or folded, table rows). */
async function tunedSection(page) {
  return page.evaluate(() => {
    const el = document.querySelector(".ab-side .ab-tuned");
    if (!el) return null;
    return {
      text: el.innerText,
      decisions: [...el.querySelectorAll("details.ab-decision")].map((d) => ({
        open: d.open, summary: d.querySelector("summary").innerText,
        rows: [...d.querySelectorAll("tbody tr")].map((tr) => [...tr.cells].map((td) => td.textContent)),
      })),
    };
  });
}

/** Replace the page's status (what GET /attention_backends/status said) and re-render. */
async function injectStatus(page, patch) {
  await page.evaluate((patch) => {
    const ab = window.__attentionBackends;
    ab.state.status = { ...ab.state.status, ...patch };
    ab.refreshEverything();
  }, patch);
}

async function fetchJson(url) {
  const res = await fetch(url, { signal: AbortSignal.timeout(30_000) });
  assert.equal(res.ok, true, `${url}: HTTP ${res.status}`);
  return res.json();
}

// ------------------------------------------------------------------ the tests

for (const version of VERSIONS) {
  describe(`ComfyUI ${version}`, { skip: skipReason(version), timeout: 900_000 }, () => {
    let server;
    let browser;
    let page;
    let problems;
    let status;
    const ids = {};

    before(async () => {
      server = await startComfy(version);
      browser = await launchBrowser();
      ({ page, problems } = await openComfy(browser.context, server.url));
      status = await fetchJson(`${server.url}/attention_backends/status`);
    }, { timeout: 400_000 });

    after(async () => {
      try { if (browser) await browser.close(); } finally { if (server) await server.stop(); }
    }, { timeout: 60_000 });

    it("loads the extension and the machine status", async () => {
      const loaded = await page.evaluate(() => ({
        frontend: window.__COMFYUI_FRONTEND_VERSION__ || null,
        extension: (window.app.extensions || []).some((e) => e.name === "AttentionBackends.Frontend"),
        status: !!window.__attentionBackends.state.status,
        error: window.__attentionBackends.state.statusError,
      }));
      assert.equal(loaded.error, null);
      assert.equal(loaded.status, true);
      assert.equal(loaded.extension, true);
      console.log(`# ComfyUI ${version}: frontend ${loaded.frontend}`);
    });

    it("serves the pack's web folder once", async () => {
      // Both WEB_DIRECTORY (in __init__.py) and `[tool.comfy] web` (in pyproject.toml) register
      // it, under two names; the page then loads every file twice.
      const entries = (await fetchJson(`${server.url}/extensions`)).filter((u) => u.endsWith("/attention_backends.js"));
      assert.equal(entries.length, 1, `served ${entries.length} times: ${entries.join(", ")}`);
    });

    it("a new Attention Backend node shows what its backend does here", async () => {
      await resetGraph(page);
      Object.assign(ids, await addNodes(page, [
        { key: "auto", type: "AttentionBackend", pos: [0, 0] },
        { key: "sage", type: "AttentionBackend", pos: [320, 0], widgets: { backend: "sage" } },
        { key: "adv", type: "AttentionBackendAdvanced", pos: [640, 0], widgets: { priority: "flash4 > sage > sdpa" } },
      ]));
      const typical = status.devices[0].typical.length;
      const auto = await waitPanel(page, ids.auto, (p) => p.kind === "auto", "auto status");
      assert.match(auto.text, new RegExp(`On the CPU: sdpa for all ${typical} typical shapes`));
      assert.match(auto.text, /Last run: none yet/);
      assert.equal(auto.visible, true);
      await laidOut(page, ids.auto);

      const sage = await waitPanel(page, ids.sage, (p) => p.kind === "unavailable", "sage unavailable");
      assert.match(sage.text, /sage ✗ not available here/);
      assert.match(sage.text, /sageattention is not installed/);
      assert.equal(sage.hint, "pip install sageattention");

      // Both nodes carry the `tuning` choice (for auto_tuned) next to the panel, which is never serialised.
      const widgets = await page.evaluate((ids) => Object.fromEntries([ids.auto, ids.adv].map((id) => {
        const node = window.app.graph.getNodeById(id);
        return [id, node.widgets.map((w) => ({ name: w.name, value: w.value, values: w.options?.values ?? null,
                                               serialize: w.serialize !== false }))];
      })), ids);
      for (const id of [ids.auto, ids.adv]) {
        const tuning = widgets[id].find((w) => w.name === "tuning");
        assert.deepEqual(tuning && [tuning.value, tuning.values], ["reuse saved", ["reuse saved", "re-tune"]], JSON.stringify(widgets[id]));
        assert.equal(widgets[id].find((w) => w.name === "attention_status").serialize, false);
      }
      assert.ok(widgets[ids.auto].find((w) => w.name === "backend").values.includes("auto_tuned"));

      const adv = await waitPanel(page, ids.adv, (p) => p.kind === "ok", "advanced priority");
      assert.match(adv.text, /calls go to sdpa first/);
      assert.match(adv.text, /flash4 ✗/);
      await shotNodes(page, [ids.auto, ids.sage, ids.adv], `nodes-before-run-${version}.png`);
    });

    it("the status follows the combo", async () => {
      await setWidget(page, ids.sage, "backend", "sdpa_math");
      let p = await waitPanel(page, ids.sage, (x) => x.kind === "ok", "sdpa_math ok");
      assert.match(p.text, /sdpa_math ✓ available/);
      assert.equal(p.hint, "");
      await setWidget(page, ids.sage, "backend", "sdpa_cudnn");
      p = await waitPanel(page, ids.sage, (x) => x.kind === "unavailable", "sdpa_cudnn unavailable");
      assert.match(p.text, /no CUDA GPU/);
      await setWidget(page, ids.sage, "on_unsupported", "stop");
      p = await waitPanel(page, ids.sage, (x) => /the run will stop/.test(x.text), "stop policy");
      await setWidget(page, ids.sage, "backend", "auto_tuned");
      p = await waitPanel(page, ids.sage, (x) => x.kind === "auto_tuned", "auto_tuned");
      assert.match(p.text, /measured once/);
      await setWidget(page, ids.sage, "tuning", "re-tune");
      await waitPanel(page, ids.sage, (x) => /re-tune: every call shape/.test(x.text), "re-tune");
      await setWidget(page, ids.sage, "tuning", "reuse saved");
      await setWidget(page, ids.sage, "backend", "auto");
      await waitPanel(page, ids.sage, (x) => x.kind === "auto", "back to auto");
      await setWidget(page, ids.adv, "priority", "auto_tuned > sdpa");
      p = await waitPanel(page, ids.adv, (x) => /calls go to auto_tuned first/.test(x.text), "auto_tuned in a priority list");
      assert.match(p.text, /auto_tuned — the backend measured fastest on this GPU/);
      // Spaces separate nothing, for the node's validation as for the panel: one unknown name.
      await setWidget(page, ids.adv, "priority", "flash4 sdpa");
      p = await waitPanel(page, ids.adv, (x) => x.kind === "unknown", "a list the node refuses");
      assert.match(p.text, /the node will refuse this list/);
      assert.match(p.text, /flash4 sdpa ✗ unknown backend name/);
      await setWidget(page, ids.adv, "priority", "flash4 > sage > sdpa");
    });

    it("a run with the tiny Flux model puts the report on the node", { timeout: RUN_TIMEOUT * 2 }, async () => {
      await resetGraph(page);
      const n = await addNodes(page, [
        { key: "model", type: "AttentionBackendsTestTinyFlux", pos: [0, 0] },
        { key: "cond", type: "AttentionBackendsTestFluxConditioning", pos: [0, 150] },
        { key: "latent", type: "EmptySD3LatentImage", pos: [0, 320], widgets: { width: 64, height: 64, batch_size: 1 } },
        { key: "ab", type: "AttentionBackend", pos: [390, 0], widgets: { backend: "auto" } },
        { key: "sampler", type: "KSampler", pos: [710, 0], widgets: { seed: 1, steps: 2, cfg: 1.0 } },
        { key: "save", type: "SaveLatent", pos: [1040, 0] },
      ]);
      await connect(page, [
        [n.model, 0, n.ab, "model"],
        [n.ab, 0, n.sampler, "model"],
        [n.cond, 0, n.sampler, "positive"],
        [n.cond, 1, n.sampler, "negative"],
        [n.latent, 0, n.sampler, "latent_image"],
        [n.sampler, 0, n.save, "samples"],
      ]);
      ids.run = n.ab;
      ids.runGraph = n;
      // The prompt carries the node's inputs, the new `tuning` among them, and not the panel.
      const inputs = await page.evaluate(async (id) => (await window.app.graphToPrompt()).output[id].inputs, n.ab);
      assert.deepEqual(Object.keys(inputs).sort(), ["backend", "model", "on_unsupported", "tuning"]);
      assert.equal(inputs.tuning, "reuse saved");
      await page.evaluate(() => window.app.queuePrompt(0, 1));
      const p = await waitPanel(page, n.ab, (x) => x.report && x.report !== "none", "a run report", RUN_TIMEOUT);
      assert.equal(p.report, "ok", p.text);
      assert.match(p.text, /Last run: \d+ attention calls/);
      assert.match(p.text, /sdpa\s*100%/);
      const stored = await fetchJson(`${server.url}/attention_backends/report?node=${n.ab}`);
      assert.equal(String(stored.node_id), String(n.ab));
      assert.deepEqual(Object.keys(stored.served), ["sdpa"]);
      await shotNodes(page, [n.ab], `node-after-run-${version}.png`);
      await page.screenshot({ path: path.join(SHOTS, `workflow-after-run-${version}.png`) });
    });

    it("a run with a backend that cannot run here reports the fallback and its reason", { timeout: RUN_TIMEOUT * 2 }, async () => {
      await setWidget(page, ids.run, "backend", "sage");
      // The node now says the old report came from another selection.
      await waitPanel(page, ids.run, (x) => /ran with "auto"/.test(x.text), "stale marker");
      await page.evaluate(() => window.app.queuePrompt(0, 1));
      const p = await waitPanel(page, ids.run, (x) => x.report === "warn" && !/ran with "auto"/.test(x.text),
        "a report with a fallback", RUN_TIMEOUT);
      assert.match(p.text, /↪ sage → sdpa ×\d+: .*sageattention is not installed/);
      await shotNodes(page, [ids.run], `node-fallback-${version}.png`);
    });

    it("after a reload the node gets its last report from GET /attention_backends/report", async () => {
      await page.reload({ waitUntil: "domcontentloaded" });
      await page.waitForFunction(() => !!(window.app && window.app.graph && window.__attentionBackends &&
        window.__attentionBackends.state.status), null, { timeout: 90_000 });
      await page.keyboard.press("Escape").catch(() => {});
      await page.waitForFunction((id) => !!window.app.graph.getNodeById(id)?.__attentionPanel, ids.run, { timeout: 20_000 })
        .catch(() => assert.fail("the workflow was not restored after the reload"));
      const p = await waitPanel(page, ids.run, (x) => x.report === "warn", "report restored", 20_000);
      assert.match(p.text, /↪ sage → sdpa/);
    });

    it("the Attention sidebar tab lists every backend", async () => {
      await page.click(".attention-backends-tab-button", { timeout: 15_000 });
      await page.waitForSelector(".ab-side .ab-list .ab-item", { timeout: 15_000 });
      const side = await page.evaluate(() => {
        const root = document.querySelector(".ab-side");
        return {
          items: [...root.querySelectorAll(".ab-item")].map((el) => ({ name: el.dataset.backend, available: el.dataset.available })),
          text: root.innerText,
        };
      });
      assert.deepEqual(side.items.map((i) => i.name).sort(), status.backends.map((b) => b.name).sort());
      for (const b of status.backends) {
        assert.equal(side.items.find((i) => i.name === b.name).available, String(b.available), b.name);
      }
      assert.match(side.text, /auto on this machine/);
      assert.match(side.text, /Last runs/);
      assert.match(side.text, new RegExp(`#${ids.run} sage`));
      fs.mkdirSync(SHOTS, { recursive: true });
      await page.waitForTimeout(300);
      await page.screenshot({ path: path.join(SHOTS, `sidebar-${version}.png`) });
    });

    it("the sidebar shows the committed benchmark chart with its title and a full-size link", async () => {
      const h200 = (status.benchmarks || []).find((b) => b.name === "h200");
      assert.ok(h200 && h200.chart, `status.benchmarks has no h200 chart: ${JSON.stringify(status.benchmarks)}`);
      await page.waitForFunction(() => {
        const img = document.querySelector('.ab-side .ab-chart[data-benchmark="h200"] img');
        return img && img.complete && img.naturalWidth > 0;
      }, null, { timeout: 15_000 });
      const figure = await page.evaluate(() => {
        const el = document.querySelector('.ab-side .ab-chart[data-benchmark="h200"]');
        const img = el.querySelector("img");
        return {
          caption: el.querySelector("figcaption").textContent, src: img.getAttribute("src"), width: img.naturalWidth,
          links: [...el.querySelectorAll("a")].map((a) => ({ href: a.getAttribute("href"), target: a.target, text: a.textContent })),
        };
      });
      assert.equal(figure.caption, h200.title);
      assert.match(figure.src, /\/attention_backends\/benchmarks\/h200\/chart\.png$/);
      assert.ok(figure.width > 100, `the chart is ${figure.width}px wide: not the committed chart`);
      assert.ok(figure.links.length >= 1 && figure.links.every((a) => a.href === figure.src && a.target === "_blank"),
        JSON.stringify(figure.links));
      assert.ok(figure.links.some((a) => /full size/i.test(a.text)), JSON.stringify(figure.links));
      await shotSidebarBottom(page, `sidebar-chart-${version}.png`);
    });

    it("a run in which auto timed a contested call says so on the node and in the sidebar", { timeout: 60_000 }, async () => {
      await closeSidebar(page);
      await setWidget(page, ids.run, "backend", "auto");
      await waitPanel(page, ids.run, (x) => x.kind === "auto", "auto status");
      const saved = await page.evaluate(({ report, id }) => {
        const ab = window.__attentionBackends;
        const before = ab.state.reports.get(String(id));
        ab.state.reports.set(String(id), { ...report, node_id: id });
        ab.refreshEverything();
        return before;
      }, { report: WAN_MEASURED, id: ids.run });
      const p = await waitPanel(page, ids.run, (x) => /auto measured: 1 contested shape measured in 1\.07 s/.test(x.text),
        "auto's measured line");
      assert.match(p.text, /sage_qk_int8_pv_fp8_cuda_sm90 ← B=2 H=12 Nq=32760 Nk=32760 D=128/);
      assert.doesNotMatch(p.text, /auto_tuned:/);
      await laidOut(page, ids.run);
      await shotNodes(page, [ids.run], `node-auto-measured-${version}.png`);
      await openSidebar(page);
      const row = await page.evaluate((id) => {
        const el = document.querySelector(`.ab-side .ab-run[data-node="${id}"]`);
        return el && { text: el.innerText, decisions: el.querySelectorAll("details.ab-decision").length };
      }, ids.run);
      assert.ok(row, "no sidebar row for the run");
      assert.match(row.text, /auto measured: 1 contested shape measured in 1\.07 s/);
      assert.equal(row.decisions, 1);
      // The decision's table says why FA4, measured faster, did not serve: inside the noise floor.
      const verdicts = await page.evaluate((id) => {
        const details = document.querySelector(`.ab-side .ab-run[data-node="${id}"] details.ab-decision`);
        details.open = true;
        const cell = details.querySelector('tr[data-backend="flash4"]');
        const text = cell && cell.innerText;
        details.open = false;
        return text;
      }, ids.run);
      assert.match(verdicts || "", /inside noise/);
      // Closed again (the panel remembers open tables on the toggle event): later tests start with none.
      await page.waitForFunction(() => window.__attentionBackends.state.expanded.size === 0, null, { timeout: 5_000 });
      // What auto has saved on this machine: nothing on a CPU server, so no block; with the
      // H200 decisions put into the page's status as auto_measured.json's, its own block.
      const timedBlock = () => page.evaluate(() => {
        const el = document.querySelector('.ab-side .ab-tuned[data-file="auto_measured"]');
        return el && { text: el.innerText, decisions: el.querySelectorAll("details.ab-decision").length };
      });
      assert.equal(await timedBlock(), null);
      const serverSaid = await page.evaluate(() => window.__attentionBackends.state.status.auto_measured);
      assert.ok(serverSaid && serverSaid.file.endsWith("auto_measured.json"), JSON.stringify(serverSaid));
      await injectStatus(page, { auto_measured: { ...H200_TUNING, file: serverSaid.file } });
      const timed = await timedBlock();
      assert.ok(timed, "no 'Timed by auto on this GPU' block");
      assert.match(timed.text, /Timed by auto on this GPU/);
      assert.match(timed.text, /9 saved decisions/);
      assert.equal(timed.decisions, 9);
      await injectStatus(page, { auto_measured: serverSaid });
      assert.equal(await timedBlock(), null);
      await closeSidebar(page);
      await page.evaluate(({ report, id }) => {
        const ab = window.__attentionBackends;
        if (report) ab.state.reports.set(String(id), report); else ab.state.reports.delete(String(id));
        ab.refreshEverything();
      }, { report: saved, id: ids.run });
    });

    it("a run with auto_tuned shows its tuning on the node and its decisions in the sidebar", { timeout: RUN_TIMEOUT * 3 }, async () => {
      await closeSidebar(page);
      await setWidget(page, ids.run, "backend", "auto_tuned");
      await setWidget(page, ids.run, "on_unsupported", "fall back");
      await waitPanel(page, ids.run, (x) => x.kind === "auto_tuned", "auto_tuned status");
      await page.evaluate(() => window.app.queuePrompt(0, 1));
      let p = await waitPanel(page, ids.run, (x) => /auto_tuned: /.test(x.text) && !/ran with/.test(x.text),
        "a report with the tuning line", RUN_TIMEOUT);
      assert.equal(p.report, "ok", p.text);
      const first = await fetchJson(`${server.url}/attention_backends/report?node=${ids.run}`);
      const tuning = first.tuning;
      assert.ok(tuning && tuning.measured >= 1 && tuning.reused === 0, JSON.stringify(tuning));
      assert.ok(first.plans.every((plan) => plan.tuned === "measured"), JSON.stringify(first.plans));
      const shapes = `${tuning.measured} ${tuning.measured === 1 ? "shape" : "shapes"}`;
      assert.match(p.text, new RegExp(`auto_tuned: ${shapes} measured in \\d+\\.\\d+ s`));
      for (const d of tuning.decisions.slice(0, 3)) {
        assert.ok(p.text.includes(`${d.backend} ← B=`), `no line for ${d.signature} in ${p.text}`);
      }
      assert.match(p.text, /· measured/);
      await laidOut(page, ids.run);
      await shotNodes(page, [ids.run], `node-auto-tuned-${version}.png`);

      // The node runs again with other inputs: a new tuner, which reuses the saved decisions.
      await setWidget(page, ids.run, "on_unsupported", "stop");
      await page.evaluate(() => window.app.queuePrompt(0, 1));
      p = await waitPanel(page, ids.run, (x) => new RegExp(`auto_tuned: ${shapes} reused`).test(x.text),
        "a report reusing the decisions", RUN_TIMEOUT);
      const second = await fetchJson(`${server.url}/attention_backends/report?node=${ids.run}`);
      assert.equal(second.tuning.measured, 0);
      assert.equal(second.tuning.reused, tuning.measured);
      assert.ok(second.plans.every((plan) => plan.tuned === "saved"), JSON.stringify(second.plans));
      assert.match(p.text, /· saved/);

      // The sidebar: the run's decisions, each opening to its candidates table (which stays
      // open when the panel re-renders), and the status route's tuning.
      await openSidebar(page);
      const runRow = `.ab-side .ab-run[data-node="${ids.run}"]`;
      const run = await page.evaluate((sel) => {
        const el = document.querySelector(sel);
        return el && { text: el.innerText, decisions: el.querySelectorAll("details.ab-decision").length };
      }, runRow);
      assert.ok(run, "no sidebar row for the run");
      assert.match(run.text, new RegExp(`auto_tuned: ${shapes} reused`));
      assert.equal(run.decisions, second.tuning.decisions.length);
      await page.click(`${runRow} details.ab-decision summary`);
      // The panel notes an open table on the details' toggle event, which comes after the click.
      await page.waitForFunction(() => window.__attentionBackends.state.expanded.size === 1, null, { timeout: 5_000 });
      await page.evaluate(() => window.__attentionBackends.refreshEverything());
      const table = await page.evaluate((sel) => {
        const d = document.querySelector(`${sel} details.ab-decision`);
        return { open: d.open, rows: [...d.querySelectorAll("tbody tr")].map((tr) => [...tr.cells].map((td) => td.textContent)) };
      }, runRow);
      const decision = second.tuning.decisions[0];
      assert.equal(table.open, true);
      assert.equal(table.rows.length, Object.keys(decision.candidates).length);
      assert.deepEqual([table.rows[0][0], table.rows[0].at(-1)], [decision.backend, "chosen"]);

      const status = await fetchJson(`${server.url}/attention_backends/status`);
      assert.deepEqual(status.nodes.selectable.slice(0, 2), ["auto", "auto_tuned"]);
      assert.equal(status.tuning.exists, true);
      assert.ok(status.tuning.file.startsWith(server.work), status.tuning.file); // the server's user directory
      // --cpu: one CPU row, holding the decisions this run saved
      assert.deepEqual(status.tuning.devices.map((d) => [d.type, d.fingerprint.gpu]), [["cpu", "cpu"]]);
      assert.ok(status.tuning.devices[0].decisions.length > 0);
      await page.evaluate(() => window.__attentionBackends.loadStatus(true)); // the file exists now
      await page.waitForFunction(() => !/not written yet/.test(document.querySelector(".ab-side .ab-tuned").innerText),
        null, { timeout: 15_000 });
      const section = await tunedSection(page);
      assert.match(section.text, /Tuned on this GPU/);
      assert.ok(section.text.includes(status.tuning.file), `${section.text} does not name ${status.tuning.file}`);
      assert.match(section.text, /saved decision/);

      // With a GPU's saved decisions (the committed H200 file as the status route sends it).
      await injectStatus(page, { tuning: H200_TUNING });
      let tuned = await tunedSection(page);
      assert.match(tuned.text, /NVIDIA H200 · driver 580\.159\.04 · torch 2\.11\.0\+cu130/);
      assert.match(tuned.text, /9 saved decisions/);
      assert.equal(tuned.decisions.length, 9);
      assert.match(tuned.decisions[0].summary, /^flash4 ← B=1 H=24 Nq=4608 Nk=4608 D=128 bfloat16 · runner-up sdpa 1\.06×$/);
      await page.click(".ab-side .ab-tuned details.ab-decision summary");
      tuned = await tunedSection(page);
      assert.equal(tuned.decisions[0].open, true);
      assert.equal(tuned.decisions[0].rows.length, 11);
      assert.deepEqual(tuned.decisions[0].rows[0], ["flash4", "0.421", "", "6.2e-4", ">0.999999", "chosen"]);
      assert.deepEqual(tuned.decisions[0].rows[1], ["sdpa", "0.447", "1.06×", "0", "1", "slower"]);
      await shotElement(page, ".ab-side .ab-tuned", `sidebar-tuned-h200-${version}.png`);

      // A damaged file is a warning, in the sidebar and on the node's auto_tuned status.
      const problem = "not JSON (Expecting value: line 1 column 1 (char 0))";
      await injectStatus(page, { tuning: { ...H200_TUNING,
        devices: [{ ...H200_TUNING.devices[0], decisions: [], count: 0, ignored_file_problem: problem }] } });
      tuned = await tunedSection(page);
      assert.ok(tuned.text.includes(`⚠ The tuning file was ignored: ${problem}`), tuned.text);
      assert.match(tuned.text, /No decisions saved for this GPU yet/);
      p = await waitPanel(page, ids.run, (x) => x.text.includes(problem), "the damaged-file warning on the node");
      assert.match(p.text, /On NVIDIA H200: nothing saved yet/);
      await page.evaluate(() => window.__attentionBackends.loadStatus(true));
      await waitPanel(page, ids.run, (x) => !x.text.includes(problem), "the server's status back");
      await closeSidebar(page);
    });

    it("a kernel that raised is listed in the sidebar and its Clear button makes the server forget it", { timeout: RUN_TIMEOUT * 2 }, async () => {
      await closeSidebar(page);
      await resetGraph(page);
      // The fixture pack's FaultyKernel makes sdpa_math raise on its first call of the run.
      const n = await addNodes(page, [
        { key: "model", type: "AttentionBackendsTestTinyFlux", pos: [0, 0] },
        { key: "fault", type: "AttentionBackendsTestFaultyKernel", pos: [0, 150],
          widgets: { backend: "sdpa_math", fault: "raise", on_call: 1, token: 1 } },
        { key: "cond", type: "AttentionBackendsTestFluxConditioning", pos: [0, 420] },
        { key: "latent", type: "EmptySD3LatentImage", pos: [0, 590], widgets: { width: 64, height: 64, batch_size: 1 } },
        { key: "ab", type: "AttentionBackend", pos: [390, 0], widgets: { backend: "sdpa_math" } },
        { key: "sampler", type: "KSampler", pos: [710, 0], widgets: { seed: 11, steps: 2, cfg: 1.0 } },
        { key: "save", type: "SaveLatent", pos: [1040, 0] },
      ]);
      await connect(page, [
        [n.model, 0, n.fault, "model"],
        [n.fault, 0, n.ab, "model"],
        [n.ab, 0, n.sampler, "model"],
        [n.cond, 0, n.sampler, "positive"],
        [n.cond, 1, n.sampler, "negative"],
        [n.latent, 0, n.sampler, "latent_image"],
        [n.sampler, 0, n.save, "samples"],
      ]);
      await page.evaluate(() => window.app.queuePrompt(0, 1));
      const p = await waitPanel(page, n.ab, (x) => x.report === "warn", "a report with the fallback", RUN_TIMEOUT);
      assert.match(p.text, /↪ sdpa_math → sdpa ×\d+: raised RuntimeError: injected fault on call 1/);

      // The report of a run whose kernel raised reloads the status: no Refresh needed.
      await openSidebar(page);
      const failure = '.ab-side .ab-failure[data-backend="sdpa_math"]';
      await page.waitForSelector(failure, { timeout: 15_000 });
      const listed = await page.evaluate((sel) => ({
        text: document.querySelector(sel).innerText,
        title: document.querySelector(".ab-side .ab-failures .ab-title").textContent,
      }), failure);
      assert.equal(listed.title, "Kernel failures (1)");
      assert.match(listed.text, /raised RuntimeError: injected fault on call 1/);
      assert.match(listed.text, /tried again at the next run \(1 failure of 3\)/);
      const before = await fetchJson(`${server.url}/attention_backends/status`);
      assert.deepEqual(before.kernel_failures.failures.map((f) => f.backend), ["sdpa_math"]);
      await shotElement(page, ".ab-side .ab-failures", `sidebar-kernel-failures-${version}.png`);

      await page.click(".ab-side .ab-clear-failures");
      await page.waitForFunction(() => document.querySelector(".ab-side .ab-failures")?.dataset.count === "0",
        null, { timeout: 15_000 });
      const cleared = await page.evaluate(() => ({
        text: document.querySelector(".ab-side .ab-failures").innerText,
        button: !!document.querySelector(".ab-side .ab-clear-failures"),
        error: window.__attentionBackends.state.clearError,
      }));
      assert.deepEqual([cleared.button, cleared.error], [false, null]);
      assert.match(cleared.text, /No kernel has raised/);
      const after = await fetchJson(`${server.url}/attention_backends/status`);
      assert.deepEqual(after.kernel_failures.failures, []);
      await closeSidebar(page);
    });

    it("in the Nodes 2.0 (Vue) node design the panel renders inside the node", async (t) => {
      const { has, frontend } = await page.evaluate(() => {
        const setting = window.app.extensionManager?.setting;
        return { has: !!(setting && setting.get && setting.get("Comfy.VueNodes.Enabled") !== undefined),
                 frontend: window.__COMFYUI_FRONTEND_VERSION__ || "0.0.0" };
      });
      if (!has) { t.skip("this frontend has no Nodes 2.0 setting"); return; }
      // Nodes 2.0 arrived as an experiment in 1.27 (it cannot even switch workflows there).
      const [major, minor] = frontend.split(".").map(Number);
      if (major === 1 && minor < 35) { t.skip(`Nodes 2.0 is an early experiment in frontend ${frontend}`); return; }
      if (await page.isVisible(".ab-side")) await page.click(".attention-backends-tab-button"); // close the sidebar
      await page.evaluate(() => window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", true));
      try {
        await resetGraph(page);
        const n = await addNodes(page, [
          { key: "auto", type: "AttentionBackend", pos: [0, 0] },
          { key: "sage", type: "AttentionBackend", pos: [330, 0], widgets: { backend: "sage" } },
        ]);
        const sage = await waitPanel(page, n.sage, (x) => x.kind === "unavailable" && x.visible, "sage panel in a Vue node");
        assert.equal(sage.hint, "pip install sageattention");
        const inside = await page.evaluate((id) => {
          const el = window.app.graph.getNodeById(id).__attentionPanel.element;
          return !!el.closest(".lg-node-widgets, .lg-node, [data-node-id]");
        }, n.sage);
        assert.equal(inside, true, "the panel is not inside the Vue node");
        await shotNodes(page, [n.auto, n.sage], `nodes-vue-${version}.png`);
      } finally {
        await page.evaluate(() => window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", false));
      }
    });

    it("raised no page errors from this pack", () => {
      const others = problems.filter((p) => !ourProblems([p]).length && !/Failed to load resource/.test(p));
      for (const p of others) console.log(`# (not this pack) ${p.split("\n")[0]}`);
      assert.deepEqual(ourProblems(problems), []);
    });
  });
}
