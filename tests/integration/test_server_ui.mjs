#!/usr/bin/env node
/*
 * test_server_ui.mjs - the playground (`codemoe serve` at /, server/ui/) in headless Chromium:
 * - the page loads with no console errors, lists the model, and shows the live status (GET /v1/status);
 * - it streams a completion on a hybrid MoE fixture and draws the routing: one heatmap row per layer,
 *   each with as many token cells as the response has tokens (prompt + completion), the token view
 *   coloured per token, segment windows and totals; the same on the sparse (qwen3moe) and MoLE fixtures;
 * - a server error (a bad field) shows the server's message; a cancelled stream says so and the page
 *   stays usable (a next run completes, then a fill-in-the-middle split at the cursor);
 * - a 128-expert record (a sparse model's shape) is drawn with a colour scale, not a swatch per expert;
 * - with --api-key the page asks for the key, keeps it in sessionStorage and sends it;
 * - --no-ui answers 404 at /, and /v1/status has the schema openapi.yaml gives it.
 * Screenshots go to CM_UI_SHOTS (meson sets it to a directory in the build tree), else the system temp dir.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, sanitizerReport, test, run } from './server_harness.mjs';
import { launchBrowser } from './browser.mjs';

const shots = process.env.CM_UI_SHOTS || join(tmpdir(), 'codemoe-ui-shots');
mkdirSync(shots, { recursive: true });

/* Stops a server; in a sanitizer build its report at exit fails the test. */
async function stop(srv) {
  await srv.stop();
  const rep = sanitizerReport(srv);
  assert.equal(rep, null, rep);
}

/* Everything the page logged as an error and every uncaught exception. */
const allErrors = (b) => [...b.consoleErrors, ...b.pageErrors];
/* The same without the browser's network logs of a refused request ("Failed to load resource: ... 400"),
 * which a test that provokes one expects. */
const pageErrors = (b) => allErrors(b).filter((e) => !/Failed to load resource/.test(e));

async function runCompletion(page, { prompt, maxTokens = 12 } = {}) {
  if (prompt !== undefined) await page.fill('#prompt', prompt);
  await page.fill('#max-tokens', String(maxTokens));
  await page.evaluate(() => { document.getElementById('run-state').textContent = ''; }); // not the last run's "Done"

  await page.click('#run');
  await page.waitForFunction(() => /^Done/.test(document.getElementById('run-state').textContent), null, { timeout: 30000 });
}

/* What the drawn heatmap has: cells per row, and the usage the page reported. */
async function heatmapShape(page) {
  return page.evaluate(() => {
    const rows = [...document.querySelectorAll('#heatmap .hrow')];
    const m = document.getElementById('run-state').textContent.match(/(\d+) prompt \+ (\d+) completion/);
    return {
      rows: rows.length,
      cells: rows.map((r) => r.querySelectorAll('.cell').length),
      coloured: rows.map((r) => r.querySelectorAll('.cell:not(.none):not(.off)').length),
      tokens: m ? Number(m[1]) + Number(m[2]) : -1,
      tokenSpans: document.querySelectorAll('#tokens .tok').length,
    };
  });
}

test('the page loads, streams a completion on a hybrid MoE and draws a cell per token per layer', async () => {
  const srv = await startServer({ model: 'hybrid-max' });
  const b = await launchBrowser();
  try {
    const { page } = b;
    const res = await page.goto(srv.base + '/');
    assert.equal(res.status(), 200);
    assert.match(res.headers()['content-security-policy'] || '', /default-src 'self'/);
    await page.waitForFunction(() => document.querySelector('#model option') !== null);
    assert.equal(await page.inputValue('#model'), 'hybrid-max');
    await page.waitForFunction(() => /Running sequences/.test(document.getElementById('status').textContent));
    assert.deepEqual(allErrors(b), [], 'console errors on load');
    // keyboard only: focus the editor, Ctrl+Enter runs
    await page.focus('#prompt');
    await page.keyboard.press('Control+End');
    await page.fill('#max-tokens', '10');
    await page.focus('#prompt');
    await page.keyboard.press('Control+Enter');
    await page.waitForFunction(() => /^Done/.test(document.getElementById('run-state').textContent), null, { timeout: 30000 });
    const out = await page.textContent('#output .gen');
    assert.ok(out.length > 0, 'the completion text streamed into the output');
    const s = await heatmapShape(page);
    assert.equal(s.rows, 2, 'one row per layer of hybrid-max');
    assert.ok(s.tokens > 10, JSON.stringify(s));
    for (const c of s.cells) assert.equal(c, s.tokens, 'a cell per token in every layer');
    // every token but the last sampled one (never fed back) has its experts
    for (const c of s.coloured) assert.equal(c, s.tokens - 1);
    assert.equal(s.tokenSpans, s.tokens);
    assert.ok(await page.locator('#windows .win').count() > 0, 'segment windows are marked');
    assert.match(await page.textContent('#routing-summary'), /shared expert 3/);
    assert.ok(await page.locator('#totals .bar').count() >= 4);
    // another layer redraws from the same record
    await page.selectOption('#layer', '1');
    assert.equal(await page.locator('#heatmap .hrow.sel').getAttribute('data-layer'), '1');
    await page.screenshot({ path: join(shots, 'playground-hybrid.png'), fullPage: true });
    // a narrow window: one column, nothing wider than the viewport but the scrolling heatmap
    await page.setViewportSize({ width: 420, height: 900 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 1, `page wider than a narrow window by ${overflow}px`);
    await page.screenshot({ path: join(shots, 'playground-narrow.png'), fullPage: true });
    assert.deepEqual(allErrors(b), [], 'console errors after streaming');
  } finally {
    await b.close();
    await stop(srv);
  }
});

test('sparse (qwen3moe) and MoLE models: the same picture, experts on a scale and adapter rows', async () => {
  for (const model of ['qwen3moe', 'mole']) {
    const srv = await startServer({ model });
    const b = await launchBrowser();
    try {
      const { page } = b;
      await page.goto(srv.base + '/');
      await page.waitForFunction(() => document.querySelector('#model option') !== null);
      await runCompletion(page, { prompt: model === 'mole' ? '```python\ndef f(x):\n' : 'int main(void) {', maxTokens: 8 });
      const s = await heatmapShape(page);
      assert.ok(s.rows >= 1, model);
      for (const c of s.cells) assert.equal(c, s.tokens, `${model}: a cell per token in every row`);
      if (model === 'qwen3moe') {
        // a 128-expert record (Qwen3-Coder-30B-A3B's shape) drawn by the same code: a colour scale, not 128 swatches
        const drawn = await page.evaluate(() => {
          const T = 6, L = 3, E = 128;
          state.info = { ...state.info, moe: { kind: 'sparse', experts: E, top_k: 8 } };
          state.nTokens = T;
          state.record = {
            n_layer: L, token_experts: E, shared_expert: -1, segment_experts: 0, window: 0, prompt_tokens: T, completion_tokens: 0,
            layers: Array.from({ length: L }, (_, l) => ({ layer: l, token: Array.from({ length: E }, (_, e) => ({ expert: e, prompt_tokens: e < 8 * T ? 1 : 0, generated_tokens: 0 })) })),
            tokens: Array.from({ length: T }, (_, p) => ({ position: p, id: p, text: 'x', generated: false,
              experts: Array.from({ length: L }, (_, l) => Array.from({ length: 8 }, (_, k) => (p * 20 + l * 3 + k * 16) % E)),
              gates: Array.from({ length: L }, () => Array(8).fill(0.125)) })),
          };
          drawRouting();
          const cells = [...document.querySelectorAll('#heatmap .hrow')].map((r) => r.querySelectorAll('.cell').length);
          const colours = new Set([...document.querySelectorAll('#heatmap .cell')].map((c) => c.style.background));
          return { cells, colours: colours.size, scale: document.querySelectorAll('#legend .scale').length,
            swatches: document.querySelectorAll('#legend .sw').length, bars: document.querySelectorAll('#totals .bar').length };
        });
        assert.deepEqual(drawn.cells, [6, 6, 6]);
        assert.ok(drawn.colours > 6, 'experts apart on the scale');
        assert.equal(drawn.scale, 1, 'one colour scale in the legend');
        assert.ok(drawn.swatches <= 2, 'no swatch per expert');
        assert.ok(drawn.bars <= 24, 'the totals show the busiest experts only');
        await page.screenshot({ path: join(shots, 'playground-128-experts.png'), fullPage: true });
      }
      if (model === 'mole') {
        assert.equal(await page.isVisible('#language-field'), true, 'MoLE: the language picker');
        assert.ok(s.coloured.some((c) => c > 0), 'tokens have adapters');
      }
      await page.screenshot({ path: join(shots, `playground-${model}.png`), fullPage: true });
      assert.deepEqual(allErrors(b), [], `${model}: console errors`);
    } finally {
      await b.close();
      await stop(srv);
    }
  }
});

test('a server error shows its message; a cancelled stream says so and the next run works', async () => {
  // 40 ms a step: a long generation is still running when the test cancels it
  const srv = await startServer({ model: 'hybrid-max', env: { CODEMOE_SERVE_STEP_DELAY_MS: '40' } });
  const b = await launchBrowser();
  try {
    const { page } = b;
    await page.goto(srv.base + '/');
    await page.waitForFunction(() => document.querySelector('#model option') !== null);
    // a bad field: the page sends what the form says; a negative temperature is the server's to refuse
    await page.fill('#temperature', '-1');
    await page.click('#run');
    await page.waitForSelector('#error:not([hidden])');
    assert.match(await page.textContent('#error'), /temperature/);
    await page.screenshot({ path: join(shots, 'playground-error.png') });
    await page.fill('#temperature', '0');
    // cancel: a long generation, aborted as soon as it started
    await page.fill('#max-tokens', '200');
    await page.click('#run');
    await page.waitForFunction(() => !document.getElementById('cancel').disabled);
    await page.click('#cancel');
    await page.waitForFunction(() => document.getElementById('run-state').textContent === 'Cancelled.');
    assert.equal(await page.isDisabled('#run'), false);
    // the server let the sequence go (the stream was not just hidden)
    for (let t0 = Date.now(); ; ) {
      const st = await (await fetch(srv.base + '/v1/status')).json();
      if (st.sequences_running === 0) break;
      assert.ok(Date.now() - t0 < 10000, 'the cancelled sequence is still running');
      await new Promise((r) => setTimeout(r, 50));
    }
    await runCompletion(page, { maxTokens: 4 });
    const s = await heatmapShape(page);
    for (const c of s.cells) assert.equal(c, s.tokens);
    // fill in the middle: the cursor splits the text; the fill lands between prefix and suffix
    await page.selectOption('#mode', 'fim');
    await page.fill('#prompt', 'def add(a, b):\n    return a + b\n');
    await page.fill('#max-tokens', '4');
    await page.evaluate(() => { const t = document.getElementById('prompt'); t.focus(); t.setSelectionRange(15, 15); });
    await page.evaluate(() => { document.getElementById('run-state').textContent = ''; }); // not the last run's "Done"
    await page.keyboard.press('Control+Enter');
    await page.waitForFunction(() => /^Done/.test(document.getElementById('run-state').textContent), null, { timeout: 30000 });
    const parts = await page.evaluate(() => [...document.getElementById('output').childNodes].map((n) => n.textContent));
    assert.deepEqual([parts[0], parts[2]], ['def add(a, b):\n', '    return a + b\n']);
    assert.equal(parts.length, 3, 'prefix, fill, suffix');
    const f = await heatmapShape(page); // (the tiny fixture's fill may be bytes that are no text of their own)
    assert.match(await page.textContent('#run-state'), /\+ 4 completion tokens/);
    for (const c of f.cells) assert.equal(c, f.tokens);
    assert.deepEqual(pageErrors(b), [], 'page errors');
  } finally {
    await b.close();
    await stop(srv);
  }
});

test('with --api-key the page asks for the key, keeps it for the tab and sends it', async () => {
  const srv = await startServer({ model: 'hybrid-max', args: ['--api-key', 'sekrit-key'] });
  const b = await launchBrowser();
  try {
    const { page } = b;
    const res = await page.goto(srv.base + '/');
    assert.equal(res.status(), 200, 'the page itself needs no key');
    await page.waitForSelector('#key-form:not([hidden])');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'key-input');
    await page.screenshot({ path: join(shots, 'playground-key.png') });
    await page.keyboard.type('sekrit-key');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.querySelector('#model option') !== null);
    assert.equal(await page.evaluate(() => sessionStorage.getItem('codemoe-api-key')), 'sekrit-key');
    await runCompletion(page, { maxTokens: 4 });
    assert.equal(await page.isHidden('#key-form'), true);
    assert.deepEqual(pageErrors(b), [], 'page errors');
  } finally {
    await b.close();
    await stop(srv);
  }
});

test('--no-ui: 404 at /; /v1/status keeps answering', async () => {
  const srv = await startServer({ model: 'hybrid-max', args: ['--no-ui'] });
  try {
    for (const p of ['/', '/ui/app.js', '/ui/index.html']) assert.equal((await fetch(srv.base + p)).status, 404, p);
    const r = await fetch(srv.base + '/v1/status');
    assert.equal(r.status, 200);
    const s = await r.json();
    assert.equal(s.object, 'server.status');
    assert.equal(s.model_state, 'ok');
    for (const k of ['queue_length', 'requests_running', 'sequences_running']) assert.equal(typeof s[k], 'number', k);
    assert.equal(typeof s.kv.blocks_total, 'number');
    assert.equal(s.prefix_cache.hit_ratio, null, 'no query yet');
  } finally {
    await stop(srv);
  }
});

await run();
