/*
 * server_harness.mjs - spawns the real `codemoe serve` for the integration tests: on 127.0.0.1 with
 * --port 0 (the bound port is read from the "listening" log line), waits for /health 200, collects
 * the JSON log lines, and stops it with a signal, returning the exit code.
 *
 * Environment (set by tests/meson.build): CM_BINARY (the codemoe binary), CM_FIXTURES.
 * Also a tiny test runner: test(name, fn) ... await run() exits 1 if any test failed.
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const root = join(here, '..', '..');
export const fixtures = process.env.CM_FIXTURES || join(root, 'tests', 'fixtures');
export const binary = process.env.CM_BINARY || join(root, 'build', 'server', 'codemoe');

export function modelPath(name = 'qwen2-gqa') {
  return join(fixtures, 'models', name + '.gguf');
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/* Starts a server; opts: {model | modelPath | configPath (--config instead of --model), args: [...],
 * env: {...}, healthy: true (wait for 200)}. */
export async function startServer(opts = {}) {
  const models = opts.configPath ? ['--config', opts.configPath] : ['--model', opts.modelPath || modelPath(opts.model)];
  const args = ['serve', ...models, '--host', '127.0.0.1', '--port', '0', ...(opts.args || [])];
  const child = spawn(binary, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, ...(opts.env || {}) },
  });
  const srv = { child, logs: [], stderr: '', port: 0, exited: null };
  srv.exitPromise = new Promise((resolve) => {
    child.on('exit', (code, signal) => { srv.exited = { code, signal }; resolve(srv.exited); });
  });
  let buf = '';
  let onListen;
  const listening = new Promise((resolve) => { onListen = resolve; });
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    srv.stderr += d;
    buf += d;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let j = null;
      try { j = JSON.parse(line); } catch { /* sanitizer output etc. */ }
      if (j) {
        srv.logs.push(j);
        if (j.msg === 'listening') onListen(j.port);
      }
    }
  });
  const port = await Promise.race([listening, srv.exitPromise.then(() => 0), sleep(20000).then(() => 0)]);
  if (!port) {
    child.kill('SIGKILL');
    throw new Error(`server did not start: ${srv.stderr.slice(-2000)}`);
  }
  srv.port = port;
  srv.base = `http://127.0.0.1:${port}`;
  srv.stop = async (signal = 'SIGTERM', timeoutMs = 30000) => {
    if (!srv.exited) child.kill(signal);
    const r = await Promise.race([srv.exitPromise, sleep(timeoutMs).then(() => null)]);
    if (!r) { child.kill('SIGKILL'); await srv.exitPromise; throw new Error('server did not exit after ' + signal); }
    return r;
  };
  if (opts.healthy !== false) {
    const t0 = Date.now();
    let last = '';
    for (;;) {
      try {
        const r = await fetch(srv.base + '/health', { signal: AbortSignal.timeout(2000) });
        last = `status ${r.status} ${await r.text()}`;
        if (r.status === 200) break;
      } catch (e) { last = String(e && e.cause ? e.cause : e); }
      if (Date.now() - t0 > 30000) {
        await srv.stop('SIGKILL');
        throw new Error(`server never became healthy (last: ${last}); stderr: ${srv.stderr.slice(-3000)}`);
      }
      await sleep(30);
    }
  }
  return srv;
}

/* Sanitizer reports in a server's stderr (an ASan build prints them at exit). */
export function sanitizerReport(srv) {
  const m = srv.stderr.match(/(ERROR: (Address|Leak|Thread|UndefinedBehavior)Sanitizer[\s\S]{0,3000})|(runtime error:[^\n]*)/);
  return m ? m[0] : null;
}

/* Parses Prometheus text into {name{labels}: value}. A model's series (labelled model="id", the first
 * label) are also keyed without that label while only one model has the series (a server of one model
 * reads as before); a series several models have has no such key. */
export async function metrics(srv, headers = {}) {
  const r = await fetch(srv.base + '/metrics', { headers });
  const text = await r.text();
  const out = {};
  const unlabelled = new Map();
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const sp = line.lastIndexOf(' ');
    const key = line.slice(0, sp), v = Number(line.slice(sp + 1));
    out[key] = v;
    const m = key.match(/^([^{]+)\{model="(?:[^"\\]|\\.)*"(,?)(.*)$/);
    if (m) {
      const bare = m[2] ? `${m[1]}{${m[3]}` : m[1];
      unlabelled.set(bare, unlabelled.has(bare) ? null : v);
    }
  }
  for (const [k, v] of unlabelled) if (v !== null && !(k in out)) out[k] = v;
  return out;
}

/* Waits until pred(metrics) holds (or throws after ms). */
export async function waitMetrics(srv, pred, ms = 10000, headers = {}) {
  const t0 = Date.now();
  let m;
  for (;;) {
    m = await metrics(srv, headers);
    if (pred(m)) return m;
    if (Date.now() - t0 > ms) throw new Error('metrics condition not reached: ' + JSON.stringify(m));
    await sleep(25);
  }
}

export async function postJSON(srv, path, body, headers = {}) {
  const r = await fetch(srv.base + path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, headers: r.headers, text, json };
}

/* Reads an SSE response body (fetch Response) into its events: [{data: parsed|'[DONE]'}]. */
export async function readSSE(res, onEvent) {
  const events = [];
  const dec = new TextDecoder();
  let buf = '';
  for await (const chunk of res.body) {
    buf += dec.decode(chunk, { stream: true });
    let k;
    while ((k = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, k);
      buf = buf.slice(k + 2);
      for (const line of block.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const payload = line.slice(6);
        const ev = payload === '[DONE]' ? '[DONE]' : JSON.parse(payload);
        events.push(ev);
        if (onEvent && onEvent(ev) === false) return events;
      }
    }
  }
  return events;
}

/* Sends raw bytes on a TCP connection and collects what comes back until the server closes it (or ms
 * pass). Returns {data, closed, error}. */
export function rawRequest(port, chunks, { ms = 5000, gapMs = 0, end = false } = {}) {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    let data = '';
    let done = false;
    const finish = (closed, error) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      resolve({ data, closed, error });
    };
    const timer = setTimeout(() => finish(false, null), ms);
    sock.on('data', (d) => { data += d.toString('latin1'); });
    sock.on('close', () => finish(true, null));
    sock.on('error', (e) => finish(true, e));
    sock.on('connect', async () => {
      for (const c of chunks) {
        if (sock.destroyed) return;
        sock.write(c);
        if (gapMs) await sleep(gapMs);
      }
      if (end) sock.end();
    });
  });
}

/* ------------------------------------------------------------ runner */

const tests = [];
export function test(name, fn) { tests.push({ name, fn }); }

export async function run() {
  let failed = 0;
  const only = process.env.CM_TEST_ONLY;
  for (const t of tests) {
    if (only && !t.name.includes(only)) continue;
    const t0 = Date.now();
    try {
      await t.fn();
      console.error(`ok   ${t.name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed++;
      console.error(`FAIL ${t.name}: ${e && e.stack ? e.stack : e}`);
    }
  }
  console.error(`${tests.length} tests, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

export { once };
