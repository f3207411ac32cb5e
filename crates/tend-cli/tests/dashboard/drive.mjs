// Drives the dashboard of a running `tend run --api` in headless Chromium (playwright-core
// over Debian's /usr/bin/chromium): load the page with the token in the fragment, see the
// device's id, write through the API, see the live-key count change without a reload,
// take a screenshot. Prints one JSON line of what it saw; exits non-zero on a failure.
//
// node drive.mjs URL TOKEN DEVICE_ID SCREENSHOT [CHROMIUM]
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, token, deviceId, screenshot, executable = "/usr/bin/chromium"] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "tend-dashboard-"));
const seen = {};

async function api(method, path, body) {
  const r = await fetch(url + path, {
    method,
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/octet-stream" },
    body,
  });
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${await r.text()}`);
}

const browser = await chromium.launchPersistentContext(profile, {
  executablePath: executable,
  headless: true,
  viewport: { width: 1280, height: 1100 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${url}/#token=${encodeURIComponent(token)}`);
  // The token left the address bar once taken.
  seen.url_after_load = page.url();
  await page.waitForFunction((id) => document.getElementById("device-id").textContent === id, deviceId, { timeout: 15000 });
  seen.device_id = await page.textContent("#device-id");
  await page.waitForFunction(() => /^\d[\d,]*$/.test(document.getElementById("live-keys").textContent), null, { timeout: 15000 });
  seen.live_keys_before = await page.textContent("#live-keys");
  await page.waitForSelector("#feed-state.on", { timeout: 15000 });
  // A marker that a reload would wipe.
  await page.evaluate(() => { window.__noReload = true; });
  const before = Number(seen.live_keys_before.replace(/,/g, ""));

  await api("PUT", "/v1/kv/todo/milk", "2 litres");
  await page.waitForFunction((n) => document.getElementById("live-keys").textContent.replace(/,/g, "") === String(n),
    before + 1, { timeout: 15000 });
  seen.live_keys_after = await page.textContent("#live-keys");
  seen.not_reloaded = await page.evaluate(() => window.__noReload === true);
  seen.change_rows = await page.locator("#changes tr").count();

  // A little more activity for the screenshot: values, log entries, a chart sample or two.
  for (const [k, v] of [["eggs", "a dozen"], ["bread", "one loaf"], ["coffee", "beans"]]) {
    await api("PUT", "/v1/kv/todo/" + k, v);
  }
  for (const line of ["milk bought", "eggs bought"]) await api("POST", "/v1/logs/activity", line);
  await page.waitForFunction(() => Number(document.getElementById("log-entries").textContent) >= 2, null, { timeout: 15000 });
  await page.waitForTimeout(2500);
  await page.screenshot({ path: screenshot, fullPage: true });
  seen.page_errors = errors;
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
