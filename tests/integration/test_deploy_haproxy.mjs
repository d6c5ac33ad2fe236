/*
 * test_deploy_haproxy.mjs - the scale-out configuration deploy/haproxy/haproxy.cfg, run for real: three
 * `codemoe serve` replicas and HAProxy on loopback, the config rendered from the deploy/ file (only its
 * bind address, its replica lines and, for the comparison run, its balance line are replaced).
 *
 * Proves:
 * - request ids: a client's valid X-Request-Id reaches the replica (its access log) and the proxy's log;
 *   a missing or invalid one is replaced by the proxy's own, the same in both logs;
 * - the affinity key: X-Codemoe-Affinity, else the Authorization header, else the client address; a
 *   fourth replica added takes about a quarter of the keys and no key moves between the old ones;
 * - per-server maxconn at the replica's parallel + queue keeps its 429s from reaching clients (and a
 *   higher maxconn lets them through, the control);
 * - the IDE typing workload of 16 users (bench/loadgen.mjs's typingUser) through the proxy with affinity:
 *   every user stays on one replica; then one replica is SIGKILLed mid-run: no request hangs (each ends
 *   before its timeout), every request completes or ends with a clean error, users of the surviving
 *   replicas stay where they were and keep their cache hits, and the killed replica's users are served by
 *   another replica from their first or second request after the kill on, with cache hits again;
 * - the same workload with `balance roundrobin` has a lower prefix-cache hit ratio than with affinity
 *   (both figures, and TTFT, are printed: docs/server.md "Scale-out" quotes a run);
 * - streams are not buffered: the first event of a long stream arrives at once;
 * - a 503 from a full replica (its --max-connections reached) is retried on another replica, while a
 *   stream that has started is never replayed: when its replica dies the client sees it cut off.
 *
 * Needs `haproxy` (Debian package, tests/run.sh installs it). CM_LB_SECONDS changes the length of the
 * measured runs (default 10 s each, the kill run twice that).
 */
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import assert from 'node:assert/strict';
import { root, startServer, sleep, metrics, test, run } from './server_harness.mjs';
import { typingUser, summarize } from '../../bench/loadgen.mjs';

const SECONDS = Number(process.env.CM_LB_SECONDS || 10);
const USERS = 16;
const TEMPLATE = join(root, 'deploy', 'haproxy', 'haproxy.cfg');
// a context long enough for code files typed from their middle; the fixture's 256 positions are only
// what it was made with, RoPE runs past them. The KV pool holds about 6000 positions: the prompts of the
// users one replica serves with affinity, not those of all 16 users, which round robin sends everywhere.
const REPLICA_ARGS = ['--ctx', '1024', '--kv-size', '6144', '--threads', '1', '--max-conn-per-ip', '0'];

/* ------------------------------------------------------------ the proxy */

/* The deploy/ config with its replica lines (and, for roundrobin, its balance line) replaced; throws if
 * the template no longer has what it replaces, so a changed template cannot silently go untested. */
function renderConfig(servers, { roundrobin = false, serverOpts = '' } = {}) {
  let cfg = fs.readFileSync(TEMPLATE, 'utf8');
  const re = /(\n[ \t]*# BEGIN replicas\n)[\s\S]*?(\n[ \t]*# END replicas)/;
  assert.match(cfg, re, 'template: no BEGIN/END replicas markers');
  const lines = servers.map((s) => `    server ${s.name} 127.0.0.1:${s.port}${serverOpts ? ' ' + serverOpts : ''}`).join('\n');
  cfg = cfg.replace(re, `$1${lines}$2`);
  if (roundrobin) {
    assert.match(cfg, /\n[ \t]*balance hash var\(txn\.affinity\)\n/, 'template: no affinity balance line');
    cfg = cfg.replace(/\n([ \t]*)balance hash var\(txn\.affinity\)\n/, '\n$1balance roundrobin\n');
  }
  return cfg;
}

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/* Starts HAProxy on a free loopback port in front of the given replicas; waits until every replica has
 * answered through it. Returns {port, base, logs (lines), stop()}. */
async function startProxy(replicas, opts = {}) {
  const dir = fs.mkdtempSync(join(os.tmpdir(), 'codemoe-lb-'));
  const file = join(dir, 'haproxy.cfg');
  fs.writeFileSync(file, renderConfig(replicas, opts));
  const port = await freePort();
  const env = { ...process.env, CODEMOE_LB_BIND: `127.0.0.1:${port}` };
  execFileSync('haproxy', ['-c', '-q', '-f', file], { env, stdio: ['ignore', 'ignore', 'inherit'] });
  const child = spawn('haproxy', ['-db', '-f', file], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const p = { port, base: `http://127.0.0.1:${port}`, logs: [], out: '', child };
  const exited = new Promise((r) => child.on('exit', (code, signal) => r({ code, signal })));
  let buf = '';
  const onData = (d) => {
    p.out += d;
    buf += d;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) { p.logs.push(buf.slice(0, nl)); buf = buf.slice(nl + 1); }
  };
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stdout.on('data', onData);
  child.stderr.on('data', onData);
  p.stop = async () => {
    child.kill('SIGTERM');
    const r = await Promise.race([exited, sleep(10000).then(() => null)]);
    if (!r) { child.kill('SIGKILL'); await exited; }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  // every replica reachable through the proxy (health checks passed): distinct affinity keys until each
  // replica has answered one
  const seen = new Set();
  const t0 = Date.now();
  for (let k = 0; seen.size < replicas.length; k++) {
    if (Date.now() - t0 > 20000) {
      await p.stop();
      throw new Error(`replicas not all reachable through haproxy (saw ${[...seen]}): ${p.out.slice(-2000)}`);
    }
    try {
      const r = await fetch(p.base + '/health', { headers: { 'X-Codemoe-Affinity': `probe${k}` }, signal: AbortSignal.timeout(2000) });
      await r.text();
      if (r.status === 200 && r.headers.get('x-codemoe-replica')) seen.add(r.headers.get('x-codemoe-replica'));
    } catch { /* not up yet */ }
    if (k % 16 === 15) await sleep(100);
  }
  return p;
}

async function startReplicas(n, extra = []) {
  const reps = [];
  for (let i = 0; i < n; i++) {
    const srv = await startServer({ model: 'qwen2-gqa', args: [...REPLICA_ARGS, ...(extra[i] || [])] });
    srv.name = `replica${i + 1}`;
    reps.push(srv);
  }
  return reps;
}

async function stopAll(reps) {
  for (const r of reps) if (!r.exited) await r.stop('SIGKILL');
}

/* ------------------------------------------------------------ the workload */

// Code to type: the project's own C sources, cut at line boundaries into files of a few hundred
// characters of context (the prompt) and a few hundred to type (the solution), as the typing workload's
// HumanEval problems are; byte-level tokens on the fixture, so each stays well inside --ctx.
function codeProblems() {
  const out = [];
  for (const dir of ['engine', 'server', 'api']) {
    for (const f of fs.readdirSync(join(root, dir)).filter((x) => x.endsWith('.c')).sort()) {
      const lines = fs.readFileSync(join(root, dir, f), 'utf8').split('\n');
      let chunk = '';
      for (const l of lines) {
        chunk += l + '\n';
        if (chunk.length >= 700) {
          out.push({ lang: 'c', id: `${dir}/${f}#${out.length}`, prompt: chunk.slice(0, 450), solution: chunk.slice(450, 700) });
          chunk = '';
        }
      }
      if (out.length >= 96) return out;
    }
  }
  return out;
}

/* Runs the typing workload of USERS users through the proxy for `seconds`; at atMs (if given) calls
 * event(records so far). Returns the records (loadgen's, plus `user`), start/end in ms from the run's
 * start. */
async function typing(proxy, seconds, { atMs = null, event = null, affinity = true } = {}) {
  const o = {
    concurrency: USERS, maxTokens: 8, temperature: 0, timeout: 20, seed: 1, model: null,
    typeChars: [1, 4], typeMs: [60, 160], burst: [3, 8], thinkMs: [200, 600],
    userHeaders: affinity ? (u) => ({ 'x-codemoe-affinity': `user${u}` }) : null,
  };
  const target = { host: '127.0.0.1', port: proxy.port, base: '' };
  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  const problems = codeProblems();
  const records = [];
  const t0 = performance.now();
  const claim = () => performance.now() - t0 < seconds * 1000;
  let timer = null;
  if (atMs !== null) timer = setTimeout(() => event(records), atMs);
  await Promise.all(Array.from({ length: USERS }, (_, u) =>
    typingUser(target, agent, o, problems, u, claim, (rec) => records.push({ ...rec, user: u }))));
  clearTimeout(timer);
  agent.destroy();
  for (const r of records) { r.start_ms -= t0; r.end_ms -= t0; }
  records.sort((a, b) => a.start_ms - b.start_ms);
  return records;
}

const stats = (label, recs) => summarize({ label, workload: 'typing', concurrency: USERS, maxTokens: 8, url: 'haproxy' },
  recs, recs.length ? Math.max(...recs.map((r) => r.end_ms)) - Math.min(...recs.map((r) => r.start_ms)) : 0, {}, os.loadavg()[0]);

// clean errors: an HTTP error status, or a connection or stream the proxy closed (a response cut off
// mid-body is Node's "aborted"); never a hang (timeout) or a garbled stream
const CLEAN_ERROR = /^(HTTP 5\d\d|stream ended early|aborted|ECONNRESET|socket hang up|EPIPE)/;

// cached / prompt tokens of the completed requests, as loadgen reports it
const hitRatio = (recs) => stats('', recs).cache_hit_ratio;

/* ------------------------------------------------------------ tests */

test('request ids: kept when valid, made by the proxy otherwise, logged on both sides', async () => {
  const reps = await startReplicas(3);
  const proxy = await startProxy(reps);
  try {
    const ask = async (headers) => {
      const r = await fetch(proxy.base + '/v1/completions', {
        method: 'POST', headers: { 'Content-Type': 'application/json', ...headers },
        body: JSON.stringify({ prompt: 'int main(void) {', max_tokens: 2 }),
      });
      const text = await r.text();
      assert.equal(r.status, 200, text);
      return { id: r.headers.get('x-request-id'), replica: r.headers.get('x-codemoe-replica') };
    };
    const cases = [
      [{ 'X-Request-Id': 'client-id.42:a' }, (id) => assert.equal(id, 'client-id.42:a')],
      [{}, (id) => assert.match(id, /^[0-9A-F]+-[0-9A-F]+-[0-9A-F]+-[0-9A-Fa-f]+$/)],
      [{ 'X-Request-Id': 'bad id with spaces' }, (id) => assert.notEqual(id, 'bad id with spaces')],
      [{ 'X-Request-Id': 'x'.repeat(65) }, (id) => assert.notEqual(id, 'x'.repeat(65))],
    ];
    for (const [headers, check] of cases) {
      const { id, replica } = await ask(headers);
      check(id);
      assert.ok(id.length <= 64 && /^[A-Za-z0-9._:-]+$/.test(id), `proxy id ${id} must pass codemoe's rule`);
      assert.ok(!id.startsWith('req-'), `the replica made its own id ${id}: the proxy's was not accepted`);
      const srv = reps.find((s) => s.name === replica);
      const t0 = Date.now();
      while (!srv.logs.some((l) => l.msg === 'request' && l.request_id === id) ||
             !proxy.logs.some((l) => l.includes(`request_id=${id} `))) {
        if (Date.now() - t0 > 5000) throw new Error(`request id ${id} missing from the ${replica} access log or the proxy log:\n${proxy.logs.slice(-5).join('\n')}`);
        await sleep(50);
      }
    }
  } finally {
    await proxy.stop();
    await stopAll(reps);
  }
});

/* The replica each key lands on, through the proxy (GET /health answers on every replica). */
async function homesOf(proxy, keys, headerOf) {
  const out = new Map();
  for (const k of keys) {
    const r = await fetch(proxy.base + '/health', { headers: headerOf(k) });
    await r.text();
    assert.equal(r.status, 200);
    out.set(k, r.headers.get('x-codemoe-replica'));
  }
  return out;
}

test('affinity keys: the header, else the API key, else the address; a fourth replica moves about a quarter', async () => {
  const reps = await startReplicas(4);
  const three = await startProxy(reps.slice(0, 3));
  let four = null;
  try {
    const keys = Array.from({ length: 200 }, (_, i) => `workspace-${i}`);
    const h = (k) => ({ 'X-Codemoe-Affinity': k });
    const a = await homesOf(three, keys, h);
    assert.deepEqual(await homesOf(three, keys, h), a, 'the same key, the same replica');
    const spread = new Set(a.values());
    assert.equal(spread.size, 3, 'keys spread over the three replicas');
    // without the header: the API key decides, whatever the header-less client's address
    const auth = (k) => ({ Authorization: `Bearer ${k}` });
    const b = await homesOf(three, keys.slice(0, 60), auth);
    assert.deepEqual(await homesOf(three, keys.slice(0, 60), auth), b, 'the same API key, the same replica');
    assert.ok(new Set(b.values()).size > 1, 'API keys spread over replicas');
    // neither: every request from this one address lands on one replica
    const c = await homesOf(three, keys.slice(0, 20), () => ({}));
    assert.equal(new Set(c.values()).size, 1, 'one client address, one replica');
    // an empty header counts as none
    const d = await homesOf(three, keys.slice(0, 60), (k) => ({ ...auth(k), 'X-Codemoe-Affinity': '' }));
    assert.deepEqual(d, b, 'an empty affinity header falls back to the API key');

    four = await startProxy(reps);
    const e = await homesOf(four, keys, h);
    const moved = keys.filter((k) => e.get(k) !== a.get(k));
    for (const k of moved) assert.equal(e.get(k), 'replica4', `${k} moved between old replicas (${a.get(k)} -> ${e.get(k)})`);
    const share = moved.length / keys.length;
    console.error(`adding a fourth replica moved ${moved.length} of ${keys.length} keys (${(100 * share).toFixed(1)}%), all to it`);
    assert.ok(share > 0.1 && share < 0.45, `moved share ${share} (consistent hashing: about 1/4)`);
  } finally {
    if (four) await four.stop();
    await three.stop();
    await stopAll(reps);
  }
});

test("a replica's queue never overflows into 429s: requests beyond maxconn wait in the proxy", async () => {
  // one sequence at a time, one waiting, slow steps: 6 concurrent requests overflow it
  const slow = await startServer({ model: 'qwen2-gqa', args: [...REPLICA_ARGS, '--parallel', '1', '--queue', '1'],
    env: { ...process.env, CODEMOE_SERVE_STEP_DELAY_MS: '20' } });
  slow.name = 'replica1';
  const burst = async (proxy) => {
    const rs = await Promise.all(Array.from({ length: 6 }, () => fetch(proxy.base + '/v1/completions', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt: 'for (int i = 0; i < n; i++)', max_tokens: 12 }),
    }).then(async (x) => { await x.text(); return x.status; })));
    return rs.sort();
  };
  try {
    // the replica's own limit (parallel + queue = 2) as the server's maxconn: all six complete
    let proxy = await startProxy([slow], { serverOpts: 'maxconn 2' });
    try {
      assert.deepEqual(await burst(proxy), [200, 200, 200, 200, 200, 200]);
    } finally { await proxy.stop(); }
    // the control: a maxconn above the replica's limit lets its 429s through
    proxy = await startProxy([slow], { serverOpts: 'maxconn 64' });
    try {
      const st = await burst(proxy);
      assert.ok(st.includes(429), `control: expected 429s without the limit, got ${st}`);
    } finally { await proxy.stop(); }
  } finally {
    await stopAll([slow]);
  }
});

let rrStats = null;
test('round robin (for comparison): the typing workload without affinity', async () => {
  const reps = await startReplicas(3);
  const proxy = await startProxy(reps, { roundrobin: true });
  try {
    const recs = await typing(proxy, SECONDS, { affinity: false });
    const errs = recs.filter((r) => r.outcome === 'error');
    assert.equal(errs.length, 0, `errors: ${JSON.stringify(errs.slice(0, 5).map((r) => r.error))}`);
    const users = new Map();
    for (const r of recs) if (r.served_by) users.set(r.user, new Set([...(users.get(r.user) || []), r.served_by]));
    assert.ok([...users.values()].some((s) => s.size > 1), 'round robin: users should be spread over replicas');
    rrStats = stats('round robin', recs);
  } finally {
    await proxy.stop();
    await stopAll(reps);
  }
});

test('affinity: 16 typing users, one replica killed mid-run', async () => {
  const reps = await startReplicas(3);
  const proxy = await startProxy(reps);
  const killMs = SECONDS * 1000;
  let victim = null;
  try {
    const recs = await typing(proxy, 2 * SECONDS, {
      atMs: killMs,
      // the replica with the most users so far (at least one: 16 keys over 3 replicas)
      event: (sofar) => {
        const n = new Map();
        for (const r of reps) n.set(r.name, 0);
        for (const [, s] of homes(sofar)) if (s) n.set(s, n.get(s) + 1);
        victim = reps.reduce((a, b) => (n.get(b.name) > n.get(a.name) ? b : a));
        victim.child.kill('SIGKILL');
      },
    });
    assert.ok(victim, 'the kill happened');
    const before = recs.filter((r) => r.start_ms < killMs && r.end_ms < killMs);
    const after = recs.filter((r) => r.start_ms >= killMs);

    // nothing hangs, every error is clean, and errors only come from the kill
    console.error(`errors of the run: ${JSON.stringify(stats('all', recs).error_kinds)}`);
    for (const r of recs) {
      assert.ok(r.outcome, 'every request ended');
      assert.notEqual(r.error, 'timeout', `user${r.user}: a request hung (${r.start_ms.toFixed(0)} ms)`);
      if (r.outcome === 'error') assert.match(r.error, CLEAN_ERROR, `user${r.user}: unclean error ${r.error}`);
    }
    assert.equal(before.filter((r) => r.outcome === 'error').length, 0, 'no error before the kill');

    // affinity: one replica per user before the kill
    const home = homes(before);
    for (const [u, s] of home) assert.ok(s, `user${u} was served by several replicas before the kill`);
    assert.equal(home.size, USERS, 'every user was served before the kill');
    const moved = [...home].filter(([, s]) => s === victim.name).map(([u]) => u);
    assert.ok(moved.length > 0, 'the victim had users');

    for (const [u, s] of home) {
      const mine = after.filter((r) => r.user === u && r.outcome !== 'cancelled');
      assert.ok(mine.length >= 2, `user${u}: at least two answered requests after the kill`);
      if (s !== victim.name) {
        // survivors: same replica, no error, cache hits as before
        for (const r of mine) {
          assert.equal(r.outcome, 'ok', `user${u} (on ${s}): ${r.error}`);
          assert.equal(r.served_by, s, `user${u} moved from ${s} to ${r.served_by}`);
        }
        const hb = hitRatio(before.filter((r) => r.user === u)), ha = hitRatio(mine);
        assert.ok(ha >= 0.6 && ha >= hb - 0.2, `user${u} on ${s}: cache hit ratio ${ha} after the kill, ${hb} before`);
      } else {
        // the victim's users: at most their first request after the kill fails; then other replicas
        // serve them. A request retried before the dead replica is out of the ring goes to the ring's
        // next replica after the dead one, which need not be the replica the key maps to once it is out
        // (HAProxy takes the nearer ring neighbour, before or after), so a user may move twice, then
        // settles: one change of replica at most, and cache hits on the last one
        mine.slice(1).forEach((r, i) => assert.equal(r.outcome, 'ok', `user${u}: request ${i + 2} after the kill: ${r.error}`));
        const okr = mine.filter((r) => r.outcome === 'ok');
        for (const r of okr) assert.notEqual(r.served_by, victim.name);
        const moves = okr.filter((r, i) => i > 0 && r.served_by !== okr[i - 1].served_by).length;
        assert.ok(moves <= 1, `user${u}: moved ${moves} times after the kill: ${okr.map((r) => r.served_by)}`);
        const last = okr.filter((r) => r.served_by === okr[okr.length - 1].served_by);
        assert.ok(last.slice(1).some((r) => r.cached_tokens > 0), `user${u}: no cache hit on its new replica`);
        if (moves) console.error(`user${u}: served by ${okr[0].served_by} while ${victim.name} was still in the ring, then by ${last[0].served_by}`);
      }
    }
    const aff = stats('affinity', before);
    const kill = stats('affinity, after the kill', after);
    const table = [rrStats, aff, kill].filter(Boolean).map((s) =>
      `| ${s.label} | ${s.requests} | ${s.ok}/${s.cancelled}/${s.errors} | ${(100 * s.cache_hit_ratio).toFixed(1)}% | ` +
      `${s.ttft_p50_ms.toFixed(1)} | ${s.ttft_p99_ms.toFixed(1)} |`);
    console.error(['| routing | requests | ok/cancelled/error | cache hit | TTFT p50 ms | TTFT p99 ms |',
      '|---|---:|---:|---:|---:|---:|', ...table].join('\n'));
    console.error(`killed ${victim.name} at ${killMs} ms; its ${moved.length} users moved; load ${os.loadavg()[0].toFixed(2)}`);
    if (rrStats) assert.ok(aff.cache_hit_ratio > rrStats.cache_hit_ratio,
      `affinity must beat round robin on cache hits: ${aff.cache_hit_ratio} vs ${rrStats.cache_hit_ratio}`);
  } finally {
    await proxy.stop();
    await stopAll(reps);
  }
});

// user -> the one replica that served it, or null if several did
function homes(recs) {
  const m = new Map();
  for (const r of recs) {
    if (!r.served_by) continue;
    if (!m.has(r.user)) m.set(r.user, r.served_by);
    else if (m.get(r.user) !== r.served_by) m.set(r.user, null);
  }
  return m;
}

test('503 from a full replica is retried elsewhere; a started stream is never replayed', async () => {
  // replica1 takes one connection at a time and steps slowly, so a stream on it holds it full (the
  // proxy keeps no idle connection to it: pool-max-conn 0)
  const slow = { ...process.env, CODEMOE_SERVE_STEP_DELAY_MS: '40' };
  // (--idle-timeout 1: the harness's own kept-alive /health connection must not take that one slot)
  const r1 = await startServer({ model: 'qwen2-gqa', args: [...REPLICA_ARGS, '--max-connections', '1', '--idle-timeout', '1'], env: slow });
  r1.name = 'replica1';
  await sleep(1500);
  const [r2] = await startReplicas(1);
  r2.name = 'replica2';
  const reps = [r1, r2];
  // long check intervals: the retry, not a health check, must move the second request
  const proxy = await startProxy(reps, { serverOpts: 'inter 30s fastinter 30s pool-max-conn 0' });
  try {
    // a key that lands on replica1
    let key = null;
    for (let k = 0; !key && k < 200; k++) {
      const r = await fetch(proxy.base + '/health', { headers: { 'X-Codemoe-Affinity': `k${k}` } });
      await r.text();
      if (r.headers.get('x-codemoe-replica') === 'replica1') key = `k${k}`;
    }
    assert.ok(key, 'no key maps to replica1');
    // the probe's connection to replica1 must be gone (closed, and seen closed by replica1's loop) before
    // the stream takes its one slot
    await sleep(1500);
    const body = (n, stream) => JSON.stringify({ prompt: 'static int add(int a, int b) {', max_tokens: n, stream, temperature: 0 });
    const hdr = { 'Content-Type': 'application/json', 'X-Codemoe-Affinity': key };
    const t0 = Date.now();
    const long = await fetch(proxy.base + '/v1/completions', { method: 'POST', headers: hdr, body: body(200, true) });
    assert.equal(long.status, 200);
    assert.equal(long.headers.get('x-codemoe-replica'), 'replica1');
    const reader = long.body.getReader();
    const first = await reader.read();
    assert.ok(!first.done && first.value.length > 0, 'the stream started');
    // 200 tokens at 40 ms a step take 8 s: the first event must come through long before (no buffering)
    assert.ok(Date.now() - t0 < 3000, `first bytes of the stream after ${Date.now() - t0} ms`);

    // replica1 is full: its accept answers 503; the proxy retries on replica2
    const r = await fetch(proxy.base + '/v1/completions', { method: 'POST', headers: { ...hdr, 'X-Request-Id': 'retried-1' }, body: body(4, false) });
    const text = await r.text();
    assert.equal(r.status, 200, text);
    assert.equal(r.headers.get('x-codemoe-replica'), 'replica2');
    const m1 = await fetch(`${r1.base}/metrics`).then((x) => x.status, (e) => String(e));
    assert.equal(m1, 503, 'replica1 is full: a new connection gets its 503');
    const line = proxy.logs.find((l) => l.includes('request_id=retried-1 '));
    assert.ok(line && / codemoe\/replica2 /.test(line), `proxy log: ${line}`);

    // the started stream's replica dies: the client sees the stream cut, not a fresh one from replica2
    const m2 = await metrics(r2);
    const completions2 = () => Object.entries(m2).filter(([k]) => k.startsWith('codemoe_requests_total{route="completions"')).reduce((s, [, v]) => s + v, 0);
    const before2 = completions2();
    r1.child.kill('SIGKILL');
    let rest = '', cut = false;
    try {
      for (;;) {
        const { done, value } = await Promise.race([reader.read(), sleep(10000).then(() => { throw new Error('stream hung'); })]);
        if (done) break;
        rest += Buffer.from(value).toString();
      }
    } catch (e) {
      if (/hung/.test(e.message)) throw e;
      cut = true;
    }
    assert.ok(cut || !rest.includes('[DONE]'), 'the stream ended without [DONE]');
    assert.ok(!rest.includes('"index":0,"logprobs":null,"finish_reason":"length"'), 'no complete second answer');
    Object.assign(m2, await metrics(r2));
    assert.equal(completions2(), before2, 'replica2 got no replay of the started stream');
  } finally {
    await proxy.stop();
    await stopAll(reps);
  }
});

await run();
