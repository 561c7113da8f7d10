// tests/js/ui_playwright.mjs — end-to-end test of d2od's web page (GET /) in headless
// Chromium (Debian's /usr/bin/chromium, driven by playwright-core; no browser download).
//
// Usage: node ui_playwright.mjs BASE_URL API_KEY OUT_DIR
// Run by tests/integration/test_ui.py against a daemon it started. Checks: the page
// loads and, once the API key is entered, shows the model and the pool; a chat reply
// streams (the assistant text is seen growing across several updates before it ends);
// the pool view changes while a compressed request runs (a sequence row appears, used
// pages rise, a compression event with evicted tokens is listed). Writes ui.png (the
// page after the compressed run) into OUT_DIR. Prints one line per check and a closing
// "N passed, N failed" line; exit status 1 on any failure.
import { chromium } from "playwright-core";

const [base, key, outDir] = process.argv.slice(2);
let passed = 0, failed = 0;
function check(name, ok, detail = "") {
  if (ok) { passed++; console.log(`ok   ${name}`); } else { failed++; console.log(`FAIL ${name} ${detail}`); }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1360, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(base)) external.push(r.url()); });

  const resp = await page.goto(base + "/", { waitUntil: "load" });
  check("GET / answers 200 with HTML", resp.status() === 200 && (resp.headers()["content-type"] || "").includes("text/html"));
  // Without the key the status route is refused, and the page says so.
  await page.waitForFunction(() => document.getElementById("poolstat").textContent.includes("401"), null, { timeout: 10000 })
    .then(() => check("without the API key the page reports 401 from /status", true))
    .catch(() => check("without the API key the page reports 401 from /status", false));
  await page.fill("#key", key);
  await page.dispatchEvent("#key", "change");
  await page.waitForFunction(() => document.getElementById("model").textContent !== "…", null, { timeout: 10000 });
  const model = await page.textContent("#model");
  check("with the key the page shows the model and the pool", model.length > 0 && (await page.textContent("#pooltext")).includes("free"), model);

  // ---- chat streams -------------------------------------------------------------------
  await page.selectOption("#mode", "chat");
  await page.fill("#max_tokens", "200");
  await page.fill("#temperature", "0");
  await page.fill("#prompt", "Tell me a story about a cat.");
  // Record the assistant text each time it changes (in the page, so no update is missed).
  await page.evaluate(() => {
    window.__lens = [];
    const obs = new MutationObserver(() => {
      const m = document.querySelectorAll(".msg.assistant span");
      if (m.length) window.__lens.push(m[m.length - 1].textContent.length);
    });
    obs.observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
  });
  // Background load from outside the page (24 long completions) so the engine shares
  // its steps and the chat's tokens cannot all arrive in one read.
  const load = Array.from({ length: 24 }, (_, i) => fetch(base + "/v1/completions", {
    method: "POST", headers: { "Content-Type": "application/json", Authorization: "Bearer " + key },
    body: JSON.stringify({ prompt: "Once upon a time", max_tokens: 400, ignore_eos: true, seed: i }),
  }).then((r) => r.status).catch((e) => String(e)));
  await page.click("#send");
  await page.waitForSelector(".msg.assistant[data-done='1']", { timeout: 60000 });
  const loadStatus = await Promise.all(load);
  check("background completions answered 200", loadStatus.every((s) => s === 200), JSON.stringify(loadStatus));
  const lens = await page.evaluate(() => window.__lens);
  const text = await page.textContent(".msg.assistant span");
  // stories260K decodes thousands of tokens a second, so the browser may read the
  // whole stream in a few reads: the reply must show partial text before the end
  // (five or more distinct lengths) and arrive as many SSE events (one per token).
  const distinct = new Set(lens.filter((n) => n > 0)).size;
  const stat = await page.textContent("#genstat");
  const chunks = Number((stat.match(/(\d+) chunks/) || [0, 0])[1]);
  check("chat reply streamed (partial text shown, then more; many SSE events)",
        distinct >= 5 && chunks >= 10 && text.length > 10,
        `updates=${JSON.stringify(lens.slice(0, 20))} chunks=${chunks} text=${JSON.stringify(text.slice(0, 80))}`);
  console.log(`# chat: ${chunks} SSE events, text seen at ${distinct} lengths`);
  check("generation stats shown (chunks, tokens, finish)", /chunks/.test(stat) && /finish/.test(stat), stat);

  // ---- pool view changes during a compressed request ----------------------------------
  const before = await page.evaluate(() => ({ used: Number(document.getElementById("pool").dataset.used || 0),
                                               events: document.querySelectorAll("#events .event").length }));
  await page.selectOption("#mode", "completion");
  await page.selectOption("#kv_method", "d2o");
  await page.fill("#kv_budget", "0.2");
  await page.fill("#max_tokens", "360");
  await page.fill("#temperature", "0.8");
  await page.fill("#seed", "7");
  const story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. ";
  await page.fill("#prompt", story.repeat(3));
  await page.evaluate(() => {
    window.__seen = { running: 0, used: 0 };
    const tick = () => {
      const run = document.querySelectorAll("#seqs tr.seq.running").length;
      const used = Number(document.getElementById("pool").dataset.used || 0);
      if (run > window.__seen.running) window.__seen.running = run;
      if (used > window.__seen.used) window.__seen.used = used;
      if (!window.__stopTick) requestAnimationFrame(tick);
    };
    tick();
  });
  await page.click("#send");
  await page.waitForFunction(() => document.querySelectorAll("#events .event").length > 0, null, { timeout: 60000 })
    .catch(() => {});
  await page.waitForFunction(() => document.querySelectorAll(".msg[data-done='1']").length >= 2, null, { timeout: 120000 });
  const second = await page.evaluate(() => { const m = document.querySelectorAll(".msg[data-done='1']"); return { cls: m[1].className, text: m[1].textContent }; });
  check("the compressed completion finished without error", second.cls.includes("assistant"), JSON.stringify(second).slice(0, 300));
  await page.waitForTimeout(600); // one more poll after the request ended
  const seen = await page.evaluate(() => { window.__stopTick = true; return window.__seen; });
  const after = await page.evaluate(() => ({
    events: [...document.querySelectorAll("#events .event")].map((e) => e.textContent),
    evicted: Number(document.getElementById("c_evicted").textContent),
    rows: [...document.querySelectorAll("#seqs tr.seq")].map((r) => ({ state: r.dataset.state, kv: r.dataset.kv,
                                                                      pages: JSON.parse(r.dataset.pages) })),
  }));
  // The sequence is listed (running while the page looked, or in the finished list), and its
  // per-layer pages show the compression: D2O keeps layers 0, 1 and the last in full, so a
  // compressed middle layer holds fewer pages than layer 0.
  const d2o = after.rows.find((r) => r.kv === "d2o");
  check("pool view: the compressed sequence is listed with pages per layer", !!d2o && d2o.pages.length >= 3,
        JSON.stringify(after.rows));
  check("pool view: its compressed layers hold fewer pages than the kept ones",
        !!d2o && d2o.pages[2] < d2o.pages[0], JSON.stringify(d2o));
  console.log(`# while it ran: ${seen.running} running row(s) seen, used pages up to ${seen.used} (before: ${before.used})`);
  const ev = after.events.find((t) => /evicted [1-9]/.test(t));
  check("pool view: a compression event with evicted tokens appeared", after.events.length > before.events && !!ev,
        JSON.stringify(after.events.slice(0, 3)));
  check("pool view: the evicted counter is non-zero", after.evicted > 0, String(after.evicted));
  await page.screenshot({ path: `${outDir}/ui.png`, fullPage: true });
  check("no script errors and no request outside the server", errors.length === 0 && external.length === 0,
        JSON.stringify({ errors, external }));
} catch (e) {
  check("ui test ran to the end", false, String(e && e.stack || e));
  try { const pages = browser.contexts().flatMap((c) => c.pages()); if (pages.length) await pages[0].screenshot({ path: `${outDir}/ui-failure.png`, fullPage: true }); } catch {}
} finally {
  await browser.close();
}
console.log(`ui: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
