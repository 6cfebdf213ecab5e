// Bulkhead's browser journeys: real user paths through the analysts' UI in headless
// Debian chromium, driven by playwright-core. Run by learner/tests/browser.rs against a
// learner it starts and seeds; by hand:
//
//   eval "$(cargo xtask browser-setup)"
//   BULKHEAD_BASE_URL=http://127.0.0.1:8080 BULKHEAD_USERNAME=admin \
//   BULKHEAD_PASSWORD=<one-time password> BULKHEAD_ARTIFACTS=/tmp/shots \
//   node ui/tests/browser/journeys.mjs
//
// Environment:
//   BULKHEAD_BROWSER_DIR   directory whose node_modules holds playwright-core (xtask)
//   BULKHEAD_CHROMIUM      chromium binary (Debian's /usr/bin/chromium)
//   BULKHEAD_BASE_URL      the learner's UI, e.g. http://127.0.0.1:41234
//   BULKHEAD_USERNAME      an admin created with a one-time password
//   BULKHEAD_PASSWORD      that one-time password
//   BULKHEAD_NEW_PASSWORD  the password the first journey sets (default: generated)
//   BULKHEAD_ARTIFACTS     where screenshots (NN-journey-step.png) and report.json go
//   BULKHEAD_JOURNEYS      optional comma-separated journey names to run (default: all)
//   BULKHEAD_TIMEOUT_MS    overall time limit (default 120000); exit status 124 past it
//
// Adding a journey: write `async function myJourney(t) { … }` using `t.step(name, fn)`
// for each user-visible step and append `journey("my-journey", myJourney)` at the
// bottom. Journeys run in order, each in a fresh browser context (no cookies);
// `await t.login()` logs in with the current password (and replaces a one-time one
// if no earlier journey did). After every step the harness fails the step on any console
// error, uncaught page error, CSP violation, failed same-origin request or answer
// >= 400, and takes a full-page screenshot.
//
// Exit status: 0 when every journey passed, 1 when one failed, 2 on bad
// configuration, 124 on the overall timeout.

import { createRequire } from "node:module";
import { randomBytes } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

// === configuration ===

function env(name, fallback) {
  const v = process.env[name];
  if (v !== undefined && v !== "") return v;
  if (fallback !== undefined) return fallback;
  console.error(`journeys: ${name} is not set (see the top of ui/tests/browser/journeys.mjs)`);
  process.exit(2);
}

const config = {
  browserDir: env("BULKHEAD_BROWSER_DIR"),
  chromium: env("BULKHEAD_CHROMIUM"),
  base: env("BULKHEAD_BASE_URL").replace(/\/+$/, ""),
  username: env("BULKHEAD_USERNAME"),
  artifacts: env("BULKHEAD_ARTIFACTS"),
  only: env("BULKHEAD_JOURNEYS", "").split(",").map((s) => s.trim()).filter(Boolean),
  timeoutMs: Number(env("BULKHEAD_TIMEOUT_MS", "120000")),
  // Per action (click, fill, navigation).
  actionTimeoutMs: 15000,
};

// Credentials shared by the journeys: the first replaces the one-time password.
const credentials = {
  password: env("BULKHEAD_PASSWORD"),
  oneTime: true,
  next: env("BULKHEAD_NEW_PASSWORD", `journey passphrase ${randomBytes(6).toString("hex")}`),
};

// playwright-core lives outside the repository (xtask installs it into a cache
// directory); ES module imports ignore NODE_PATH, so resolve it from there explicitly.
const require = createRequire(join(config.browserDir, "package.json"));
const { chromium } = require("playwright-core");

// === harness ===

// Problems that are known, tracked and not the page's own doing; each is logged once
// per journey instead of failing it. Remove an entry when it is fixed.
const KNOWN_ISSUES = [];

const journeys = [];

/** Registers a journey: `fn(t)` gets a {@link Journey}. */
function journey(name, fn) {
  journeys.push({ name, fn });
}

class StepFailure extends Error {}

let shotCounter = 0;
const report = { base: config.base, journeys: [] };

function slug(s) {
  return s.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 60) || "step";
}

function log(msg) {
  console.log(msg);
}

/** One journey's browser context and helpers. */
class Journey {
  constructor(name, context, page) {
    this.name = name;
    this.context = context;
    this.page = page;
    this.problems = [];
    // Main-frame URLs that may answer 501 (pages not built yet).
    this.placeholders = new Set();
    this.steps = [];
    this.knownSeen = new Set();
    this.watch(page);
  }

  url(path) {
    return new URL(path, config.base + "/").toString();
  }

  /** The current page's path (no query). */
  path() {
    return new URL(this.page.url()).pathname;
  }

  log(msg) {
    log(`  [${this.name}] ${msg}`);
  }

  /** Records everything that makes a step fail. */
  watch(page) {
    const origin = new URL(config.base).origin;
    page.on("console", (msg) => {
      if (msg.type() !== "error") return;
      const where = msg.location()?.url ?? "";
      const text = msg.text();
      if (this.placeholders.has(where) && /status of 501/.test(text)) return;
      const kind = /Content Security Policy|CSP violation/i.test(text) ? "CSP violation" : "console error";
      const prefix = text.startsWith("CSP violation:") ? "" : `${kind}: `;
      this.problems.push(`${prefix}${text}${where ? ` (at ${where})` : ""}`);
    });
    page.on("pageerror", (err) => this.problems.push(`uncaught page error: ${err.message}`));
    page.on("requestfailed", (req) => {
      const failure = req.failure()?.errorText ?? "failed";
      // A navigation replaced by another one aborts the first; not a page problem.
      if (failure === "net::ERR_ABORTED" && req.isNavigationRequest()) return;
      if (new URL(req.url()).origin === origin) this.problems.push(`request failed: ${req.method()} ${req.url()}: ${failure}`);
    });
    page.on("response", (resp) => {
      const req = resp.request();
      if (new URL(resp.url()).origin !== origin || resp.status() < 400) return;
      if (req.isNavigationRequest() && req.frame() === page.mainFrame()) return; // checked by goto/submit
      this.problems.push(`HTTP ${resp.status()} for ${req.method()} ${resp.url()}`);
    });
    // data-confirm forms ask with window.confirm: accept, and say so.
    page.on("dialog", async (dialog) => {
      this.log(`dialog (${dialog.type()}) accepted: ${dialog.message()}`);
      await dialog.accept();
    });
  }

  /**
   * Runs one named step; fails it on an exception or on any recorded problem, and
   * screenshots the page either way.
   */
  async step(name, fn) {
    const started = Date.now();
    const n = String(++shotCounter).padStart(2, "0");
    let error;
    try {
      await fn();
    } catch (e) {
      error = e;
    }
    // Errors from the page's own requests after load (data fetched by scripts) belong
    // to this step: wait until the network is quiet, but not for pages that stream.
    await this.page.waitForLoadState("networkidle", { timeout: 2000 }).catch(() => {});
    const problems = this.takeProblems();
    const failed = error !== undefined || problems.length > 0;
    const file = `${n}-${slug(this.name)}-${slug(name)}${failed ? "-FAILED" : ""}.png`;
    let shot = file;
    try {
      await this.page.screenshot({ path: join(config.artifacts, file), fullPage: true });
    } catch (e) {
      shot = `(no screenshot: ${e.message})`;
    }
    const ms = Date.now() - started;
    this.steps.push({ name, ms, screenshot: shot, url: this.page.url(), ok: !failed, problems, error: error?.message });
    if (!failed) {
      log(`  ok   ${this.name} / ${name} (${ms} ms) → ${shot}`);
      return;
    }
    const why = [error ? (error instanceof StepFailure ? error.message : error.stack ?? String(error)) : null, ...problems]
      .filter(Boolean)
      .map((l) => `      ${l}`)
      .join("\n");
    log(`  FAIL ${this.name} / ${name} (${ms} ms) at ${this.page.url()} → ${shot}\n${why}`);
    throw new StepFailure(`${this.name} / ${name} failed`);
  }

  /** The problems recorded since the last call, minus (logged) known issues. */
  takeProblems() {
    return this.problems.splice(0).filter((p) => {
      const known = KNOWN_ISSUES.find((k) => k.matches(p));
      if (!known) return true;
      if (!this.knownSeen.has(known.name)) {
        this.knownSeen.add(known.name);
        this.log(`known issue "${known.name}" (not failing): ${p}`);
      }
      return false;
    });
  }

  fail(msg) {
    throw new StepFailure(msg);
  }

  expect(cond, msg) {
    if (!cond) this.fail(msg);
  }

  expectPath(want, doing) {
    const got = this.path();
    this.expect(got === want, `${doing}: expected to be on ${want}, but the browser is on ${this.page.url()}`);
  }

  /**
   * Opens `path` and checks the answer: < 400, or 501 (a page not built yet) when
   * `placeholderOk`. Returns the final response.
   */
  async goto(path, { placeholderOk = false } = {}) {
    const url = this.url(path);
    if (placeholderOk) this.placeholders.add(url);
    const resp = await this.page.goto(url, { waitUntil: "load" });
    this.expect(resp !== null, `GET ${path}: no response`);
    const status = resp.status();
    if (status === 501 && placeholderOk) {
      this.log(`${path}: 501 placeholder (page not built yet)`);
    } else {
      this.expect(status < 400, `GET ${path}: HTTP ${status} (${await this.alertText()})`);
    }
    return resp;
  }

  /** Clicks a submit control and waits for the next page to load. */
  async submit(selector) {
    const page = this.page;
    const navigated = page.waitForEvent("framenavigated", {
      predicate: (f) => f === page.mainFrame(),
      timeout: config.actionTimeoutMs,
    });
    await page.click(selector);
    await navigated;
    await page.waitForLoadState("load");
  }

  /** The text of the page's `.alert`, for failure messages. */
  async alertText() {
    const alert = await this.page.$(".alert");
    return alert ? `alert: ${(await alert.innerText()).trim()}` : "no alert shown";
  }

  /**
   * The label value seeded by the test (`<img src=x onerror=…><script>…</script>`)
   * must be inert: no script ran, no element was made from it.
   */
  async expectInert(where) {
    const state = await this.page.evaluate(() => ({
      xss: typeof window.__xss,
      img: document.querySelectorAll('img[src="x"]').length,
      script: [...document.scripts].filter((s) => s.textContent.includes("__xss")).length,
      shownAsText: document.body.innerText.includes("<script>window.__xss=1</script>"),
    }));
    this.expect(state.xss === "undefined", `${where}: window.__xss is set — a label value ran as script`);
    this.expect(state.img === 0, `${where}: an <img src="x"> element exists — a label value was parsed as HTML`);
    this.expect(state.script === 0, `${where}: a <script> with the label payload exists`);
    if (state.shownAsText) this.log(`${where}: the <script> label value is shown as plain text`);
  }

  /** Logs in with the current password; replaces a one-time password if needed. */
  async login() {
    await this.goto("/login");
    await this.page.fill('#login-form input[name="username"]', config.username);
    await this.page.fill('#login-form input[name="password"]', credentials.password);
    await this.submit('#login-form button[type="submit"]');
    this.expect(this.path() !== "/login", `logging in as ${config.username} failed (${await this.alertText()})`);
    if (this.path() === "/account/password") await this.changePassword();
  }

  /** Fills and submits the password form (the browser must be on /account/password). */
  async changePassword() {
    await this.page.fill('#password-form input[name="current"]', credentials.password);
    await this.page.fill('#password-form input[name="new"]', credentials.next);
    await this.page.fill('#password-form input[name="confirm"]', credentials.next);
    await this.submit('#password-form button[type="submit"]');
    this.expect(
      this.path() !== "/account/password",
      `changing the password failed: still on /account/password (${await this.alertText()})`,
    );
    credentials.password = credentials.next;
    credentials.oneTime = false;
  }

  /** Clicks "Log out" in the top bar. */
  async logout() {
    await this.submit('header.topbar form[action="/logout"] button[type="submit"]');
  }
}

// === journeys ===

/**
 * A new admin's first visit: redirected to log in, forced to replace the one-time
 * password, then every page in the top bar loads cleanly; logging out ends the session.
 */
async function firstLogin(t) {
  const page = t.page;

  await t.step("open / and get sent to the login form", async () => {
    await t.goto("/");
    t.expectPath("/login", "opening / without a session");
    t.expect((await page.$("#login-form")) !== null, "no #login-form on /login");
    await t.expectInert("/login");
  });

  await t.step("log in with the one-time password", async () => {
    t.expect(credentials.oneTime, "the one-time password was already replaced (run first-login first)");
    await page.fill('#login-form input[name="username"]', config.username);
    await page.fill('#login-form input[name="password"]', credentials.password);
    await t.submit('#login-form button[type="submit"]');
    t.expectPath("/account/password", `logging in with the one-time password (${await t.alertText()})`);
    const cookies = await t.context.cookies();
    const session = cookies.find((c) => c.name === "bulkhead_session");
    t.expect(session !== undefined, `no bulkhead_session cookie kept after login: ${JSON.stringify(cookies)}`);
    t.log(`session cookie: secure=${session.secure} httpOnly=${session.httpOnly} sameSite=${session.sameSite}`);
    t.expect(session.httpOnly, "the session cookie is readable from scripts (no HttpOnly)");
  });

  await t.step("a forced change: other pages send back to the password form", async () => {
    await t.goto("/flows");
    t.expectPath("/account/password", "opening /flows before replacing the one-time password");
  });

  await t.step("replace the one-time password and land on the overview", async () => {
    await t.changePassword();
    t.expectPath("/", "after changing the password");
    await t.expectInert("/");
  });

  const links = await page.$$eval("header.topbar nav a", (as) =>
    as.map((a) => ({ href: a.getAttribute("href"), label: a.textContent.trim() })),
  );
  t.expect(links.length > 0, "no links in the top bar's navigation");
  t.log(`top bar: ${links.map((l) => `${l.label} ${l.href}`).join(", ")}`);
  for (const link of links) {
    await t.step(`nav: ${link.label}`, async () => {
      await t.goto(link.href, { placeholderOk: true });
      t.expectPath(new URL(t.url(link.href)).pathname, `following the "${link.label}" link`);
      await t.expectInert(link.href);
    });
  }

  await t.step("log out", async () => {
    await t.goto("/");
    await t.logout();
    t.expectPath("/login", "after logging out");
    const cookies = await t.context.cookies();
    t.expect(!cookies.some((c) => c.name === "bulkhead_session"), "the session cookie survived logging out");
  });

  await t.step("after logout /flows sends to the login form", async () => {
    await t.goto("/flows");
    t.expectPath("/login", "opening /flows after logging out");
  });
}


/** Nodes and edges the graph page drew, by label: `{nodes: [..], edges: [{from, to, verdict, label}]}`. */
async function drawnGraph(t, path) {
  await t.goto(path);
  await t.page.waitForSelector('#graph[data-ready="true"]', { timeout: config.actionTimeoutMs });
  return t.page.evaluate(() => {
    const cy = window.bulkheadGraph;
    if (!cy) return { nodes: [], edges: [], table: true };
    const label = (n) => String(n.data("label"));
    return {
      nodes: cy.nodes().map(label),
      edges: cy.edges().map((e) => ({
        from: label(e.source()),
        to: label(e.target()),
        verdict: e.data("verdict"),
        label: String(e.data("label")),
      })),
    };
  });
}

/** The drawn edge from the node labelled like `from` to the one labelled like `to`. */
function edgeBetween(g, from, to) {
  return g.edges.find((e) => e.from.includes(from) && e.to.includes(to));
}

/**
 * An analyst's day: the graph shows who talks to whom, the deathstar proposal is
 * approved from its review page, deathstar moves to monitor, the graph now colours
 * xwing's traffic as would-be-denied, and the audit log names both decisions.
 */
async function reviewAndRollout(t) {
  const page = t.page;
  let proposalPath = "";

  await t.step("log in", async () => {
    await t.login();
    t.expectPath("/", "after logging in");
  });

  await t.step("the service graph shows the three ships and who talks to deathstar", async () => {
    const g = await drawnGraph(t, "/graph?level=workload&namespace=default");
    t.expect(!g.table, "the scenario is small enough to draw, not a table");
    for (const name of ["deathstar", "tiefighter", "xwing"]) {
      t.expect(g.nodes.some((n) => n.includes(name)), `no ${name} node among ${JSON.stringify(g.nodes)}`);
    }
    const landing = edgeBetween(g, "tiefighter", "deathstar");
    const attack = edgeBetween(g, "xwing", "deathstar");
    t.expect(landing !== undefined, `no tiefighter → deathstar edge in ${JSON.stringify(g.edges)}`);
    t.expect(attack !== undefined, `no xwing → deathstar edge in ${JSON.stringify(g.edges)}`);
    t.expect(landing.label.includes("80"), `the landing edge is labelled ${landing.label}, not with port 80`);
    t.expect(landing.verdict === "nopolicy", `before any approval the edge is ${landing.verdict}, not nopolicy`);
    await t.expectInert("/graph");
  });

  await t.step("the review queue lists deathstar's proposal", async () => {
    await t.goto("/proposals");
    const link = page.locator("#proposals-table a", { hasText: "deathstar" }).first();
    t.expect((await link.count()) === 1, "no deathstar proposal in the queue");
    proposalPath = await link.getAttribute("href");
    await t.expectInert("/proposals");
  });

  await t.step("the proposal shows its rules, YAML and diff", async () => {
    await t.goto(proposalPath);
    // textContent: the YAML sits in collapsed <details>.
    const text = await page.locator("main").evaluate((m) => m.textContent);
    t.expect(/kind: NetworkPolicy/.test(text), "no NetworkPolicy YAML on the proposal page");
    t.expect(!/xwing/.test(text.split("Rules")[1] ?? ""), "xwing came after the learning window: no rule for it");
    t.expect(/CiliumNetworkPolicy/.test(text), "no CiliumNetworkPolicy YAML on the proposal page");
    t.expect((await page.$("#diff")) !== null, "no diff on the proposal page");
    await t.expectInert(proposalPath);
  });

  await t.step("approve it with a comment", async () => {
    await page.fill('#approve-form textarea[name="comment"]', "landing only; xwing stays out");
    await t.submit('#approve-form button[type="submit"]');
    const status = (await page.locator("#proposal-status").innerText()).trim();
    t.expect(status === "approved", `the proposal is ${status} after approving`);
  });

  await t.step("promote deathstar to monitor on the rollout page", async () => {
    await t.goto("/rollout");
    const row = page.locator("tr", { has: page.locator("td", { hasText: "deathstar" }) }).first();
    t.expect((await row.count()) === 1, "no deathstar row on /rollout");
    await row.locator('select[name="mode"]').selectOption("monitor");
    await row.locator('input[name="reason"]').fill("watch before enforcing");
    await t.submit(`#${await row.getAttribute("id")} button[type="submit"]`);
    const mode = await page.locator("tr", { has: page.locator("td", { hasText: "deathstar" }) }).first().getAttribute("data-mode");
    t.expect(mode === "monitor", `deathstar is in ${mode} after promoting (${await t.alertText()})`);
  });

  await t.step("the graph now marks xwing's traffic as would-be-denied", async () => {
    const g = await drawnGraph(t, "/graph?level=workload&namespace=default");
    const landing = edgeBetween(g, "tiefighter", "deathstar");
    const attack = edgeBetween(g, "xwing", "deathstar");
    t.expect(landing?.verdict === "allowed", `tiefighter → deathstar is ${landing?.verdict}, not allowed`);
    t.expect(attack?.verdict === "audit", `xwing → deathstar is ${attack?.verdict}, not audit`);
  });

  await t.step("the audit log names the approval and the mode change", async () => {
    await t.goto("/audit");
    const text = await page.locator("main").innerText();
    t.expect(/proposal\.approve/.test(text), "no proposal.approve entry in the audit log");
    t.expect(/rollout\.mode/.test(text), "no rollout.mode entry in the audit log");
    t.expect(text.includes(config.username), `the audit log does not name ${config.username}`);
    await t.goto("/audit?verify=1");
    t.expect((await page.$(".chain-ok")) !== null, `the audit chain does not verify (${await t.alertText()})`);
  });
}

journey("first-login", firstLogin);
journey("review-and-rollout", reviewAndRollout);

// === runner ===

async function main() {
  mkdirSync(config.artifacts, { recursive: true });
  const selected = journeys.filter((j) => config.only.length === 0 || config.only.includes(j.name));
  const unknown = config.only.filter((n) => !journeys.some((j) => j.name === n));
  if (unknown.length > 0) {
    console.error(`journeys: unknown journey(s) ${unknown.join(", ")}; known: ${journeys.map((j) => j.name).join(", ")}`);
    return 2;
  }
  const browser = await chromium.launch({
    executablePath: config.chromium,
    // Root in a container: chromium's sandbox needs user namespaces it may not get.
    args: ["--no-sandbox"],
    timeout: config.actionTimeoutMs * 2,
  });
  log(`journeys: ${selected.length} in chromium ${browser.version()} against ${config.base}`);
  let failed = 0;
  try {
    for (const j of selected) {
      const started = Date.now();
      const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      context.setDefaultTimeout(config.actionTimeoutMs);
      context.setDefaultNavigationTimeout(config.actionTimeoutMs);
      // Report CSP violations explicitly (chromium also logs most as console errors).
      // Init scripts run through the DevTools protocol, outside the page's CSP.
      await context.addInitScript(() => {
        document.addEventListener("securitypolicyviolation", (e) => {
          console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"} in ${e.sourceFile || document.URL}:${e.lineNumber}`);
        });
      });
      const page = await context.newPage();
      const t = new Journey(j.name, context, page);
      log(`journey ${j.name}`);
      let error;
      try {
        await j.fn(t);
      } catch (e) {
        error = e;
        if (!(e instanceof StepFailure)) {
          // An exception between steps: still leave a screenshot behind.
          log(`  FAIL ${j.name} outside a step: ${e.stack ?? e}`);
          await page.screenshot({ path: join(config.artifacts, `${slug(j.name)}-FAILED.png`), fullPage: true }).catch(() => {});
        }
      }
      const leftover = t.takeProblems();
      if (!error && leftover.length > 0) {
        error = new StepFailure("problems after the last step");
        log(`  FAIL ${j.name}: problems after the last step:\n${leftover.map((l) => `      ${l}`).join("\n")}`);
      }
      const ms = Date.now() - started;
      report.journeys.push({ name: j.name, ok: !error, ms, steps: t.steps, error: error?.message });
      log(`${error ? "FAILED" : "passed"} ${j.name} (${ms} ms)`);
      if (error) failed++;
      await context.close();
    }
  } finally {
    await browser.close();
    writeFileSync(join(config.artifacts, "report.json"), JSON.stringify(report, null, 2));
  }
  log(`journeys: ${selected.length - failed} passed, ${failed} failed`);
  return failed === 0 ? 0 : 1;
}

const overall = setTimeout(() => {
  console.error(`journeys: TIMEOUT after ${config.timeoutMs} ms`);
  try {
    writeFileSync(join(config.artifacts, "report.json"), JSON.stringify({ ...report, timeout: true }, null, 2));
  } catch {}
  process.exit(124);
}, config.timeoutMs);

main().then(
  (code) => {
    clearTimeout(overall);
    process.exitCode = code;
  },
  (e) => {
    clearTimeout(overall);
    console.error(`journeys: ${e.stack ?? e}`);
    process.exitCode = 1;
  },
);
