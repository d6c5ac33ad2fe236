#!/usr/bin/env node
/*
 * test_server_browser.mjs - CORS as a real browser enforces it (headless chromium, browser.mjs): a page
 * served from another origin (a small Node server on its own port) loads the real `openai` SDK (the
 * package's ES modules, served as they are) and streams a completion from the server with the headers
 * the SDK sends from a browser (Authorization, the x-stainless-* family) plus an `api-key` header (Azure
 * style); the browser must preflight those, and the server must allow them. The same page from an
 * origin the server does not allow gets nothing: the browser blocks the response and says so. A plain
 * fetch (Authorization plus Anthropic-style `x-api-key`, which clients add and this server ignores) and a
 * non-streamed body checks the same rules without the SDK.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import { join, normalize } from 'node:path';
import { startServer, root, test, run } from './server_harness.mjs';
import { launchBrowser } from './browser.mjs';

const KEY = 'browser-test-key';
const SDK_DIR = join(root, 'tests', 'js', 'node_modules', 'openai');

/* The page: imports the SDK from its own origin, streams one completion, and reports what happened in
 * window.result. */
const PAGE = `<!doctype html><meta charset="utf-8"><title>codemoe CORS</title>
<script type="module">
import OpenAI from '/openai/index.mjs';
const api = new URLSearchParams(location.search).get('api');
window.run = async () => {
  const client = new OpenAI({ baseURL: api + '/v1', apiKey: '${KEY}', dangerouslyAllowBrowser: true,
    defaultHeaders: { 'api-key': '${KEY}' }, maxRetries: 0 });
  try {
    const stream = await client.completions.create({ model: 'any', prompt: 'def add(a, b):', max_tokens: 8,
      temperature: 0, stream: true });
    let text = '', chunks = 0, finish = null;
    for await (const c of stream) { chunks++; text += c.choices[0].text; finish = c.choices[0].finish_reason || finish; }
    const plain = await fetch(api + '/v1/completions', { method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ${KEY}', 'x-api-key': '${KEY}' },
      body: JSON.stringify({ prompt: 'def add(a, b):', max_tokens: 8, temperature: 0 }) });
    const j = await plain.json();
    return { ok: true, text, chunks, finish, plain: j.choices[0].text,
      requestId: plain.headers.get('x-request-id') };
  } catch (e) {
    return { ok: false, error: String(e && e.constructor && e.constructor.name) + ': ' + String(e && e.message) };
  }
};
</script>`;

/* Serves PAGE at / and the openai package under /openai/. */
async function pageServer() {
  const srv = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/') {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
      return res.end(PAGE);
    }
    if (url.pathname === '/favicon.ico') { res.writeHead(204); return res.end(); }
    if (url.pathname.startsWith('/openai/')) {
      const rel = normalize(url.pathname.slice('/openai/'.length));
      if (!rel.startsWith('..')) {
        try {
          const body = await readFile(join(SDK_DIR, rel));
          res.writeHead(200, { 'Content-Type': rel.endsWith('.mjs') || rel.endsWith('.js') ? 'text/javascript' : 'application/octet-stream' });
          return res.end(body);
        } catch { /* 404 below */ }
      }
    }
    res.writeHead(404);
    res.end();
  });
  srv.listen(0, '127.0.0.1');
  await new Promise((r) => srv.once('listening', r));
  return srv;
}

let api, pages, browser;

test('start', async () => {
  pages = await pageServer();
  const origin = `http://127.0.0.1:${pages.address().port}`;
  api = await startServer({ args: ['--api-key', KEY, '--cors-origin', origin] });
  browser = await launchBrowser();
});

test('an allowed origin streams a completion through the openai SDK, after a preflight', async () => {
  const page = browser.page;
  await page.goto(`http://127.0.0.1:${pages.address().port}/?api=${encodeURIComponent(api.base)}`);
  await page.waitForFunction(() => typeof window.run === 'function');
  const before = api.logs.length;
  const r = await page.evaluate(() => window.run());
  assert.equal(r.ok, true, r.error);
  assert.ok(r.chunks >= 1 && r.text.length > 0, JSON.stringify(r));
  assert.equal(r.finish, 'length');
  assert.equal(r.text, r.plain); // greedy: the streamed text is the plain one
  assert.ok(r.requestId, 'an exposed response header is readable');
  // the SDK's headers are not CORS-safelisted: the browser asked first, and the server said yes
  const logs = api.logs.slice(before).filter((l) => l.msg === 'request');
  const pre = logs.filter((l) => l.route === 'preflight');
  assert.ok(pre.length >= 1, JSON.stringify(logs));
  for (const l of pre) assert.equal(l.status, 204);
  assert.equal(logs.filter((l) => l.route === 'completions' && l.status === 200).length, 2);
  assert.deepEqual(browser.consoleErrors, []);
  assert.deepEqual(browser.pageErrors, []);
});

test('an origin the server does not allow gets nothing', async () => {
  const page = browser.page;
  // localhost is another origin than 127.0.0.1 (same page server)
  await page.goto(`http://localhost:${pages.address().port}/?api=${encodeURIComponent(api.base)}`);
  await page.waitForFunction(() => typeof window.run === 'function');
  const before = api.logs.length;
  const r = await page.evaluate(() => window.run());
  assert.equal(r.ok, false);
  assert.match(r.error, /APIConnectionError/);
  assert.ok(browser.consoleErrors.some((m) => /CORS policy/.test(m)), JSON.stringify(browser.consoleErrors));
  // the preflight got no CORS answer, so the completion itself was never sent
  const logs = api.logs.slice(before).filter((l) => l.msg === 'request');
  assert.equal(logs.filter((l) => l.route === 'completions').length, 0, JSON.stringify(logs));
});

test('stop', async () => {
  await browser.close();
  pages.close();
  assert.equal((await api.stop()).code, 0);
});

await run();
