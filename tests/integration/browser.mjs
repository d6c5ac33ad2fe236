/*
 * browser.mjs - a real browser for the integration tests that need one (what a page may do across
 * origins, pages the server serves): headless chromium driven by playwright-core (tests/js/package.json),
 * using the system's chromium (Debian's `chromium`, in tests/run.sh PKGS; $CM_CHROMIUM overrides the
 * path). Nothing here knows about codemoe.
 *
 *   const b = await launchBrowser();
 *   await b.page.goto(url);
 *   ... b.consoleErrors (console.error messages and failed-request reports, in order), b.pageErrors
 *   (uncaught exceptions) ...
 *   await b.close();
 *
 * A missing browser is an error, never a skip: a test that needs one cannot pass without it.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { root } from './server_harness.mjs';

const require = createRequire(join(root, 'tests', 'js', 'package.json'));

/* The chromium binary: $CM_CHROMIUM, else Debian's. */
export function chromiumPath() {
  for (const p of [process.env.CM_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser']) {
    if (p && existsSync(p)) return p;
  }
  throw new Error('no chromium found (install Debian\'s chromium, as tests/run.sh does, or set CM_CHROMIUM)');
}

/* Launches headless chromium with one fresh page. opts: {executablePath, args: [extra flags]}.
 * Returns {browser, context, page, consoleErrors, pageErrors, close()}. */
export async function launchBrowser(opts = {}) {
  const { chromium } = require('playwright-core');
  const browser = await chromium.launch({
    executablePath: opts.executablePath || chromiumPath(),
    headless: true,
    // as root (CI containers) chromium refuses its sandbox; the pages are the tests' own
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', ...(opts.args || [])],
  });
  const context = await browser.newContext();
  const page = await context.newPage();
  const consoleErrors = [];
  const pageErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => pageErrors.push(String(e && e.stack ? e.stack : e)));
  return {
    browser, context, page, consoleErrors, pageErrors,
    close: () => browser.close(),
  };
}
