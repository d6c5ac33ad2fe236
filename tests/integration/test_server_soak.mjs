#!/usr/bin/env node
/*
 * test_server_soak.mjs - about two minutes of mixed traffic on 127.0.0.1 from many connections:
 * valid plain and streamed completions, routing look-ups, malformed bodies, conflicting framing,
 * requests cancelled at random points, and slow clients (dripped headers, slow bodies) that the
 * deadlines cut. It proves that
 * - every request is answered with an expected status, or (the slow and cancelled ones) closed
 *   cleanly: no valid request is dropped or answered 5xx;
 * - the server's resident memory (VmRSS from /proc/PID/status, sampled every second) is flat once
 *   the routing retention store is full: the largest sample of the last third of the run stays within
 *   RSS_MARGIN (15 % + 8 MiB) of the median over the third before it (allocator noise fits in that;
 *   a leak of a few hundred bytes per request over the thousands sent here does not);
 * - no KV block is in use at the end, --kv-check found no inconsistency, and SIGTERM exits 0.
 * CM_SOAK_SECONDS changes the duration (default 110).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { startServer, rawRequest, waitMetrics, sanitizerReport, test, run } from './server_harness.mjs';

const SECONDS = Number(process.env.CM_SOAK_SECONDS || 110);
const WORKERS = 16;
const RSS_MARGIN = (base) => base * 1.15 + 8 * 1024 * 1024;

function rssBytes(pid) {
  const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(/^VmRSS:\s+(\d+) kB/m);
  return m ? Number(m[1]) * 1024 : 0;
}

function median(v) {
  const s = [...v].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function post(body, extra = '') {
  return `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n${extra}Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
}

function statusOf(data) {
  const m = data.match(/^HTTP\/1\.1 (\d{3})/);
  return m ? Number(m[1]) : 0;
}

const PROMPTS = ['def add(a, b):', 'for i in range(', 'import os\n', 'class Stack:\n    def push(self, x):',
  '// quicksort in C\nvoid qs(int *a, int n) {', '<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>'];

test('soak: mixed hostile and valid traffic, flat RSS, no KV left', async () => {
  const srv = await startServer({ args: ['--parallel', '8', '--queue', '64', '--ctx', '1024', '--routing-retention', '64',
    '--idle-timeout', '2', '--header-timeout', '2', '--min-body-rate', '500', '--max-conn-per-ip', '0', '--kv-check'],
    /* in a sanitizer build, freed memory would wait in ASan's quarantine (up to 256 MiB) and look
     * like growth; a release build ignores this */
    env: { ASAN_OPTIONS: [process.env.ASAN_OPTIONS, 'quarantine_size_mb=1'].filter(Boolean).join(':') } });
  const pid = srv.child.pid;
  const stats = { sent: 0, ok: 0, cancelled: 0, cut: 0, byKind: {} };
  const problems = [];
  const ids = [];
  let seed = 7;
  const rnd = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
  const pick = (a) => a[Math.floor(rnd() * a.length)];
  const t0 = Date.now();
  const until = t0 + SECONDS * 1000;
  const samples = [];
  const sampler = setInterval(() => { try { samples.push({ t: Date.now() - t0, rss: rssBytes(pid) }); } catch { /* exited */ } }, 1000);

  const kinds = {
    async plain() {
      const body = JSON.stringify({ prompt: pick(PROMPTS), max_tokens: 1 + Math.floor(rnd() * 24), temperature: rnd(), seed: 1 });
      const r = await rawRequest(srv.port, [post(body)], { ms: 30000 });
      const st = statusOf(r.data);
      if (st !== 200 && st !== 429) return `plain: status ${st} ${r.data.slice(0, 200)}`;
      const id = r.data.match(/"id":"(cmpl-[^"]+)"/);
      if (id && ids.length < 1000) ids.push(id[1]);
      return null;
    },
    async stream() {
      const body = JSON.stringify({ prompt: pick(PROMPTS), max_tokens: 1 + Math.floor(rnd() * 32), stream: true, routing: 'summary',
        stream_options: { include_usage: true } });
      const r = await rawRequest(srv.port, [post(body, 'Connection: close\r\n')], { ms: 30000 });
      const st = statusOf(r.data);
      if (st === 429) return null;
      if (st !== 200 || !r.data.includes('data: [DONE]')) return `stream: status ${st}, ${r.data.slice(-200)}`;
      return null;
    },
    async routing() {
      const id = ids.length ? pick(ids) : 'cmpl-unknown';
      const r = await rawRequest(srv.port, [`GET /v1/completions/${id}/routing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`], { ms: 10000 });
      const st = statusOf(r.data);
      return st === 200 || st === 404 ? null : `routing: status ${st}`;
    },
    async malformed() {
      const body = pick(['{', '{"prompt":', '[]', '{"prompt":"x","max_tokens":-1}', '\u00ff\u0000', '{"prompt":"x","n":0}']);
      const r = await rawRequest(srv.port, [post(body, 'Connection: close\r\n')], { ms: 10000 });
      const st = statusOf(r.data);
      return st === 400 ? null : `malformed: status ${st}`;
    },
    async framing() {
      const r = await rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}GET /health HTTP/1.1\r\n\r\n'], { ms: 10000 });
      const n = (r.data.match(/HTTP\/1\.1 \d{3}/g) || []).length;
      return statusOf(r.data) === 400 && n === 1 && r.closed ? null : `framing: ${r.data.slice(0, 200)}`;
    },
    async cancelled() {
      const body = JSON.stringify({ prompt: 'for i in range(', max_tokens: 400, temperature: 0, stream: rnd() < 0.5 });
      await rawRequest(srv.port, [post(body)], { ms: 5 + rnd() * 300 });
      stats.cancelled++;
      return null;
    },
    async dripHeaders() {
      const r = await rawRequest(srv.port, ['GET /he', 'alth HTTP/1.1\r\n', 'Host: x\r\n', 'X-A: 1\r\n', 'X-B: 2\r\n', 'X-C: 3\r\n'],
        { ms: 8000, gapMs: 700 });
      if (!r.closed) return 'dripped headers: not cut by the header deadline';
      stats.cut++;
      return null;
    },
    async slowBody() {
      const r = await rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n',
        ...Array.from({ length: 12 }, () => '{"prompt":')], { ms: 8000, gapMs: 400 });
      if (!r.closed) return 'slow body: not cut';
      stats.cut++;
      return null;
    },
  };
  const weights = [['plain', 30], ['stream', 20], ['routing', 8], ['malformed', 10], ['framing', 4], ['cancelled', 20],
    ['dripHeaders', 4], ['slowBody', 4]];
  const total = weights.reduce((s, w) => s + w[1], 0);
  const choose = () => { let x = rnd() * total; for (const [k, w] of weights) { if ((x -= w) < 0) return k; } return 'plain'; };

  const worker = async () => {
    while (Date.now() < until) {
      const k = choose();
      stats.sent++;
      stats.byKind[k] = (stats.byKind[k] || 0) + 1;
      const p = await kinds[k]();
      if (p) problems.push(p); else stats.ok++;
    }
  };
  try {
    await Promise.all(Array.from({ length: WORKERS }, worker));
    clearInterval(sampler);
    console.error('soak:', JSON.stringify(stats));
    assert.deepEqual(problems.slice(0, 10), [], `${problems.length} problems`);
    assert.ok(stats.sent > SECONDS * 5, `only ${stats.sent} requests`);
    /* flat memory once the retention store is full (it fills within the first seconds) */
    const third = SECONDS * 1000 / 3;
    const mid = samples.filter((s) => s.t >= third && s.t < 2 * third).map((s) => s.rss);
    const last = samples.filter((s) => s.t >= 2 * third).map((s) => s.rss);
    assert.ok(mid.length >= 3 && last.length >= 3, 'RSS samples');
    const base = median(mid), peak = Math.max(...last);
    console.error(`soak: RSS median middle third ${(base / 1048576).toFixed(1)} MiB, max last third ${(peak / 1048576).toFixed(1)} MiB`);
    assert.ok(peak <= RSS_MARGIN(base), `RSS grew: ${base} -> ${peak}`);
    const m = await waitMetrics(srv, (x) => x['codemoe_sequences_running'] === 0 && x['codemoe_kv_blocks_used'] === 0 &&
      x['codemoe_queue_depth'] === 0, 10000);
    assert.equal(m['codemoe_kv_check_errors'], 0);
    assert.ok(m['codemoe_connections_timed_out_total{phase="headers"}'] + m['codemoe_connections_timed_out_total{phase="body"}'] > 0);
    const ex = await srv.stop('SIGTERM', 20000);
    assert.equal(ex.code, 0);
    assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
  } finally {
    clearInterval(sampler);
    if (!srv.exited) await srv.stop('SIGKILL');
  }
});

await run();
