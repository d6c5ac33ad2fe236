#!/usr/bin/env node
/*
 * test_server_http.mjs - the HTTP surface of the real `codemoe serve`: routes, every error status in
 * OpenAI's error shape (malformed JSON, wrong types, out of range, unknown model, prompt too long,
 * n too large, 413 up front and while reading, 405, 404), API keys (flag, file, env; /health open),
 * CORS and preflight, request ids, the bounded queue (429 + Retry-After), request timeouts, idle
 * connection timeouts, /health 503 while loading, a failed load, and /metrics.
 */
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import http from 'node:http';
import { startServer, postJSON, metrics, waitMetrics, rawRequest, sleep, test, run, readSSE } from './server_harness.mjs';

function assertErrorShape(r, status, where) {
  assert.equal(r.status, status, `${where}: status ${r.status} body ${r.text}`);
  assert.ok(r.json && r.json.error, `${where}: no error object: ${r.text}`);
  const e = r.json.error;
  assert.equal(typeof e.message, 'string', where);
  assert.ok(e.message.length > 0, where);
  assert.equal(typeof e.type, 'string', where);
  assert.ok('param' in e && 'code' in e, `${where}: param/code missing`);
  return e;
}

async function get(srv, path, headers = {}, method = 'GET') {
  const r = await fetch(srv.base + path, { method, headers });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* */ }
  return { status: r.status, headers: r.headers, text, json };
}

/* A streaming request whose body we hold open: returns {res, close()} once headers arrived. */
function openStream(srv, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' } }, (res) => {
      resolve({ res, close: () => req.destroy() });
    });
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

test('routes, models, health, request ids', async () => {
  const srv = await startServer();
  try {
    let r = await get(srv, '/health');
    assert.equal(r.status, 200);
    assert.deepEqual(r.json, { status: 'ok' });
    assert.match(r.headers.get('x-request-id'), /^req-[0-9a-f]{24}$/);
    r = await get(srv, '/health', { 'X-Request-Id': 'my-trace.42' });
    assert.equal(r.headers.get('x-request-id'), 'my-trace.42');
    r = await get(srv, '/health', { 'X-Request-Id': 'bad id with spaces' });
    assert.match(r.headers.get('x-request-id'), /^req-/);
    r = await get(srv, '/health', { 'X-Request-Id': 'x'.repeat(200) });
    assert.match(r.headers.get('x-request-id'), /^req-/);

    r = await get(srv, '/v1/models');
    assert.equal(r.status, 200);
    assert.equal(r.json.object, 'list');
    assert.equal(r.json.data[0].id, 'qwen2-gqa');
    r = await get(srv, '/v1/models/qwen2-gqa');
    assert.equal(r.status, 200);
    assert.equal(r.json.id, 'qwen2-gqa');
    assert.equal(r.json.moe, undefined); /* a dense model has no experts to describe */
    assertErrorShape(await get(srv, '/v1/models/gpt-4'), 404, 'unknown model id');

    assertErrorShape(await get(srv, '/nope'), 404, 'unknown path');
    assertErrorShape(await get(srv, '/v1/completions/cmpl-unknown/routing'), 404, 'unknown routing id');
    let e = assertErrorShape(await get(srv, '/v1/completions'), 405, 'GET completions');
    r = await get(srv, '/v1/completions');
    assert.equal(r.headers.get('allow'), 'POST, OPTIONS');
    assertErrorShape(await postJSON(srv, '/health', {}), 405, 'POST health');
    assertErrorShape(await get(srv, '/v1/models', {}, 'DELETE'), 405, 'DELETE models');
    assertErrorShape(await get(srv, '/metrics', {}, 'PUT'), 405, 'PUT metrics');

    /* a completion, then its routing record (retained by completion id) */
    r = await postJSON(srv, '/v1/completions', { prompt: 'def add(a, b):', max_tokens: 4, temperature: 0 });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.object, 'text_completion');
    assert.equal(r.json.usage.completion_tokens <= 4, true);
    const rr = await get(srv, `/v1/completions/${r.json.id}/routing`);
    assert.equal(rr.status, 200, rr.text);
    assert.equal(rr.json.id, r.json.id);
    assert.ok(Array.isArray(rr.json.layers));
    e = e; /* keep lint quiet */
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('bad requests get OpenAI-shaped errors with the right status', async () => {
  /* OpenAI's strict rules on the model name and the context */
  const srv = await startServer({ args: ['--parallel', '2', '--strict-model', '--strict-context'] });
  try {
    const P = '/v1/completions';
    assertErrorShape(await postJSON(srv, P, '{"prompt": "x",'), 400, 'truncated JSON');
    assertErrorShape(await postJSON(srv, P, 'not json at all'), 400, 'not JSON');
    assertErrorShape(await postJSON(srv, P, ''), 400, 'empty body');
    assertErrorShape(await postJSON(srv, P, '[1,2,3]'), 400, 'array body');
    assertErrorShape(await postJSON(srv, P, '"\u0000"'), 400, 'string body');
    let e = assertErrorShape(await postJSON(srv, P, { prompt: 'x', max_tokens: 'ten' }), 400, 'wrong type');
    assert.equal(e.param, 'max_tokens');
    e = assertErrorShape(await postJSON(srv, P, { prompt: 'x', temperature: 7 }), 400, 'out of range');
    assert.equal(e.param, 'temperature');
    e = assertErrorShape(await postJSON(srv, P, { prompt: { a: 1 } }), 400, 'prompt object');
    e = assertErrorShape(await postJSON(srv, P, { prompt: [1, 2, 99999999] }), 400, 'token out of vocab');
    e = assertErrorShape(await postJSON(srv, P, { model: 'gpt-4', prompt: 'x' }), 404, 'unknown model');
    assert.equal(e.code, 'model_not_found');
    e = assertErrorShape(await postJSON(srv, P, { prompt: 'x', n: 100 }), 400, 'n too large for api');
    assert.equal(e.param, 'n');
    e = assertErrorShape(await postJSON(srv, P, { prompt: 'x', n: 3 }), 400, 'n above --parallel');
    assert.equal(e.param, 'n');
    e = assertErrorShape(await postJSON(srv, P, { prompt: 'word '.repeat(400), max_tokens: 4 }), 400, 'prompt too long');
    assert.equal(e.code, 'context_length_exceeded');
    e = assertErrorShape(await postJSON(srv, P, { prompt: 'x', max_tokens: 100000 }), 400, 'max_tokens over context');
    assert.equal(e.code, 'context_length_exceeded');
    /* the server is still fine */
    const r = await postJSON(srv, P, { prompt: 'x', max_tokens: 2 });
    assert.equal(r.status, 200, r.text);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('body limit: 413 from Content-Length and while reading a chunked body', async () => {
  const srv = await startServer({ args: ['--max-body', '2048'] });
  try {
    const big = JSON.stringify({ prompt: 'a'.repeat(5000) });
    assertErrorShape(await postJSON(srv, '/v1/completions', big), 413, 'Content-Length over limit');
    /* chunked: no Content-Length, so the limit trips while accumulating */
    const r = await new Promise((resolve, reject) => {
      const req = http.request(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json', 'Transfer-Encoding': 'chunked' } }, (res) => {
        let t = '';
        res.on('data', (d) => { t += d; });
        res.on('end', () => resolve({ status: res.statusCode, text: t, json: JSON.parse(t) }));
      });
      req.on('error', reject);
      for (let i = 0; i < 10; i++) req.write('{"prompt":"' + 'b'.repeat(500) + '"}');
      req.end();
    });
    assertErrorShape(r, 413, 'chunked over limit');
    const ok = await postJSON(srv, '/v1/completions', { prompt: 'small', max_tokens: 1 });
    assert.equal(ok.status, 200);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('API keys: flag, file and env; 401 in error shape; /health needs none', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'cm-keys-'));
  const keyfile = join(dir, 'keys');
  writeFileSync(keyfile, '# keys\nkey-from-file\n');
  const srv = await startServer({ args: ['--api-key', 'key-from-flag', '--api-key-file', keyfile], env: { CODEMOE_API_KEY: 'key-from-env' } });
  try {
    assert.equal((await get(srv, '/health')).status, 200);
    const body = { prompt: 'x', max_tokens: 1 };
    let r = await postJSON(srv, '/v1/completions', body);
    const e = assertErrorShape(r, 401, 'no key');
    assert.equal(e.type, 'authentication_error');
    assert.equal(r.headers.get('www-authenticate'), 'Bearer');
    assertErrorShape(await postJSON(srv, '/v1/completions', body, { Authorization: 'Bearer wrong' }), 401, 'wrong key');
    assertErrorShape(await postJSON(srv, '/v1/completions', body, { Authorization: 'Bearer key-from-fla' }), 401, 'prefix of key');
    assertErrorShape(await postJSON(srv, '/v1/completions', body, { Authorization: 'key-from-flag' }), 401, 'no scheme');
    assertErrorShape(await get(srv, '/v1/models'), 401, 'models without key');
    assertErrorShape(await get(srv, '/metrics'), 401, 'metrics without key');
    assertErrorShape(await get(srv, '/nope'), 404, 'unknown path is 404 before auth');
    for (const k of ['key-from-flag', 'key-from-file', 'key-from-env']) {
      r = await postJSON(srv, '/v1/completions', body, { Authorization: 'Bearer ' + k });
      assert.equal(r.status, 200, k + ': ' + r.text);
    }
    assert.equal((await get(srv, '/v1/models', { Authorization: 'Bearer key-from-env' })).status, 200);
    assert.equal((await get(srv, '/metrics', { Authorization: 'Bearer key-from-file' })).status, 200);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('CORS: allowed origins, preflight, wildcard', async () => {
  const srv = await startServer({ args: ['--cors-origin', 'http://editor.example', '--api-key', 'k'] });
  try {
    let r = await get(srv, '/v1/completions', { Origin: 'http://editor.example', 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization,content-type' }, 'OPTIONS');
    assert.equal(r.status, 204);
    assert.equal(r.headers.get('access-control-allow-origin'), 'http://editor.example');
    assert.match(r.headers.get('access-control-allow-methods'), /POST/);
    /* the headers asked for are the ones allowed (SDKs add their own, e.g. x-stainless-*) */
    assert.equal(r.headers.get('access-control-allow-headers'), 'authorization,content-type');
    assert.equal(r.headers.get('access-control-max-age'), '600');
    r = await get(srv, '/v1/completions', { Origin: 'http://evil.example', 'Access-Control-Request-Method': 'POST' }, 'OPTIONS');
    assert.equal(r.headers.get('access-control-allow-origin'), null);
    r = await postJSON(srv, '/v1/completions', { prompt: 'x', max_tokens: 1 }, { Origin: 'http://editor.example', Authorization: 'Bearer k' });
    assert.equal(r.status, 200);
    assert.equal(r.headers.get('access-control-allow-origin'), 'http://editor.example');
    /* errors carry CORS headers too, so a browser can read them */
    r = await postJSON(srv, '/v1/completions', { prompt: 'x' }, { Origin: 'http://editor.example' });
    assert.equal(r.status, 401);
    assert.equal(r.headers.get('access-control-allow-origin'), 'http://editor.example');
    r = await get(srv, '/v1/models', { Origin: 'http://evil.example', Authorization: 'Bearer k' });
    assert.equal(r.status, 200);
    assert.equal(r.headers.get('access-control-allow-origin'), null);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
  const any = await startServer({ args: ['--cors-origin', '*'] });
  try {
    const r = await get(any, '/health', { Origin: 'http://anything.example' });
    assert.equal(r.headers.get('access-control-allow-origin'), '*');
  } finally {
    assert.equal((await any.stop()).code, 0);
  }
});

test('bounded queue: 429 with Retry-After when full', async () => {
  const srv = await startServer({ args: ['--parallel', '1', '--queue', '1', '--ctx', '16384'] });
  try {
    /* long enough (16k tokens) to still be running while we look, even on a fast machine */
    const long = { prompt: 'for i in range(', max_tokens: 16000, temperature: 0, stream: true };
    const a = await openStream(srv, long);  /* running (headers come with its first token) */
    const bP = openStream(srv, long);       /* queued */
    await waitMetrics(srv, (m) => m['codemoe_queue_depth'] === 1);
    const r = await postJSON(srv, '/v1/completions', { prompt: 'x', max_tokens: 1 });
    const e = assertErrorShape(r, 429, 'queue full');
    assert.equal(e.type, 'rate_limit_error');
    assert.equal(r.headers.get('retry-after'), '1');
    a.close();
    const b = await bP;
    b.close();
    await waitMetrics(srv, (m) => m['codemoe_requests_running'] === 0 && m['codemoe_queue_depth'] === 0);
    assert.equal((await postJSON(srv, '/v1/completions', { prompt: 'x', max_tokens: 1 })).status, 200);
    const m = await metrics(srv);
    assert.ok(m['codemoe_requests_rejected_total'] >= 1);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('request timeout ends a generation (JSON error, or an error event in a stream)', async () => {
  const srv = await startServer({ args: ['--request-timeout', '0.2', '--ctx', '16384'] });
  try {
    const r = await postJSON(srv, '/v1/completions', { prompt: 'for i in range(', max_tokens: 16000, temperature: 0 });
    const e = assertErrorShape(r, 504, 'timeout');
    assert.equal(e.code, 'timeout');
    const res = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ prompt: 'for i in range(', max_tokens: 16000, temperature: 0, stream: true }) });
    assert.equal(res.status, 200);
    const events = await readSSE(res);
    const last = events[events.length - 1];
    assert.ok(last.error, 'stream should end with an error event: ' + JSON.stringify(last));
    assert.equal(last.error.code, 'timeout');
    await waitMetrics(srv, (m) => m['codemoe_kv_blocks_used'] === 0 && m['codemoe_requests_timed_out_total'] === 2);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('idle and slow connections are closed by --idle-timeout', async () => {
  const srv = await startServer({ args: ['--idle-timeout', '1'] });
  try {
    const t0 = Date.now();
    /* half a request line, then silence */
    let r = await rawRequest(srv.port, ['GET /hea'], { ms: 6000 });
    assert.ok(r.closed, 'partial headers should be cut');
    assert.ok(Date.now() - t0 < 5000);
    /* a slowloris body: headers promise 1000 bytes, 10 arrive */
    r = await rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"prompt":'], { ms: 6000 });
    assert.ok(r.closed, 'stalled body should be cut');
    assert.equal((await get(srv, '/health')).status, 200);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('/health is 503 while the model loads; completions wait for it', async () => {
  const srv = await startServer({ healthy: false, env: { CODEMOE_SERVE_LOAD_DELAY_MS: '1500' } });
  try {
    let r = await get(srv, '/health');
    assert.equal(r.status, 503);
    assert.deepEqual(r.json, { status: 'loading' });
    assertErrorShape(await postJSON(srv, '/v1/completions', { prompt: 'x' }), 503, 'completion while loading');
    r = await get(srv, '/v1/models');
    assert.equal(r.status, 200);
    assert.equal(r.json.data[0].id, 'qwen2-gqa');
    const m = await metrics(srv);
    assert.equal(m['codemoe_model_loaded'], 0);
    await waitMetrics(srv, (x) => x['codemoe_model_loaded'] === 1, 10000);
    assert.equal((await get(srv, '/health')).status, 200);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('a model that fails to load: logged, exit code 1', async () => {
  const srv = await startServer({ healthy: false, modelPath: '/nonexistent/model.gguf' }).catch((e) => ({ err: e }));
  if (srv.err) {
    /* it may exit before the listening line is read; that is also a refusal to serve */
    assert.match(String(srv.err), /did not start|model load failed/);
    return;
  }
  const ex = await srv.exitPromise;
  assert.equal(ex.code, 1);
  assert.ok(srv.logs.some((l) => l.msg === 'model load failed'));
});

test('metrics: names and counts after traffic', async () => {
  const srv = await startServer();
  try {
    const r = await postJSON(srv, '/v1/completions', { prompt: 'hello', max_tokens: 5, temperature: 0 });
    assert.equal(r.status, 200);
    await postJSON(srv, '/v1/completions', '{bad');
    const m = await waitMetrics(srv, (x) => x['codemoe_requests_total{route="completions",status="200"}'] === 1);
    assert.equal(m['codemoe_requests_total{route="completions",status="400"}'], 1);
    assert.ok(m['codemoe_prompt_tokens_total'] >= 1);
    assert.equal(m['codemoe_generated_tokens_total'], r.json.usage.completion_tokens);
    assert.equal(m['codemoe_time_to_first_token_seconds_count'], 1);
    assert.ok(m['codemoe_inter_token_latency_seconds_count'] >= 1);
    assert.ok(m['codemoe_kv_blocks'] > 0);
    assert.equal(m['codemoe_kv_blocks{model="qwen2-gqa"}'], m['codemoe_kv_blocks']); /* labelled by the model's id */
    assert.equal(m['codemoe_kv_blocks_used'], 0);
    for (const k of ['codemoe_queue_depth', 'codemoe_requests_running', 'codemoe_sequences_running', 'codemoe_model_loaded',
      'codemoe_requests_cancelled_total', 'codemoe_decode_steps_total', 'codemoe_request_duration_seconds_count'])
      assert.ok(k in m, k);
    const res = await fetch(srv.base + '/metrics');
    assert.match(res.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('routing statistics: retained by completion id, and in the response on request', async () => {
  const srv = await startServer({ args: ['--routing-retention', '2'] });
  try {
    const ids = [];
    for (let i = 0; i < 3; i++) {
      const r = await postJSON(srv, '/v1/completions', { prompt: 'a' + i, max_tokens: 2, routing: 'summary' });
      assert.equal(r.status, 200, r.text);
      /* the "routing" extension carries the same record the endpoint serves */
      assert.equal(r.json.routing.id, r.json.id);
      assert.equal(r.json.routing.object, 'completion.routing');
      assert.deepEqual(r.json.routing.layers, []); /* a dense model routes nothing */
      ids.push(r.json.id);
    }
    assertErrorShape(await get(srv, `/v1/completions/${ids[0]}/routing`), 404, 'evicted (retention 2)');
    for (const id of ids.slice(1)) {
      const g = await get(srv, `/v1/completions/${id}/routing`);
      assert.equal(g.status, 200);
      assert.equal(g.json.completion_tokens <= 2, true);
    }
    const res = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt: 'x', max_tokens: 2, stream: true, stream_options: { include_usage: true }, routing: 'summary' }) });
    const events = await readSSE(res);
    const usage = events.find((e) => e !== '[DONE]' && e.usage);
    assert.equal(usage.routing.object, 'completion.routing');
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
  /* a hybrid mixture-of-experts model describes its experts and reports per-layer expert counts */
  const moe = await startServer({ model: 'hybrid-max', args: ['--batch', '64'] });
  try {
    const mj = (await get(moe, '/v1/models/hybrid-max')).json;
    assert.equal(mj.moe.kind, 'hybrid', JSON.stringify(mj));
    for (const k of ['experts', 'top_k', 'segment_experts', 'window']) assert.ok(Number.isInteger(mj.moe[k]) && mj.moe[k] > 0, k);
    assert.ok(mj.moe.top_k <= mj.moe.experts);
    assert.ok(mj.moe.shared_expert === null || (mj.moe.shared_expert >= 0 && mj.moe.shared_expert < mj.moe.experts));
    assert.ok(['causal', 'reference'].includes(mj.moe.segment_routing_default));
    assert.equal(mj.moe.segment_route, 'prefix'); /* hybrid-max: no segment.route key */
    /* reference segments score a complete text: refused when the body is parsed, not after queueing */
    for (const body of [{ prompt: 'x', segment_routing: 'reference' }, { prompt: 'x '.repeat(100), max_tokens: 0, segment_routing: 'reference' }]) {
      const bad = await postJSON(moe, '/v1/completions', body);
      assert.equal(bad.status, 400, bad.text);
      assert.equal(bad.json.error.param, 'segment_routing');
      assert.match(bad.json.error.message, /at most 64 tokens/);
    }
    const ok = await postJSON(moe, '/v1/completions', { prompt: 'def f(x):', max_tokens: 0, segment_routing: 'reference', routing: 'summary' });
    assert.equal(ok.status, 200, ok.text);
    assert.ok(ok.json.routing.layers.length > 0);
    const r = await postJSON(moe, '/v1/completions', { prompt: 'def f(x):\n    return x', max_tokens: 4, routing: 'full', temperature: 0 });
    assert.equal(r.status, 200, r.text);
    const rt = r.json.routing;
    assert.ok(rt.layers.length > 0, JSON.stringify(rt));
    const l0 = rt.layers[0];
    const tokSum = (arr, k) => arr.reduce((a, x) => a + x[k], 0);
    if (l0.token) assert.ok(tokSum(l0.token, 'prompt_tokens') >= r.json.usage.prompt_tokens);
    if (l0.token) assert.ok(tokSum(l0.token, 'generated_tokens') >= 1);
    const m = await metrics(moe);
    assert.ok(Object.keys(m).some((k) => k.startsWith('codemoe_expert_tokens_total{')), 'expert load series');
  } finally {
    await moe.stop();
  }
});

/* route "previous" (hybrid-prev-max: window 4, causal top-1): the model says so, and the routing field
 * counts segment experts for the tokens of windows >= 1 only, one per token and layer */
test('hybrid with previous-window segment routing: /v1/models and the routing field', async () => {
  const srv = await startServer({ model: 'hybrid-prev-max' });
  try {
    const mj = (await get(srv, '/v1/models/hybrid-prev-max')).json;
    assert.equal(mj.moe.segment_route, 'previous', JSON.stringify(mj));
    const w = mj.moe.window;
    const r = await postJSON(srv, '/v1/completions', { prompt: 'fn sum(v: &[u64]) -> u64 {\n    v.iter().sum()\n}\n', max_tokens: 6, routing: 'full', temperature: 0 });
    assert.equal(r.status, 200, r.text);
    const n = r.json.usage.prompt_tokens, g = r.json.usage.completion_tokens;
    assert.ok(n > 2 * w, `prompt of ${n} tokens crosses windows`);
    for (const l of r.json.routing.layers) {
      const sum = (k) => l.segment.reduce((a, x) => a + x[k], 0);
      assert.equal(sum('prompt_tokens'), n - w, JSON.stringify(l.segment));
      assert.equal(sum('prompt_tokens') + sum('generated_tokens'), n + g - 1 - w); /* the last token is not fed */
      for (const row of l.segment_windows) assert.ok(row.length === 0 || row[0] === 0, JSON.stringify(l.segment_windows));
    }
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('MoLE language: the request field, else the prompt\'s fences, else the detector; unknown is a 400', async () => {
  const srv = await startServer({ model: 'mole' });
  try {
    const adapters = async (body) => {
      const r = await postJSON(srv, '/v1/completions', { max_tokens: 2, temperature: 0, routing: 'summary', ...body });
      assert.equal(r.status, 200, r.text);
      const by = {};
      for (const a of r.json.routing.adapters) by[a.name] = a.prompt_tokens;
      return by;
    };
    const mj = (await get(srv, '/v1/models/mole')).json;
    assert.equal(mj.moe.kind, 'mole', JSON.stringify(mj));
    for (const l of ['python', 'rust']) assert.ok(mj.moe.languages.includes(l) && mj.moe.adapters.includes(l), l);
    for (const a of ['shared', 'other']) assert.ok(mj.moe.adapters.includes(a) && !mj.moe.languages.includes(a), a);
    const bad = await postJSON(srv, '/v1/completions', { prompt: 'x', language: 'cobol' });
    assert.equal(bad.status, 400, bad.text);
    assert.equal(bad.json.error.param, 'language');
    /* explicit: every prompt token runs {rust, shared}, none {other} */
    let by = await adapters({ prompt: 'def f(x):\n    return x\n', language: 'rust' });
    assert.ok(by.rust > 0 && by.shared > 0 && by.other === 0 && by.python === 0, JSON.stringify(by));
    /* no field, no fences: the detector reads Python */
    by = await adapters({ prompt: 'import os\ndef f(x):\n    return x\n' });
    assert.ok(by.python > 0 && by.other === 0 && by.rust === 0, JSON.stringify(by));
    /* no field, fences: prose is {other}, the fenced code {rust, shared} */
    by = await adapters({ prompt: 'Here is code:\n```rust\nfn main() {}\n' });
    assert.ok(by.other > 0 && by.rust > 0 && by.python === 0, JSON.stringify(by));
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('access log: one JSON line per request with the request id', async () => {
  const srv = await startServer();
  try {
    await get(srv, '/v1/models', { 'X-Request-Id': 'trace-abc' });
    await sleep(50);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
  const line = srv.logs.find((l) => l.msg === 'request' && l.request_id === 'trace-abc');
  assert.ok(line, 'access log line');
  assert.equal(line.status, 200);
  assert.equal(line.path, '/v1/models');
  assert.equal(line.method, 'GET');
  assert.equal(typeof line.duration_ms, 'number');
});

await run();
