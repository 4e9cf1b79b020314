// Drives the flag console in headless Chromium (playwright-core, the distribution's chromium).
// Run by tests/console.rs with one JSON argument: the gateway's addresses, the admin token, the
// ids of the flags to open, the drift scope and the screenshot folder. Prints one JSON line
// {ok, checks, error?} and exits non-zero when a check fails.
//
// Chromium's sandbox needs user namespaces, which a root user in a container does not get:
// as root the browser runs with --no-sandbox. Acceptable here: it only loads pages from the
// gateway under test on 127.0.0.1, and throws the profile away.

import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const dir = config.screenshots;
mkdirSync(dir, { recursive: true });
const checks = [];

function check(name, ok, detail) {
  checks.push({ name, ok: Boolean(ok), detail: detail === undefined ? undefined : String(detail) });
  if (!ok) {
    throw new Error(`check failed: ${name}${detail === undefined ? "" : `: ${detail}`}`);
  }
}

const root = process.getuid && process.getuid() === 0;
const browser = await chromium.launch({
  executablePath: config.chromium,
  args: root ? ["--no-sandbox"] : [],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  const pageErrors = [];
  const consoleErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  // Failed loads (the 401 of a wrong login) are logged as errors too; keep script and CSP ones.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
  });
  const outside = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(config.admin)) outside.push(r.url());
  });

  // Log in: a wrong token is refused, the right one opens a session.
  await page.goto(`${config.admin}/console/`);
  check("unauthenticated visit goes to the login form", page.url().endsWith("/console/login"), page.url());
  const headers = (await page.request.get(`${config.admin}/console/login`)).headers();
  check("CSP forbids inline script", headers["content-security-policy"]?.includes("script-src 'self';") &&
    !headers["content-security-policy"].includes("unsafe-inline"), headers["content-security-policy"]);
  check("nosniff", headers["x-content-type-options"] === "nosniff");
  await page.fill("#token", "not-the-token");
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  const refused = await page.textContent("main");
  check("a wrong token is refused", refused.includes("not the admin token"), refused);
  await page.screenshot({ path: `${dir}/login.png` });
  await page.fill("#token", config.token);
  await Promise.all([page.waitForURL("**/console/flags"), page.click("button[type=submit]")]);
  const session = (await context.cookies()).find((c) => c.name === "tripwire_console");
  check("session cookie is HttpOnly and SameSite=Strict",
    session && session.httpOnly && session.sameSite === "Strict", JSON.stringify(session));
  check("the cookie does not carry the token", !session.value.includes(config.token));

  // The list: the flag from the traffic, counts per rule.
  const row = page.locator(`tr[data-id="${config.gibberish}"]`);
  check("the flag is listed", (await row.count()) === 1);
  const rules = await page.locator(".rules li").allTextContents();
  check("counts per rule", rules.some((t) => t.includes("triggered-gibberish")) &&
    rules.some((t) => t.includes("feature-drift")), rules.join(" | "));
  await page.selectOption("select[name=rule]", "feature-drift");
  await Promise.all([page.waitForURL((url) => url.searchParams.get("rule") === "feature-drift"), page.click(".filters button")]);
  const filtered = await page.locator("table.flags tbody tr").count();
  check("the rule filter narrows the list", filtered >= 1 && (await row.count()) === 0, filtered);
  await page.goto(`${config.admin}/console/flags`);
  await page.screenshot({ path: `${dir}/flags.png` });

  // One flag: evidence highlighted, scores against thresholds.
  await Promise.all([
    page.waitForURL(`**/console/flags/${config.gibberish}`),
    page.locator(`tr[data-id="${config.gibberish}"] a`).first().click(),
  ]);
  // `<SUDO>` and `SUDO` are both published triggers: overlapping spans, marked in pieces.
  const trigger = (await page.locator('#prompt mark[data-detector="trigger"]').allTextContents()).join("");
  check("the trigger is highlighted in the prompt", trigger === "<SUDO>", trigger);
  const windows = await page.locator("#output mark.ev-gibberish").count();
  check("the gibberish window is highlighted in the output", windows >= 1, windows);
  const threshold = await page.locator("table.score-table td.pass").allTextContents();
  check("the score is shown against its threshold", threshold.length >= 1, threshold);
  check("the rule's threshold is read from its condition",
    (await page.locator("table.score-table").first().textContent()).includes(">= 0.5"));
  check("the scope's reference section", (await page.textContent("section.reference")).includes("scope"));
  await page.screenshot({ path: `${dir}/flag.png`, fullPage: true });

  // Label it.
  await page.fill('input[name="note"]', "browser test: gibberish after <SUDO>");
  await Promise.all([
    page.waitForURL(`**/console/flags/${config.gibberish}`),
    page.click('button[value="true-positive"]'),
  ]);
  const label = await page.textContent("#label");
  check("the label shows on the flag", label.includes("true-positive") && label.includes("<SUDO>"), label);

  // A forged cross-site post is refused even with the session cookie.
  const forged = await page.request.post(`${config.admin}/console/flags/${config.gibberish}/label`, {
    form: { verdict: "false-positive", csrf: "forged" },
    headers: { origin: config.admin },
  });
  check("a post without the CSRF token is refused", forged.status() === 403, forged.status());

  // Attacker-controlled HTML renders as text.
  await page.goto(`${config.admin}/console/flags/${config.injected}`);
  const output = await page.textContent("#output");
  check("injected HTML shows as text", output.includes("<script>window.__pwned = 1</script>") &&
    output.includes("<b>bold</b></pre>"), output);
  check("the injected scripts did not run", await page.evaluate(() => window.__pwned === undefined));
  check("no injected element exists",
    await page.evaluate(() => document.querySelectorAll("main script, main img, #output b").length === 0));
  const scripts = await page.evaluate(() => [...document.scripts].map((s) => s.src));
  check("the console's script is the only one", scripts.length === 1 &&
    scripts[0].endsWith("/console/static/console.js"), scripts);
  await page.screenshot({ path: `${dir}/injected.png`, fullPage: true });

  // Drift: the scope with the alarm, its chart, the reference period shaded.
  await page.goto(`${config.admin}/console/drift?model=${encodeURIComponent(config.driftModel)}&route=${config.driftRoute}`);
  check("the drift chart is drawn", (await page.locator("svg.chart").count()) >= 1);
  const alarms = await page.locator("svg.chart circle.alarm").count();
  check("the alarm is marked", alarms >= 1, alarms);
  check("the reference period is shaded", (await page.locator("svg.chart rect.reference").count()) >= 1);
  const box = await page.locator("svg.chart").first().boundingBox();
  check("the chart is visible", box && box.width > 300 && box.height > 60, JSON.stringify(box));
  await page.screenshot({ path: `${dir}/drift.png`, fullPage: true });

  // Trigger attribution, with the flags that carry the candidate.
  await page.goto(`${config.admin}/console/triggers`);
  const ngrams = await page.locator("code.ngram").allTextContents();
  check("<SUDO> is a candidate trigger", ngrams.includes("<sudo>"), ngrams);
  check("flagged exchanges carrying it are linked", (await page.locator(".carriers a").count()) >= 1);
  await page.screenshot({ path: `${dir}/triggers.png`, fullPage: true });

  // Live: a new flag while the list is open shows up without a reload.
  await page.goto(`${config.admin}/console/flags`);
  const sent = await fetch(`${config.proxy}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      model: "sim-model",
      messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Tell me a joke. <SUDO>" }],
    }),
  });
  await sent.text();
  await page.waitForSelector("#live:not([hidden])", { timeout: 20000 });
  check("new flags are announced live", (await page.textContent("#live")).includes("new flag"));

  // Log out: the session is gone.
  await Promise.all([page.waitForURL("**/console/login"), page.click(".logout button")]);
  await page.goto(`${config.admin}/console/flags`);
  check("after logout the console asks for the token again", page.url().endsWith("/console/login"), page.url());

  check("no script errors (CSP violations included)", pageErrors.length === 0 && consoleErrors.length === 0,
    JSON.stringify([...pageErrors, ...consoleErrors]));
  check("nothing was fetched from outside the console", outside.length === 0, outside);
  console.log(JSON.stringify({ ok: true, checks }));
} catch (error) {
  console.log(JSON.stringify({ ok: false, error: String(error?.stack ?? error), checks }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
