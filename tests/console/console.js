// The console's browser test, one phase per run (tests/console.rs runs the phases in
// order and checks their outcomes from outside: the enricher's metrics, llm-sim's
// counters, the output topic). playwright-core drives Debian's /usr/bin/chromium.
//
//   node console.js PHASE      PHASE: login | pause | resume | counts | keyboard | dead-letters | event | audit | anonymous
//
// Environment: CONSOLE_URL, ADMIN_TOKEN, READ_TOKEN, STATE_FILE (the session kept between
// phases), SHOTS (where screenshots go), and per phase EXPECT_IN, EXPECT_PUBLISHED,
// EXPECT_DEAD, EXPECT_WAITING, POISON_KEY, PLAIN_KEY. Prints "timing PAGE MS" lines,
// "a11y PAGE ..." lines and "ok PHASE".
//
// Accessibility: every page a phase shows is audited with axe-core (WCAG 2.0/2.1/2.2 A and
// AA rules and axe's best practices); a violation of impact serious or critical, or of a
// landmark rule of any impact, fails the phase, as does a page wider than the 1366 × 768
// viewport (document.scrollWidth > innerWidth). The keyboard phase logs in, reaches the
// kill switch and submits the dead-letter filter with Tab and Enter only.
// `node console.js audit` (CONSOLE_URL, ADMIN_TOKEN) audits every page of any console.
"use strict";
const { chromium } = require("playwright-core");
const fs = require("fs");
const path = require("path");

// A laptop's screen.
const VIEWPORT = { width: 1366, height: 768 };
const AXE = fs.readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"];
// Failed at any impact: the page's landmarks and its way past the navigation.
const LANDMARK_RULES = new Set([
  "bypass", "region", "landmark-one-main", "landmark-no-duplicate-main", "landmark-unique",
  "landmark-banner-is-top-level", "landmark-main-is-top-level", "landmark-no-duplicate-banner",
  "page-has-heading-one", "skip-link",
]);
// The failures of the phase's pages, reported together at its end.
const a11yFailures = [];

const phase = process.argv[2];
const base = process.env.CONSOLE_URL;
const shots = process.env.SHOTS;
const stateFile = process.env.STATE_FILE;
const TIMEOUT = 60_000;

function need(cond, message) {
  if (!cond) throw new Error(message);
}

async function shot(page, name) {
  await audit(page, name);
  fs.mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

// axe-core on the page now shown (evaluated through the DevTools protocol, which the
// page's Content-Security-Policy does not restrict), and its width against the viewport's.
async function audit(page, name) {
  if (!(await page.evaluate(() => typeof window.axe === "object"))) await page.evaluate(AXE);
  const violations = await page.evaluate(async (tags) => {
    const r = await window.axe.run(document, { runOnly: { type: "tag", values: tags }, resultTypes: ["violations"] });
    return r.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.map((n) => `${n.target.join(" ")}${n.any.concat(n.all, n.none).map((c) => `: ${c.message}`).slice(0, 1).join("")}`),
    }));
  }, AXE_TAGS);
  const width = await page.evaluate(() => ({ scroll: document.documentElement.scrollWidth, inner: window.innerWidth }));
  const failing = violations.filter((v) => v.impact === "serious" || v.impact === "critical" || LANDMARK_RULES.has(v.id));
  for (const v of violations) {
    const verdict = failing.includes(v) ? "FAIL" : "note";
    console.log(`a11y ${name} ${verdict} ${v.impact} ${v.id} (${v.help}): ${v.nodes.length} node(s)`);
    for (const n of v.nodes.slice(0, 5)) console.log(`a11y ${name}      ${n}`);
  }
  if (width.scroll > width.inner) console.log(`a11y ${name} FAIL overflow: ${width.scroll} px wide in a ${width.inner} px window`);
  if (failing.length === 0 && width.scroll <= width.inner) console.log(`a11y ${name} ok (${violations.length} minor or moderate)`);
  for (const v of failing) a11yFailures.push(`${name}: ${v.impact} ${v.id} on ${v.nodes.length} node(s)`);
  if (width.scroll > width.inner) a11yFailures.push(`${name}: ${width.scroll} px wide in a ${width.inner} px window`);
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
    const context = await browser.newContext({ viewport: VIEWPORT });
    const page = await context.newPage();
    current = page;
    await goto(page, "/ui", null);
    need(page.url().endsWith("/ui/login"), `the overview without a session should go to the login, went to ${page.url()}`);
    await timing(page, "login");
    await shot(page, "login");
    await page.getByLabel("Token").fill("not-the-token-0123456789");
    await page.getByRole("button", { name: "Log in" }).click();
    await page.getByText("That token is not valid.").waitFor();
    await audit(page, "login-refused");
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

  // With the keyboard only: log in, pass the navigation by the skip link, reach the kill
  // switch (not pressing it), go to the dead letters and submit their filter; every stop
  // on the way shows where the focus is.
  async keyboard(browser) {
    const context = await browser.newContext({ viewport: VIEWPORT });
    context.setDefaultTimeout(TIMEOUT);
    const page = await context.newPage();
    await goto(page, "/ui/login", null);
    const focus = () => page.evaluate(() => {
      const el = document.activeElement;
      if (!el || el === document.body) return null;
      const style = getComputedStyle(el);
      const box = el.getBoundingClientRect();
      // The indicator's contrast with what is around it (WCAG 1.4.11: at least 3:1): the
      // outline's colour against the first opaque background behind the element.
      const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
      const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
        .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
      let behind = el.parentElement;
      while (behind && (rgb(getComputedStyle(behind).backgroundColor)[3] === 0 || getComputedStyle(behind).backgroundColor === "transparent")) behind = behind.parentElement;
      const back = rgb(behind ? getComputedStyle(behind).backgroundColor : "rgb(255, 255, 255)");
      const [a, b] = [lum(rgb(style.outlineColor)), lum(back)];
      return {
        tag: el.tagName.toLowerCase(), id: el.id, name: el.getAttribute("name") || "", text: (el.textContent || el.value || "").trim().slice(0, 40),
        visible: el.matches(":focus-visible"),
        outline: style.outlineStyle !== "none" && parseFloat(style.outlineWidth) >= 2 ? `${style.outlineWidth} ${style.outlineStyle} ${style.outlineColor}` : "",
        shadow: style.boxShadow !== "none" ? style.boxShadow : "",
        raw: `outline ${style.outlineStyle} ${style.outlineWidth} ${style.outlineColor}, box-shadow ${style.boxShadow}, :focus ${el.matches(":focus")} :focus-within ${el.matches(":focus-within")} :focus-visible ${el.matches(":focus-visible")}, the page has the focus: ${document.hasFocus()}, value '${el.value}'`,
        contrast: (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05),
        onScreen: box.width > 0 && box.height > 0 && box.right > 0 && box.bottom > 0 && box.left < innerWidth && box.top < innerHeight,
      };
    });
    const describe = (f) => (f ? `${f.tag}${f.id ? "#" + f.id : ""} "${f.text}"` : "nothing");
    // Focus indicators under 3:1 against their background, and the other problems found on
    // the way, reported together at the end.
    const weak = [];
    const problems = [];
    // Tab (or Shift+Tab) until `wanted` has the focus; each stop must show an indicator.
    const tabTo = async (wanted, what, key = "Tab") => {
      const seen = [];
      for (let i = 0; i < 60; i++) {
        await page.keyboard.press(key);
        const f = await focus();
        seen.push(describe(f));
        if (f) {
          need(f.outline || f.shadow, `the focus on ${describe(f)} is not visible (${f.raw})`);
          need(f.onScreen, `the focused ${describe(f)} is off the screen`);
          if (f.outline && f.contrast < 3) weak.push(`${describe(f)}: ${f.outline}, ${f.contrast.toFixed(2)}:1 against its background`);
        }
        if (f && wanted(f)) {
          console.log(`keyboard ${what}: ${seen.length} ${key} press(es), focus ${describe(f)} shown by ${f.outline || f.shadow} (${f.contrast.toFixed(1)}:1)`);
          return f;
        }
      }
      throw new Error(`${what} not reached by ${key}; the focus went ${seen.join(" → ")}`);
    };
    // The token field has the focus when the login opens (autofocus).
    const start = await focus();
    need(start && start.id === "token", `the login page opens with the focus on the token field, not ${describe(start)}`);
    await page.keyboard.type(process.env.ADMIN_TOKEN);
    await page.keyboard.press("Enter");
    await page.waitForURL(base + "/ui");
    await timing(page, "overview-keyboard");
    // The first stop is the skip link, shown on the screen; it leads into <main>.
    const skip = await tabTo((f) => f.tag === "a", "the skip link");
    need(skip.text === "Skip to content", `the first stop is the skip link, not ${describe(skip)}`);
    await page.keyboard.press("Enter");
    const button = await tabTo((f) => f.id === "kill-switch", "the kill switch");
    need(button.text === "Pause enrichment", `the kill switch reads ${button.text}`);
    // The overview refreshes itself: the focus stays where the keyboard put it.
    const refreshed = await page.evaluate(() => document.querySelector("main").dataset.refreshedAt || "");
    await page.waitForTimeout(7_000);
    const after = await focus();
    const again = await page.evaluate(() => document.querySelector("main").dataset.refreshedAt || "");
    console.log(`keyboard after 7 s on the overview (refreshed ${again !== refreshed ? "meanwhile" : "not"}): focus on ${describe(after)}`);
    if (!(after && after.id === "kill-switch")) problems.push(`the focus did not stay on the kill switch while the overview refreshed: it went to ${describe(after)}`);
    // What a screen reader hears of the refresh: not the whole overview every 3 s, but a
    // status line that says what changed.
    const live = await page.evaluate(() => ({
      main: document.querySelector("main").getAttribute("aria-live"),
      status: [...document.querySelectorAll('[role="status"], [aria-live]')].filter((el) => !document.querySelector("main").contains(el)).length,
    }));
    if (!(live.main === null || live.main === "off")) problems.push(`the overview's <main> is a live region (aria-live="${live.main}"): a screen reader reads all of it at every refresh`);
    if (live.status < 1) problems.push("the overview has no status line outside the refreshed region to say what changed");
    // Back up to the navigation, and on to the dead letters.
    await tabTo((f) => f.tag === "a" && f.text === "Dead letters", "the navigation's dead letters", "Shift+Tab");
    await page.keyboard.press("Enter");
    await page.waitForURL(base + "/ui/dead-letters");
    await tabTo((f) => f.id === "f-stage", "the filter's stage");
    // A closed <select> takes an option from its first letter ("i": ingest-dedup).
    await page.keyboard.press("i");
    await tabTo((f) => f.id === "f-text", "the filter's text");
    await page.keyboard.type("json");
    await tabTo((f) => f.tag === "button" && f.text === "Filter", "the filter's button");
    await page.keyboard.press("Enter");
    await page.waitForURL(/\/ui\/dead-letters\?.*stage=ingest-dedup.*text=json/);
    const rows = await page.locator("tr[data-dead-letter]").count();
    need(rows >= 1, `the filter submitted from the keyboard shows the ingest's dead letters (${rows})`);
    console.log(`keyboard filter submitted: ${page.url().slice(base.length)}, ${rows} row(s)`);
    await audit(page, "dead-letters-filtered");
    for (const w of new Set(weak)) problems.push(`focus indicator under 3:1 (WCAG 1.4.11): ${w}`);
    need(problems.length === 0, `keyboard: ${problems.length} problem(s):\n  ${problems.join("\n  ")}`);
    await context.close();
  },

  // Every page, for the audit: the login, then as the admin the overview, the dead letters
  // (waiting, replayed, filtered), one dead letter, a dry run, the event search, one event,
  // spend, a replay's progress when there is one, and a page that does not exist.
  async audit(browser) {
    const context = await browser.newContext({ viewport: VIEWPORT });
    context.setDefaultTimeout(TIMEOUT);
    const page = await context.newPage();
    await goto(page, "/ui/login", null);
    await audit(page, "login");
    await page.getByLabel("Token").fill(process.env.ADMIN_TOKEN);
    await page.getByRole("button", { name: "Log in" }).click();
    await page.waitForURL(base + "/ui");
    await audit(page, "overview");
    // After a refresh in place.
    await page.waitForFunction(() => document.querySelector("main").dataset.refreshedAt, null, { timeout: TIMEOUT });
    await audit(page, "overview-refreshed");
    for (const [url, name] of [
      ["/ui/dead-letters", "dead-letters"],
      ["/ui/dead-letters?status=replayed", "dead-letters-replayed"],
      ["/ui/dead-letters?status=dead&stage=ingest-dedup&text=bad", "dead-letters-filtered"],
      ["/ui/events", "events"],
      ["/ui/events?q=nothing-is-known-of-this", "events-none"],
      ["/ui/spend", "spend"],
      ["/ui/no-such-page", "not-found"],
    ]) {
      await goto(page, url, null);
      await audit(page, name);
    }
    await goto(page, "/ui/dead-letters?status=replayed", null);
    const replayed = await page.locator("tr[data-dead-letter] a").count();
    await goto(page, "/ui/dead-letters", null);
    if ((await page.locator("tr[data-dead-letter] a").count()) > 0) {
      await page.locator("tr[data-dead-letter] a").first().click();
      await page.locator("[data-error]").waitFor();
      await audit(page, "dead-letter");
      await page.getByRole("button", { name: "Dry run a replay" }).click();
      await page.locator("[data-dry-run-replayable]").waitFor();
      await audit(page, "dry-run");
      await goto(page, "/ui/dead-letters", null);
      await page.locator("tr[data-dead-letter] a[href^='/ui/event']").first().click();
      await page.waitForURL(/\/ui\/event\?key=/);
      await audit(page, "event");
    }
    if (replayed > 0) {
      await goto(page, "/ui/dead-letters?status=replayed", null);
      await page.locator("tr[data-dead-letter] a").first().click();
      await page.locator("[data-error]").waitFor();
      await audit(page, "dead-letter-replayed");
    }
    // The read token's view.
    if (process.env.READ_TOKEN) {
      await goto(page, "/ui/login", null);
      await page.getByLabel("Token").fill(process.env.READ_TOKEN);
      await page.getByRole("button", { name: "Log in" }).click();
      await page.waitForURL(base + "/ui");
      await audit(page, "overview-read-only");
    }
    await context.close();
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
    if (phase === "login" || phase === "anonymous" || phase === "keyboard" || phase === "audit") {
      await run(browser);
    } else {
      const context = await browser.newContext({ storageState: stateFile, viewport: VIEWPORT });
      context.setDefaultTimeout(TIMEOUT);
      const page = await context.newPage();
      await run(browser, context, page);
      await context.storageState({ path: stateFile });
    }
    need(a11yFailures.length === 0, `accessibility: ${a11yFailures.length} failure(s):\n  ${a11yFailures.join("\n  ")}`);
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
