#!/usr/bin/env node
/*
 * test_server_conn.mjs - hostile connections against the real server (loopback only; the attackers
 * use other loopback source addresses, 127.0.1.x, so that the per-address cap can tell them apart
 * from the normal client on 127.0.0.1):
 * - slowloris: 1100 connections dripping one header byte every 2.5 s do not keep a normal client
 *   out (/health and a completion answer promptly), those beyond the per-address cap get an
 *   immediate JSON 503, and the admitted ones are cut by the header deadline although every byte
 *   restarts the idle timeout; beyond --max-connections a client gets the 503 at once;
 * - a body slower than --min-body-rate is cut;
 * - conflicting framing (two Content-Lengths, Transfer-Encoding with Content-Length) gets one
 *   JSON 400 and the connection closes: the leftover bytes never run as a second request;
 * - an over-long URL or header block gets a JSON 414/431 (below libmicrohttpd's own pool limit);
 * - 200 requests aborted at random points among slow streams are all noticed within about one
 *   engine step (no orphaned generation) and leave no KV block in use;
 * - a client that leaves a started stream is logged as 499 "client_gone" without a library
 *   warning; after SIGKILL a stream ends without [DONE] (what docs/server.md promises).
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { startServer, postJSON, rawRequest, metrics, waitMetrics, sanitizerReport, sleep, test, run } from './server_harness.mjs';

const LOOP_PROMPT = 'for i in range('; /* greedy never ends this one (see test_server_stream.mjs) */

/* A connection from localAddress that sends one byte of a request every gapMs until closed.
 * Returns {connected: Promise, done: Promise<{data, closedAfterMs}>} (closedAfterMs null: still
 * open when stopped). */
function dripper(port, localAddress, gapMs, text = 'GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ' + 'a'.repeat(200)) {
  const sock = net.connect({ port, host: '127.0.0.1', localAddress });
  let data = '';
  let t0 = 0;
  let timer = null;
  let i = 0;
  const connected = new Promise((resolve) => { sock.once('connect', resolve); sock.once('close', resolve); });
  const done = new Promise((resolve) => {
    sock.on('data', (d) => { data += d.toString('latin1'); });
    sock.on('error', () => {});
    sock.on('close', () => { clearInterval(timer); resolve({ data, closedAfterMs: t0 ? Date.now() - t0 : 0 }); });
  });
  sock.once('connect', () => {
    t0 = Date.now();
    sock.write(text[i++]);
    timer = setInterval(() => { if (i < text.length && !sock.destroyed) sock.write(text[i++]); }, gapMs);
  });
  return { connected, done, stop: () => { clearInterval(timer); sock.destroy(); } };
}

function parseResponse(data) {
  const k = data.indexOf('\r\n\r\n');
  const head = k >= 0 ? data.slice(0, k) : data;
  const m = head.match(/^HTTP\/1\.1 (\d{3})/);
  let json = null;
  try { json = JSON.parse(data.slice(k + 4)); } catch { /* not JSON */ }
  return { status: m ? Number(m[1]) : 0, head, json };
}

function assertErrorShape(json, what) {
  assert.ok(json && json.error, `${what}: JSON error body expected, got ${JSON.stringify(json)}`);
  for (const k of ['message', 'type', 'param', 'code']) assert.ok(k in json.error, `${what}: error.${k} missing`);
}

/* p, or a rejection after ms: every wait in these tests is bounded */
function within(p, ms, what) {
  let t;
  return Promise.race([p, new Promise((_, reject) => { t = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(t));
}

async function timed(p) {
  const t0 = Date.now();
  const v = await p;
  return { v, ms: Date.now() - t0 };
}

test('slowloris: 1100 dripping connections do not keep a normal client out', async () => {
  const srv = await startServer({ args: ['--idle-timeout', '3', '--header-timeout', '4', '--max-conn-per-ip', '40',
    '--max-connections', '1024'] });
  const drips = [];
  try {
    /* 20 attacker addresses x 55 connections: 40 admitted per address (800), 300 refused */
    for (let i = 0; i < 1100; i++) drips.push(dripper(srv.port, `127.0.1.${1 + (i % 20)}`, 2500));
    await within(Promise.all(drips.map((d) => d.connected)), 10000, 'drippers connected');
    await sleep(300);
    const h = await timed(within(fetch(srv.base + '/health'), 3000, '/health while connections drip'));
    assert.equal(h.v.status, 200);
    assert.ok(h.ms < 1500, `/health took ${h.ms} ms while connections drip`);
    const c = await timed(within(postJSON(srv, '/v1/completions', { prompt: 'def f(', max_tokens: 4 }), 5000,
      'a completion while connections drip'));
    assert.equal(c.v.status, 200, c.v.text);
    assert.ok(c.ms < 3000, `completion took ${c.ms} ms while connections drip`);
    const m = await metrics(srv);
    /* the admitted drippers are open (and the normal client's connections, at most 3) */
    assert.ok(m['codemoe_tcp_connections'] >= 800 && m['codemoe_tcp_connections'] <= 803, String(m['codemoe_tcp_connections']));
    assert.equal(m['codemoe_connections_rejected_total{reason="max_conn_per_ip"}'], 300);
    /* the refused ones got the documented error at once, not a silent wait */
    const results = await within(Promise.all(drips.map((d) => d.done)), 10000, 'drippers closed');
    const refused = results.filter((r) => r.data.startsWith('HTTP/1.1 503'));
    assert.equal(refused.length, 300);
    const r0 = parseResponse(refused[0].data);
    assertErrorShape(r0.json, 'per-address 503');
    assert.match(r0.head, /\r\nRetry-After: 1/i);
    assert.ok(refused.every((r) => r.closedAfterMs < 2000), 'refused connections are closed at once');
    /* the admitted ones: cut by the header deadline (4 s), although each byte restarts the idle
     * timeout (3 s) */
    const admitted = results.filter((r) => !r.data);
    assert.equal(admitted.length, 800);
    const late = admitted.filter((r) => r.closedAfterMs < 3500 || r.closedAfterMs > 6500);
    assert.equal(late.length, 0, `closed outside [3.5, 6.5] s: ${late.slice(0, 5).map((r) => r.closedAfterMs)}`);
    const m2 = await metrics(srv);
    assert.ok(m2['codemoe_connections_timed_out_total{phase="headers"}'] >= 800);
  } finally {
    drips.forEach((d) => d.stop());
    assert.equal((await srv.stop()).code, 0);
  }
  assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
});

test('beyond --max-connections a client gets an immediate JSON 503', async () => {
  const srv = await startServer({ args: ['--max-connections', '5', '--header-timeout', '30'] });
  const held = [];
  try {
    for (let i = 0; i < 5; i++) held.push(dripper(srv.port, '127.0.0.1', 10000));
    await Promise.all(held.map((d) => d.connected));
    await sleep(100);
    const r = await timed(rawRequest(srv.port, ['GET /health HTTP/1.1\r\nHost: x\r\n\r\n'], { ms: 3000 }));
    const p = parseResponse(r.v.data);
    assert.equal(p.status, 503, r.v.data);
    assertErrorShape(p.json, 'max-connections 503');
    assert.match(p.head, /\r\nRetry-After: 1/i);
    assert.ok(r.v.closed && r.ms < 1000, `answered and closed at once (${r.ms} ms)`);
    held.forEach((d) => d.stop());
    /* their places are free again (the connection asking is the one left) */
    await waitMetrics(srv, (x) => x['codemoe_tcp_connections'] === 1, 5000);
    const ok = await fetch(srv.base + '/health');
    assert.equal(ok.status, 200);
  } finally {
    held.forEach((d) => d.stop());
    await srv.stop();
  }
});

test('the header deadline holds although every byte restarts the idle timeout', async () => {
  const srv = await startServer({ args: ['--idle-timeout', '3', '--header-timeout', '1.5'] });
  try {
    const d = dripper(srv.port, '127.0.0.1', 400);
    const r = await within(d.done, 5000, 'dripper closed').finally(d.stop);
    assert.equal(r.data, '');
    assert.ok(r.closedAfterMs >= 1200 && r.closedAfterMs < 2800, `closed after ${r.closedAfterMs} ms`);
    /* a kept-alive connection gets idle + header timeout for its next request */
    const ka = await rawRequest(srv.port, ['GET /health HTTP/1.1\r\nHost: x\r\n\r\n'], { ms: 1000 });
    assert.equal(parseResponse(ka.data).status, 200);
  } finally {
    await srv.stop();
  }
});

test('a body slower than --min-body-rate is cut; a normal body is not', async () => {
  const srv = await startServer({ args: ['--idle-timeout', '5', '--header-timeout', '1', '--min-body-rate', '200'] });
  try {
    const head = 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n';
    const chunks = [head, ...Array.from({ length: 40 }, () => '          ')]; /* 40 B/s */
    const t0 = Date.now();
    const r = await rawRequest(srv.port, chunks, { ms: 8000, gapMs: 250 });
    const ms = Date.now() - t0;
    assert.ok(r.closed, 'the slow body was cut');
    assert.ok(ms < 3000, `cut after ${ms} ms`);
    const ok = await postJSON(srv, '/v1/completions', { prompt: 'x'.repeat(20000), max_tokens: 1 });
    assert.ok(ok.status === 200 || ok.status === 400, ok.text);
    const m = await metrics(srv);
    assert.equal(m['codemoe_connections_timed_out_total{phase="body"}'], 1);
  } finally {
    await srv.stop();
  }
});

test('conflicting framing: one JSON 400 and the connection closes (no smuggled request)', async () => {
  const srv = await startServer();
  try {
    const smuggled = 'GET /health HTTP/1.1\r\nHost: x\r\n\r\n';
    const cases = [
      'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}' + smuggled,
      'POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n' + smuggled,
      'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n' + smuggled,
    ];
    for (const c of cases) {
      const r = await rawRequest(srv.port, [c], { ms: 3000 });
      const n = (r.data.match(/HTTP\/1\.1 \d{3}/g) || []).length;
      assert.equal(n, 1, `exactly one response for ${JSON.stringify(c.slice(0, 90))}: ${r.data}`);
      const p = parseResponse(r.data);
      assert.equal(p.status, 400, r.data);
      assertErrorShape(p.json, 'framing 400');
      assert.ok(r.closed, 'connection closed');
    }
  } finally {
    await srv.stop();
  }
});

test('an over-long URL or header block gets a JSON 414 / 431', async () => {
  const srv = await startServer();
  try {
    const cases = [
      [`GET /${'a'.repeat(10000)} HTTP/1.1\r\nHost: x\r\n\r\n`, 414],
      [`GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(30000)}\r\n\r\n`, 431],
    ];
    for (const [c, st] of cases) {
      const r = await rawRequest(srv.port, [c], { ms: 3000 });
      const p = parseResponse(r.data);
      assert.equal(p.status, st, r.data.slice(0, 300));
      assertErrorShape(p.json, String(st));
      assert.match(p.head, /content-type: application\/json/i);
    }
  } finally {
    await srv.stop();
  }
});

/* One request aborted at a random point: before the headers end, mid-body, while queued or in
 * prefill, or mid-stream. */
function abortedRequest(port, rnd) {
  const body = JSON.stringify({ prompt: LOOP_PROMPT, max_tokens: 3000, temperature: 0, stream: rnd() < 0.5 });
  const full = `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
  const kind = Math.floor(rnd() * 4);
  if (kind === 0) return rawRequest(port, [full.slice(0, 20)], { ms: 1 + rnd() * 50 });
  if (kind === 1) return rawRequest(port, [full.slice(0, full.length - 5)], { ms: 1 + rnd() * 50 });
  return rawRequest(port, [full], { ms: 1 + rnd() * (kind === 2 ? 40 : 400) });
}

test('200 requests aborted at random points are all noticed within about a step; no KV left', async () => {
  const stepMs = 40;
  const srv = await startServer({ args: ['--parallel', '32', '--queue', '512', '--ctx', '4096', '--kv-check'],
    env: { CODEMOE_SERVE_STEP_DELAY_MS: String(stepMs) } });
  let seed = 12345;
  const rnd = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
  const slow = [];
  try {
    /* slow streams that go on throughout (read as they come) */
    for (let i = 0; i < 6; i++) {
      const ac = new AbortController();
      const res = await fetch(srv.base + '/v1/completions', { method: 'POST', signal: ac.signal,
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt: LOOP_PROMPT, max_tokens: 3000, temperature: 0, stream: true }) });
      assert.equal(res.status, 200);
      const reader = res.body.getReader();
      const pump = (async () => { try { for (;;) { const { done } = await reader.read(); if (done) break; } } catch { /* aborted */ } })();
      slow.push({ ac, pump });
    }
    await waitMetrics(srv, (x) => x['codemoe_sequences_running'] === 6, 5000);
    /* 20 clients, each opening its next request as soon as it dropped the previous one: descriptor
     * numbers are reused while the cancelled generations are still ending */
    await Promise.all(Array.from({ length: 20 }, async () => {
      for (let i = 0; i < 10; i++) await abortedRequest(srv.port, rnd);
    }));
    /* every aborted generation ends within a few steps of the last abort: only the slow streams run */
    const t0 = Date.now();
    const m = await waitMetrics(srv, (x) => x['codemoe_sequences_running'] === 6 && x['codemoe_queue_depth'] === 0, 3000);
    const ms = Date.now() - t0;
    assert.ok(ms < 1000, `aborted generations still ran ${ms} ms after the last abort`);
    assert.ok(m['codemoe_requests_cancelled_total'] >= 50, `cancelled ${m['codemoe_requests_cancelled_total']}`);
    for (const s of slow) s.ac.abort();
    await Promise.all(slow.map((s) => s.pump));
    const end = await waitMetrics(srv, (x) => x['codemoe_sequences_running'] === 0 && x['codemoe_kv_blocks_used'] === 0, 3000);
    assert.equal(end['codemoe_kv_check_errors'], 0);
    const t1 = Date.now();
    const ex = await srv.stop('SIGTERM', 20000);
    assert.equal(ex.code, 0);
    assert.ok(Date.now() - t1 < 5000, 'SIGTERM is not delayed by orphaned generations');
    assert.equal(sanitizerReport(srv), null, sanitizerReport(srv)); /* ASan/UBSan builds: no leak or error */
  } finally {
    for (const s of slow) s.ac.abort();
    if (!srv.exited) await srv.stop('SIGKILL');
  }
});

test('a client leaving a started stream is logged as 499 client_gone, without a library warning', async () => {
  const srv = await startServer({ args: ['--ctx', '4096'], env: { CODEMOE_SERVE_STEP_DELAY_MS: '5' } });
  try {
    const ac = new AbortController();
    const res = await fetch(srv.base + '/v1/completions', { method: 'POST', signal: ac.signal,
      headers: { 'Content-Type': 'application/json', 'X-Request-Id': 'leaver-1' },
      body: JSON.stringify({ prompt: LOOP_PROMPT, max_tokens: 3000, temperature: 0, stream: true }) });
    const reader = res.body.getReader();
    await reader.read();
    ac.abort();
    await waitMetrics(srv, (x) => x['codemoe_requests_cancelled_total'] === 1 && x['codemoe_sequences_running'] === 0, 5000);
    const t0 = Date.now();
    let line;
    while (!(line = srv.logs.find((l) => l.msg === 'request' && l.request_id === 'leaver-1')) && Date.now() - t0 < 3000) await sleep(20);
    assert.ok(line, 'access log line');
    assert.equal(line.status, 499);
    assert.equal(line.outcome, 'client_gone');
    const warn = srv.logs.filter((l) => l.source === 'microhttpd');
    assert.equal(warn.length, 0, JSON.stringify(warn));
  } finally {
    await srv.stop();
  }
});

test('after SIGKILL a stream ends without [DONE] (nothing more can be sent)', async () => {
  const srv = await startServer({ args: ['--ctx', '4096'], env: { CODEMOE_SERVE_STEP_DELAY_MS: '5' } });
  const res = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ prompt: LOOP_PROMPT, max_tokens: 3000, temperature: 0, stream: true }) });
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let text = dec.decode((await reader.read()).value);
  await srv.stop('SIGKILL');
  let ended = 'eof';
  try { for (;;) { const { done, value } = await reader.read(); if (done) break; text += dec.decode(value); } } catch { ended = 'error'; }
  assert.ok(!text.includes('[DONE]'), 'no [DONE] after SIGKILL');
  assert.ok(!text.includes('"error"'), 'no error event either');
  assert.ok(ended === 'error' || ended === 'eof');
});

await run();
