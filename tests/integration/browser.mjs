/*
 * browser.mjs - headless Chromium for the integration tests that need a browser: Debian's
 * /usr/bin/chromium (tests/run.sh installs it) driven by npm playwright-core (tests/js/package.json).
 * launchBrowser() returns {browser, page, errors, close}: errors collects the page's console errors
 * and uncaught exceptions as strings, for a test to assert on.
 */
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { root } from './server_harness.mjs';

const require = createRequire(join(root, 'tests', 'js', 'package.json'));

export const chromiumPath = process.env.CM_CHROMIUM || '/usr/bin/chromium';

export async function launchBrowser(opts = {}) {
  const { chromium } = require('playwright-core');
  const browser = await chromium.launch({ executablePath: chromiumPath, headless: true, args: ['--no-sandbox'] });
  const context = await browser.newContext({ viewport: opts.viewport || { width: 1280, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on('console', (m) => { if (m.type() === 'error') errors.push('console: ' + m.text()); });
  page.on('pageerror', (e) => errors.push('pageerror: ' + (e && e.stack ? e.stack : String(e))));
  return { browser, context, page, errors, close: () => browser.close() };
}
