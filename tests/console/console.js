// The console's browser test, one phase per run (tests/console.rs runs the phases in
// order and checks their outcomes from outside: the enricher's metrics, llm-sim's
// counters, the output topic). playwright-core drives Debian's /usr/bin/chromium.
//
//   node console.js PHASE      PHASE: login | pause | resume | counts | dead-letters | event | anonymous
//
// Environment: CONSOLE_URL, ADMIN_TOKEN, READ_TOKEN, STATE_FILE (the session kept between
// phases), SHOTS (where screenshots go), and per phase EXPECT_IN, EXPECT_PUBLISHED,
// EXPECT_DEAD, EXPECT_WAITING, POISON_KEY, PLAIN_KEY. Prints "timing PAGE MS" lines and "ok PHASE".
"use strict";
const { chromium } = require("playwright-core");
const fs = require("fs");
const path = require("path");

const phase = process.argv[2];
const base = process.env.CONSOLE_URL;
const shots = process.env.SHOTS;
const stateFile = process.env.STATE_FILE;
const TIMEOUT = 60_000;

function need(cond, message) {
  if (!cond) throw new Error(message);
}

async function shot(page, name) {
  fs.mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

// How long the server took for the page now shown (request start to the last byte).
async function timing(page, name) {
  const ms = await page.evaluate(() => {
    const nav = performance.getEntriesByType("navigation")[0];
    return nav ? nav.responseEnd - nav.requestStart : -1;
  });
  console.log(`timing ${name} ${ms.toFixed(1)}`);
}

// The page a phase is on, for the diagnosis of a failure.
let current = null;

async function goto(page, url, name) {
  current = page;
  const response = await page.goto(base + url, { waitUntil: "load" });
  if (name) await timing(page, name);
  return response;
}

async function confirmDialogs(page) {
  page.on("dialog", (d) => d.accept());
}

const phases = {
  async login(browser) {
    const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
    const page = await context.newPage();
    current = page;
    await goto(page, "/ui", null);
    need(page.url().endsWith("/ui/login"), `the overview without a session should go to the login, went to ${page.url()}`);
    await timing(page, "login");
    await shot(page, "login");
    await page.getByLabel("Token").fill("not-the-token-0123456789");
    await page.getByRole("button", { name: "Log in" }).click();
    await page.getByText("That token is not valid.").waitFor();
    await page.getByLabel("Token").fill(process.env.ADMIN_TOKEN);
    await page.getByRole("button", { name: "Log in" }).click();
    await page.waitForURL(base + "/ui");
    await page.getByText("admin", { exact: true }).waitFor();
    // The three stages ready.
    for (const stage of ["ingest-dedup", "enricher", "publisher"]) {
      await page.locator(`tr[data-stage="${stage}"][data-ready="true"]`).waitFor({ timeout: TIMEOUT });
    }
    await context.storageState({ path: stateFile });
  },

  async pause(browser, context, page) {
    await confirmDialogs(page);
    await goto(page, "/ui", "overview");
    await page.getByLabel("Reason").fill("console test: provider incident");
    await page.locator("#kill-switch").click();
    await page.locator('[data-paused="true"]').waitFor({ timeout: TIMEOUT });
    await page.getByText("console test: provider incident").waitFor();
  },

  async resume(browser, context, page) {
    await confirmDialogs(page);
    await goto(page, "/ui", null);
    await page.getByRole("button", { name: "Resume enrichment" }).click();
    await page.locator('[data-paused="false"]').waitFor({ timeout: TIMEOUT });
  },

  async counts(browser, context, page) {
    await goto(page, "/ui", "overview");
    const expect = async (selector, value) => {
      const el = page.locator(selector);
      await page.waitForFunction(
        ([s, v]) => document.querySelector(s)?.textContent.trim() === v,
        [selector, value],
        { timeout: TIMEOUT },
      ).catch(async () => {
        throw new Error(`${selector} should read ${value}, reads ${await el.first().textContent().catch(() => "(missing)")}`);
      });
    };
    await expect('tr[data-stage="ingest-dedup"] [data-count="in"]', process.env.EXPECT_IN);
    await expect('[data-count="published"]', process.env.EXPECT_PUBLISHED);
    await expect('[data-count="dlq-waiting"]', process.env.EXPECT_WAITING);
    for (const stage of ["ingest-dedup", "enricher", "publisher"]) {
      await page.locator(`tr[data-stage="${stage}"][data-ready="true"]`).waitFor({ timeout: TIMEOUT });
    }
    // The budget's window has this run's calls (at least the published ones).
    const calls = Number(await page.locator('tr[data-budget-window="86400"]').getAttribute("data-calls"));
    need(calls >= Number(process.env.EXPECT_PUBLISHED), `the budget window counts the run's calls (${calls})`);
    // The charts have points of this run.
    need((await page.locator("figure.chart polyline").count()) >= 2, "the overview draws its throughput and spend");
    await shot(page, "overview");
  },

  async "dead-letters"(browser, context, page) {
    await confirmDialogs(page);
    const want = Number(process.env.EXPECT_DEAD);
    const rows = (n) => page.waitForFunction((n) => document.querySelectorAll("tr[data-dead-letter]").length === n, n, { timeout: TIMEOUT });
    await goto(page, "/ui/dead-letters", "dead-letters");
    await rows(Number(process.env.EXPECT_WAITING));
    await shot(page, "dead-letters");
    // The one ingest dead-lettered: found by its stage, discarded with a note.
    await page.getByLabel("stage").selectOption("ingest-dedup");
    await page.getByRole("button", { name: "Filter", exact: true }).click();
    await page.waitForURL(/stage=ingest-dedup/);
    await rows(1);
    await page.locator("tr[data-dead-letter] a").first().click();
    await page.locator("[data-payload]").waitFor();
    need((await page.locator("[data-payload]").textContent()).includes("oops"), "the malformed payload is shown");
    await page.getByLabel("Note").fill("console test: not a ticket");
    await page.getByRole("button", { name: "Discard" }).click();
    await page.getByText("discarded", { exact: true }).first().waitFor();
    await goto(page, "/ui/dead-letters", null);
    await rows(want);
    // One dead letter's page: the error, the payload with its marker, the key's history.
    await page.locator("tr[data-dead-letter] a").first().click();
    await page.locator("[data-payload]").waitFor();
    await timing(page, "dead-letter");
    need((await page.locator("[data-payload]").textContent()).includes("[[sim:always-500]]"), "the payload is shown");
    need((await page.locator("[data-error]").textContent()).includes("500"), "the error names the 500");
    need((await page.locator('tr[data-entry="step"][data-step="llm_call"]').count()) >= 2, "both failed calls are in the history");
    await shot(page, "dead-letter");
    // A filter, its dry run, the replay.
    await goto(page, "/ui/dead-letters", null);
    await page.getByLabel("reason").fill("max_attempts");
    await page.getByLabel("stage").selectOption("enricher");
    await page.getByRole("button", { name: "Filter", exact: true }).click();
    await page.waitForURL(/reason=max_attempts/);
    await page.waitForFunction((n) => document.querySelectorAll("tr[data-dead-letter]").length === n, want);
    await page.locator("#dry-run-filter").click();
    const summary = page.locator("[data-dry-run-replayable]");
    await summary.waitFor();
    await timing(page, "dry-run");
    need((await summary.getAttribute("data-dry-run-replayable")) === String(want), `the dry run says ${await summary.textContent()}`);
    need((await summary.textContent()).includes(`${want} matched: ${want} to replay, 0 refused`), await summary.textContent());
    const estimate = (await page.locator("[data-estimate]").textContent()).trim();
    need(/^\$0\.0*[1-9]/.test(estimate), `a priced estimate for ${want} calls: ${estimate}`);
    await page.getByLabel("note (kept in the replay log)").fill("console test: sim fixed");
    await page.getByLabel(/records per second/).fill("20");
    await shot(page, "replay-dry-run");
    await page.locator("#replay").click();
    await page.waitForURL(/\/ui\/jobs\/\d+/);
    await page.locator('[data-job="done"]').waitFor({ timeout: TIMEOUT });
    const done = page.locator('[data-job="done"]');
    need((await done.getAttribute("data-replayed")) === String(want), `replayed: ${await done.textContent()}`);
    need((await done.getAttribute("data-refused")) === "0", `refused: ${await done.textContent()}`);
    await shot(page, "replay-progress");
  },

  async event(browser, context, page) {
    // A plain key: ingest, the enricher, the publisher. The replayed key: ingest, the
    // enricher's failed calls and dead letter, the operator's replay, the enrichment, the
    // publisher. Each found by its idempotency key.
    const check = async (key, wanted, name) => {
      await goto(page, "/ui/events", name === "event" ? "events" : null);
      await page.getByLabel(/idempotency key/).fill(key);
      await page.getByRole("button", { name: "Find" }).click();
      await page.waitForURL(/\/ui\/event\?key=/);
      if (name) await timing(page, name);
      const runs = await page.locator('tr[data-entry="run"]').evaluateAll((rows) =>
        rows.map((r) => `${r.dataset.stage}:${r.dataset.status}`));
      console.log(`runs ${key} ${runs.join(" ")}`);
      let at = -1;
      for (const w of wanted) {
        const i = runs.indexOf(w, at + 1);
        need(i > at, `${key}: ${w} should come after ${wanted.slice(0, wanted.indexOf(w)).join(", ")} in ${runs.join(" ")}`);
        at = i;
      }
      need(runs[0] === wanted[0] && runs[runs.length - 1] === wanted[wanted.length - 1], `${key}: starts and ends as ${wanted}`);
      return runs;
    };
    const plain = ["ingest-dedup:forwarded", "enricher:enriched", "publisher:published"];
    await check(process.env.PLAIN_KEY, plain, "event-plain");
    const eventUrl = page.url();
    // The same event found by its source record and by its trace id.
    const coordinates = (await page.locator('[data-field="source record"]').textContent()).trim();
    const trace = (await page.locator("a[data-trace]").first().textContent()).trim();
    for (const q of [coordinates, trace]) {
      await check(q, plain, null);
      need(page.url() === eventUrl, `${q} found ${page.url()}, not ${eventUrl}`);
    }
    need((await page.locator('tr[data-entry="step"][data-step="llm_call"]').count()) === 1, "one LLM call for a plain key");
    need((await page.locator("[data-result]").textContent()).includes("category"), "the published result is shown");
    await check(
      process.env.POISON_KEY,
      ["ingest-dedup:forwarded", "enricher:dead_lettered", "dlq-replayer:replayed", "enricher:enriched", "publisher:published"],
      "event",
    );
    need((await page.locator('tr[data-entry="step"][data-step="llm_call"]').count()) >= 3, "the failed calls and the paid one");
    need((await page.locator("a[data-trace]").count()) >= 1, "the trace links to the trace viewer");
    await shot(page, "event");
    await goto(page, "/ui/spend", "spend");
    const calls = Number(await page.locator("[data-spend-calls]").textContent());
    need(calls >= Number(process.env.EXPECT_IN), `spend counts the calls (${calls})`);
    await shot(page, "spend");
  },

  async anonymous(browser) {
    // No session: every page goes to the login, every action is refused.
    const context = await browser.newContext();
    const page = await context.newPage();
    const pages = ["/ui", "/ui/dead-letters", "/ui/dead-letters/1", "/ui/jobs/1", "/ui/events?q=x", "/ui/event?key=x", "/ui/spend", "/ui/nope"];
    for (const p of pages) {
      await goto(page, p, null);
      need(page.url() === base + "/ui/login", `${p} without a session showed ${page.url()}`);
    }
    const actions = [
      ["/ui/kill-switch", { action: "pause" }],
      ["/ui/dead-letters/preview", { scope: "filter", reason: "max_attempts" }],
      ["/ui/dead-letters/replay", { preview: "1", rate: "1" }],
      ["/ui/dead-letters/1/discard", { note: "x" }],
    ];
    const refusedAll = async (request, extra, why) => {
      for (const [url, form] of actions) {
        const r = await request.post(base + url, { form: { ...form, ...extra }, maxRedirects: 0 });
        need(r.status() === 403, `${url} ${why}: ${r.status()}`);
      }
    };
    await refusedAll(context.request, {}, "without a session");
    // The read token's session: it looks, and is refused every action even with its form token.
    await goto(page, "/ui/login", null);
    await page.getByLabel("Token").fill(process.env.READ_TOKEN);
    await page.getByRole("button", { name: "Log in" }).click();
    await page.waitForURL(base + "/ui");
    await page.getByText("read only", { exact: true }).waitFor();
    need((await page.locator("#kill-switch").count()) === 0, "no pause button for the read token");
    const csrf = await page.locator('form.logout input[name="csrf"]').getAttribute("value");
    await refusedAll(page.request, { csrf }, "with the read token");
    // The admin token's session, without its form token, or from another origin.
    await goto(page, "/ui/login", null);
    await page.getByLabel("Token").fill(process.env.ADMIN_TOKEN);
    await page.getByRole("button", { name: "Log in" }).click();
    await page.waitForURL(base + "/ui");
    await refusedAll(page.request, {}, "without the form token");
    const adminCsrf = await page.locator('form.logout input[name="csrf"]').getAttribute("value");
    for (const [url, form] of actions) {
      const r = await page.request.post(base + url, {
        form: { ...form, csrf: adminCsrf }, headers: { Origin: "http://evil.example" }, maxRedirects: 0,
      });
      need(r.status() === 403, `${url} from another origin: ${r.status()}`);
    }
    // Logging out ends the session.
    await page.getByRole("button", { name: "Log out" }).click();
    await page.waitForURL(base + "/ui/login");
    await goto(page, "/ui", null);
    need(page.url() === base + "/ui/login", "logged out");
    await context.close();
  },
};

(async () => {
  const run = phases[phase];
  if (!run) {
    console.error(`unknown phase ${phase}; one of ${Object.keys(phases).join(", ")}`);
    process.exit(2);
  }
  const killer = setTimeout(() => { console.error(`phase ${phase} timed out`); process.exit(3); }, 180_000);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
  let status = 0;
  try {
    if (phase === "login" || phase === "anonymous") {
      await run(browser);
    } else {
      const context = await browser.newContext({ storageState: stateFile, viewport: { width: 1360, height: 900 } });
      context.setDefaultTimeout(TIMEOUT);
      const page = await context.newPage();
      await run(browser, context, page);
      await context.storageState({ path: stateFile });
    }
    console.log(`ok ${phase}`);
  } catch (err) {
    console.error(`phase ${phase} failed: ${err && err.stack ? err.stack : err}`);
    if (current) {
      const text = await current.locator("body").innerText().catch(() => "(no body)");
      console.error(`the page was ${current.url()}:\n${text.slice(0, 2000)}`);
    }
    status = 1;
  } finally {
    await browser.close();
    clearTimeout(killer);
  }
  process.exit(status);
})();
