/*
 * test_server_pool.mjs - `codemoe serve` with several models (the pool): requests routed by "model",
 * unknown names 404 once several models are served, every listing names them all, /metrics labelled per
 * model, the thread budget, and models loaded, replaced and unloaded while serving (admin routes and
 * SIGHUP on --config): a stream on an unloaded model completes, later requests 404, and the process's
 * resident memory drops once the model is gone.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { binary, metrics, modelPath, postJSON, readSSE, run, sanitizerReport, sleep, startServer, test, waitMetrics } from './server_harness.mjs';

const QWEN = modelPath('qwen2-gqa');
const LLAMA = modelPath('llama-gqa');
const ADMIN = { Authorization: 'Bearer adm' };
const NO_EOS = { 296: -100 }; /* the fixtures' end-of-text id: streams run to max_tokens */
const dir = mkdtempSync(join(tmpdir(), 'cm-pool-'));

async function get(srv, path, headers = {}) {
  const r = await fetch(srv.base + path, { headers });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, text, json };
}

async function send(srv, method, path, body, headers = ADMIN) {
  const r = await fetch(srv.base + path, {
    method, headers: { 'Content-Type': 'application/json', ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, text, json };
}

const ids = (list) => list.data.map((m) => m.id).sort();

/* Fields of /proc/PID/status in bytes: VmRSS, RssFile. */
function rss(srv) {
  const st = readFileSync(`/proc/${srv.child.pid}/status`, 'utf8');
  const kb = (k) => Number(st.match(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm'))[1]) * 1024;
  return { rss: kb('VmRSS'), file: kb('RssFile') };
}

test('two models: routed by model, 404 for other names, listed everywhere, metrics labelled', async () => {
  const srv = await startServer({ modelPath: QWEN, args: ['--model', `${LLAMA},id=ll,alias=llama-alias,ctx=128,parallel=2`, '--threads', '2'] });
  try {
    const list = await get(srv, '/v1/models');
    assert.deepEqual(ids(list.json), ['ll', 'qwen2-gqa']);
    const ll = list.json.data.find((m) => m.id === 'll');
    assert.deepEqual(ll.aliases, ['llama-alias']);
    assert.equal(ll.architecture, 'llama');
    assert.equal(ll.context_length, 128); /* its own ctx= */
    assert.equal(list.json.data.find((m) => m.id === 'qwen2-gqa').architecture, 'qwen2');
    for (const [model, want] of [['ll', 'll'], ['llama-alias', 'll'], ['qwen2-gqa', 'qwen2-gqa']]) {
      const r = await postJSON(srv, '/v1/completions', { model, prompt: 'hello', max_tokens: 3, temperature: 0 });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.model, want);
    }
    /* the access log names the model each request used */
    await waitFor(() => srv.logs.some((l) => l.msg === 'request' && l.route === 'completions' && l.model === 'll'), 'log');
    /* the same prompt on the two models: each model's own output (greedy, deterministic) */
    const a = await postJSON(srv, '/v1/completions', { model: 'll', prompt: 'the cat', max_tokens: 8, temperature: 0 });
    const b = await postJSON(srv, '/v1/completions', { model: 'qwen2-gqa', prompt: 'the cat', max_tokens: 8, temperature: 0 });
    const solo = await startServer({ modelPath: LLAMA, args: ['--threads', '1'] });
    try {
      const c = await postJSON(solo, '/v1/completions', { prompt: 'the cat', max_tokens: 8, temperature: 0 });
      assert.equal(a.json.choices[0].text, c.json.choices[0].text);
    } finally { await solo.stop(); }
    assert.notEqual(a.json.choices[0].text, b.json.choices[0].text);
    /* several models: a name none has is a 404; no "model" at all: the first model */
    for (const model of ['gpt-3.5-turbo-instruct', '']) {
      const r = await postJSON(srv, '/v1/completions', { model, prompt: 'x', max_tokens: 1 });
      assert.equal(r.status, 404, model);
      assert.equal(r.json.error.code, 'model_not_found');
    }
    const chat = await postJSON(srv, '/v1/chat/completions', { model: 'nope', messages: [{ role: 'user', content: 'x' }] });
    assert.equal(chat.status, 404);
    const none = await postJSON(srv, '/v1/completions', { prompt: 'x', max_tokens: 1 });
    assert.equal(none.status, 200);
    assert.equal(none.json.model, 'qwen2-gqa');
    /* per-model settings: ll runs 2 sequences at most */
    const n3 = await postJSON(srv, '/v1/completions', { model: 'll', prompt: 'x', max_tokens: 1, n: 3 });
    assert.equal(n3.status, 400);
    assert.equal((await postJSON(srv, '/v1/completions', { model: 'qwen2-gqa', prompt: 'x', max_tokens: 1, n: 3 })).status, 200);
    /* tokenizer route and the other dialects' listings */
    const tok = await postJSON(srv, '/tokenize', { model: 'll', content: 'hello' });
    assert.equal(tok.status, 200);
    const tags = await get(srv, '/api/tags');
    assert.deepEqual(tags.json.models.map((m) => m.name).sort(), ['ll', 'qwen2-gqa']);
    assert.equal((await get(srv, '/api/ps')).json.models.length, 2);
    const show = await postJSON(srv, '/api/show', { model: 'll' });
    assert.equal(show.status, 200);
    assert.equal(show.json.model_info['general.architecture'], 'llama');
    const props = await get(srv, '/props?model=ll');
    assert.equal(props.json.model_alias, 'll');
    assert.equal(props.json.total_slots, 2);
    assert.equal((await get(srv, '/props')).json.model_alias, 'qwen2-gqa');
    assert.equal((await get(srv, '/props?model=zz')).status, 404);
    assert.equal((await get(srv, '/v1/models/llama-alias')).json.id, 'll');
    /* metrics: one series per model; the thread budget split 1 + 1 */
    const m = await metrics(srv);
    assert.ok(m['codemoe_generated_tokens_total{model="ll"}'] >= 11);
    assert.ok(m['codemoe_generated_tokens_total{model="qwen2-gqa"}'] >= 11);
    assert.equal(m['codemoe_model_threads{model="ll"}'], 1);
    assert.equal(m['codemoe_model_threads{model="qwen2-gqa"}'], 1);
    assert.equal(m['codemoe_model_loaded{model="ll"}'], 1);
    /* measured off the loop once the model loaded: there shortly */
    await waitMetrics(srv, (x) => x['codemoe_model_mapped_bytes{model="ll"}'] > 0);
    assert.equal(m['codemoe_kv_blocks'], undefined); /* several models: no unlabelled reading */
    const text = await (await fetch(srv.base + '/metrics')).text();
    /* each metric's HELP/TYPE once, its series together */
    const types = text.split('\n').filter((l) => l.startsWith('# TYPE ')).map((l) => l.split(' ')[2]);
    assert.equal(new Set(types).size, types.length);
    let last = null;
    const seen = new Set();
    for (const l of text.split('\n')) {
      if (!l || l[0] === '#') continue;
      const name = l.split(/[{ ]/)[0].replace(/_(bucket|sum|count)$/, '');
      if (name !== last) { assert.ok(!seen.has(name), 'series of ' + name + ' apart'); seen.add(name); last = name; }
    }
  } finally {
    assert.equal((await srv.stop()).code, 0);
    assert.equal(sanitizerReport(srv), null); /* an ASan build: nothing leaked or misused */
  }
});

test('/metrics of a pool of MoE, MoLE and dense models passes promtool check metrics', async () => {
  const srv = await startServer({
    modelPath: modelPath('hybrid-max'),
    args: ['--model', modelPath('mole'), '--model', `${QWEN},id=we"ird\\id`, '--threads', '3'],
  });
  try {
    for (const model of ['hybrid-max', 'mole', 'we"ird\\id'])
      assert.equal((await postJSON(srv, '/v1/completions', { model, prompt: 'def f(x):', max_tokens: 4 })).status, 200, model);
    const text = await (await fetch(srv.base + '/metrics')).text();
    /* promtool from Debian's prometheus package (tests/run.sh installs it): exit 0 and no lint finding */
    const out = execFileSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
    assert.equal(out.trim(), '');
    assert.ok(text.includes('codemoe_expert_tokens_total{model="hybrid-max",level="token",layer="0",expert="0",phase="prompt"}'));
    assert.ok(text.includes('codemoe_adapter_tokens_total{model="mole",adapter="0"'));
    assert.ok(text.includes('codemoe_model_threads{model="we\\"ird\\\\id"} 1'));
  } finally {
    assert.equal((await srv.stop()).code, 0);
    assert.equal(sanitizerReport(srv), null);
  }
});

test('thread budget: models that do not fit do not start; one model takes the whole budget', async () => {
  const out = (() => {
    try {
      execFileSync(binary, ['serve', '--model', QWEN, '--model', `${LLAMA},id=l2`, '--model', `${LLAMA},id=l3`,
        '--threads', '2', '--port', '0'], { stdio: 'pipe', timeout: 20000 });
      return '';
    } catch (e) { return { code: e.status, err: String(e.stderr) }; }
  })();
  assert.equal(out.code, 1);
  assert.match(out.err, /--threads 2 is fewer/);
  /* a name twice */
  const dup = (() => {
    try { execFileSync(binary, ['serve', '--model', QWEN, '--model', `${LLAMA},id=qwen2-gqa`, '--port', '0'], { stdio: 'pipe', timeout: 20000 }); return null; }
    catch (e) { return { code: e.status, err: String(e.stderr) }; }
  })();
  assert.equal(dup.code, 1);
  assert.match(dup.err, /two models are named 'qwen2-gqa'/);
  const srv = await startServer({ modelPath: QWEN, args: ['--threads', '3'] });
  try {
    const m = await metrics(srv);
    assert.equal(m['codemoe_model_threads{model="qwen2-gqa"}'], 3);
  } finally { await srv.stop(); }
});

test('admin: load, unload during a stream, memory returned; only admin keys', async () => {
  /* every token runs all 64 experts: serving reads the whole 12.8 MB file, which the process maps */
  const big = join(dir, 'all64.gguf');
  execFileSync(binary, ['upcycle', QWEN, big, '--experts', '64', '--top-k', '64', '--segment-experts', '0'], { stdio: 'pipe' });
  const srv = await startServer({
    modelPath: `${QWEN},threads=1`, args: ['--model', `${LLAMA},id=ll,threads=1`, '--threads', '4', '--admin-key', 'adm', '--api-key', 'usr'],
    /* streams long enough to unload under; a sanitizer build keeps no freed memory back */
    env: { CODEMOE_SERVE_STEP_DELAY_MS: '5', ASAN_OPTIONS: [process.env.ASAN_OPTIONS, 'quarantine_size_mb=0:release_to_os_interval_ms=0'].filter(Boolean).join(':') },
  });
  try {
    const USER = { Authorization: 'Bearer usr' };
    assert.equal((await send(srv, 'POST', '/admin/models', { path: big, id: 'big' }, USER)).status, 403);
    assert.equal((await send(srv, 'POST', '/admin/models', { path: big, id: 'big' }, {})).status, 401);
    assert.equal((await send(srv, 'GET', '/admin/models', undefined)).status, 405);
    /* budget 4: qwen2-gqa 1, ll 1: two are free */
    const full = await send(srv, 'POST', '/admin/models', { path: big, id: 'big', threads: 3 });
    assert.equal(full.status, 409, full.text);
    assert.match(full.json.error.message, /2 compute threads are free/);
    assert.equal((await send(srv, 'DELETE', '/admin/models/nope')).status, 404);
    const before = rss(srv);
    const bad = await send(srv, 'POST', '/admin/models', { path: join(dir, 'missing.gguf'), id: 'gone', threads: 1 });
    assert.equal(bad.status, 422, bad.text);
    assert.equal(bad.json.error.code, 'model_load_failed');
    assert.equal((await send(srv, 'POST', '/admin/models', { path: big, id: 'qwen2-gqa', threads: 1 })).status, 409); /* name taken */
    assert.equal((await send(srv, 'POST', '/admin/models', { path: big, id: 'big', thread: 1 })).status, 400); /* unknown key */
    const add = await send(srv, 'POST', '/admin/models', { path: big, id: 'big', aliases: ['large'], threads: 1 });
    assert.equal(add.status, 201, add.text);
    assert.equal(add.json.id, 'big');
    assert.equal(add.json.architecture, 'multipl_moe');
    assert.deepEqual(ids((await get(srv, '/v1/models', USER)).json), ['big', 'll', 'qwen2-gqa']);
    /* a stream on big that runs while big is unloaded */
    const res = await fetch(srv.base + '/v1/completions', {
      method: 'POST', headers: { 'Content-Type': 'application/json', ...USER },
      body: JSON.stringify({ model: 'large', prompt: 'for i in range(', max_tokens: 100, stream: true, temperature: 0, logit_bias: NO_EOS }),
    });
    assert.equal(res.status, 200);
    let unloaded = null, peak = { rss: 0, file: 0 }, n = 0;
    const events = await readSSE(res, (ev) => {
      const now = rss(srv);
      if (now.file > peak.file) peak = now;
      if (!unloaded && ev !== '[DONE]' && ++n === 5) unloaded = send(srv, 'DELETE', '/admin/models/big');
    });
    assert.equal((await unloaded).status, 200);
    assert.equal(events[events.length - 1], '[DONE]');
    assert.ok(events.length > 50, 'the stream ran on after the unload: ' + events.length);
    const text = events.filter((e) => e !== '[DONE]').map((e) => e.choices[0].text).join('');
    assert.ok(text.length > 0);
    const fin = events.filter((e) => e !== '[DONE]').map((e) => e.choices[0].finish_reason).filter(Boolean);
    assert.equal(fin.length, 1);
    assert.equal((await send(srv, 'DELETE', '/admin/models/big')).status, 404);
    /* later requests: 404 (two models are left: names are strict) */
    const after = await postJSON(srv, '/v1/completions', { model: 'big', prompt: 'x', max_tokens: 1 }, USER);
    assert.equal(after.status, 404);
    /* its memory goes back: the worker stops, the file is unmapped */
    await waitFor(() => srv.logs.some((l) => l.msg === 'model unloaded' && l.model === 'big'), 'unloaded');
    const now = rss(srv);
    assert.ok(peak.file - now.file > 8e6, `RssFile ${peak.file} -> ${now.file}`);
    /* what it kept of the heap is noise beside the model (a sanitizer's allocator keeps a few MB) */
    const size = statSync(big).size;
    assert.ok(now.rss < before.rss + size / 2, `VmRSS ${before.rss} before the load, ${now.rss} after the unload (file ${size})`);
    const m = await metrics(srv, USER);
    assert.equal(m['codemoe_model_threads{model="big"}'], undefined);
    assert.equal(m['codemoe_model_threads{model="qwen2-gqa"}'], 1);
    /* the one free thread of the budget: a load without threads= takes every free one */
    const ll2 = await send(srv, 'POST', '/admin/models', { path: LLAMA, id: 'll2' });
    assert.equal(ll2.status, 201);
    assert.equal((await metrics(srv, USER))['codemoe_model_threads{model="ll2"}'], 2);
    const del = await send(srv, 'DELETE', '/admin/models/ll');
    assert.deepEqual(del.json, { id: 'll', object: 'model', deleted: true });
  } finally {
    assert.equal((await srv.stop()).code, 0);
    assert.equal(sanitizerReport(srv), null); /* an ASan build: nothing leaked or misused */
  }
});

async function waitFor(pred, what, ms = 10000) {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > ms) throw new Error('timed out waiting for ' + what);
    await sleep(20);
  }
}

test('admin: replace keeps serving; in-flight requests finish on the old instance', async () => {
  const srv = await startServer({
    modelPath: QWEN, args: ['--model', `${LLAMA},id=code,threads=1`, '--threads', '2', '--admin-key', 'adm'],
    env: { CODEMOE_SERVE_STEP_DELAY_MS: '5' },
  });
  try {
    assert.equal((await send(srv, 'PUT', '/admin/models/nope', { path: QWEN })).status, 404);
    assert.equal((await send(srv, 'PUT', '/admin/models/code', { path: QWEN, id: 'other' })).status, 400);
    const res = await fetch(srv.base + '/v1/completions', {
      method: 'POST', headers: { 'Content-Type': 'application/json', ...ADMIN }, /* an admin key is a key */
      body: JSON.stringify({ model: 'code', prompt: 'for i in range(', max_tokens: 100, stream: true, temperature: 0, logit_bias: NO_EOS }),
    });
    let replaced = null;
    const events = await readSSE(res, (ev) => {
      if (!replaced && ev !== '[DONE]') replaced = send(srv, 'PUT', '/admin/models/code', { path: QWEN, ctx: 64 });
    });
    const rep = await replaced;
    assert.equal(rep.status, 200, rep.text);
    assert.equal(rep.json.architecture, 'qwen2');
    assert.equal(rep.json.context_length, 64);
    assert.equal(events[events.length - 1], '[DONE]');
    assert.ok(events.length > 50, 'the old instance finished the stream: ' + events.length);
    const first = events.find((e) => e !== '[DONE]');
    assert.equal(first.model, 'code');
    const list = (await get(srv, '/v1/models', ADMIN)).json;
    assert.deepEqual(ids(list), ['code', 'qwen2-gqa']);
    assert.equal(list.data.find((m) => m.id === 'code').architecture, 'qwen2');
    const r = await postJSON(srv, '/v1/completions', { model: 'code', prompt: 'x', max_tokens: 1 }, ADMIN);
    assert.equal(r.status, 200);
    await waitFor(() => srv.logs.some((l) => l.msg === 'model unloaded' && l.model === 'code'), 'old instance unloaded');
    const m = await metrics(srv, ADMIN);
    assert.equal(m['codemoe_model_threads{model="code"}'], 1); /* the replacement holds the old one's threads */
  } finally {
    assert.equal((await srv.stop()).code, 0);
    assert.equal(sanitizerReport(srv), null); /* an ASan build: nothing leaked or misused */
  }
});

test('admin: a model unloaded while it loads is never served; a replacement loading goes with its model', async () => {
  const srv = await startServer({
    modelPath: `${QWEN},threads=1`, args: ['--threads', '4', '--admin-key', 'adm'],
    env: { CODEMOE_SERVE_LOAD_DELAY_MS: '400' }, /* every load takes this long */
  });
  try {
    const loading = send(srv, 'POST', '/admin/models', { path: LLAMA, id: 'late', threads: 1 });
    await waitFor(() => srv.logs.some((l) => l.msg === 'model loading' && l.model === 'late'), 'load started');
    assert.equal((await send(srv, 'DELETE', '/admin/models/late')).status, 200);
    const r = await loading;
    assert.equal(r.status, 409, r.text);
    assert.match(r.json.error.message, /unloaded while it loaded/);
    await waitFor(() => srv.logs.some((l) => l.msg === 'model unloaded' && l.model === 'late'), 'late unloaded');
    /* a replacement that is loading when its model is unloaded: both go */
    assert.equal((await send(srv, 'POST', '/admin/models', { path: LLAMA, id: 'x', threads: 1 })).status, 201);
    const rep = send(srv, 'PUT', '/admin/models/x', { path: QWEN });
    await waitFor(() => srv.logs.filter((l) => l.msg === 'model loading' && l.model === 'x').length === 2, 'replace started');
    assert.equal((await send(srv, 'DELETE', '/admin/models/x')).status, 200);
    assert.equal((await rep).status, 409);
    const list = (await get(srv, '/v1/models', ADMIN)).json;
    assert.deepEqual(ids(list), ['qwen2-gqa']);
    await waitFor(() => srv.logs.filter((l) => l.msg === 'model unloaded' && l.model === 'x').length === 2, 'both unloaded');
    assert.equal((await metrics(srv, ADMIN))['codemoe_model_threads{model="qwen2-gqa"}'], 1);
  } finally {
    assert.equal((await srv.stop()).code, 0);
    assert.equal(sanitizerReport(srv), null);
  }
});

test('SIGHUP re-reads --config: loads, replaces and unloads to match', async () => {
  const cfg = join(dir, 'pool.json');
  writeFileSync(cfg, JSON.stringify({ models: [{ path: QWEN, id: 'a', threads: 1 }, { path: LLAMA, id: 'b', threads: 1 }] }));
  const srv = await startServer({ configPath: cfg, args: ['--threads', '3'] });
  try {
    assert.deepEqual(ids((await get(srv, '/v1/models')).json), ['a', 'b']);
    /* b goes, c comes, a changes its context */
    writeFileSync(cfg, JSON.stringify({ models: [{ path: QWEN, id: 'a', threads: 1, ctx: 32 }, { path: LLAMA, id: 'c', aliases: ['see'] }] }));
    srv.child.kill('SIGHUP');
    let list;
    const t0 = Date.now();
    for (;;) {
      list = (await get(srv, '/v1/models')).json;
      const a = list.data.find((m) => m.id === 'a');
      if (ids(list).join() === 'a,c' && a && a.context_length === 32 && list.data.every((m) => m.architecture)) break;
      if (Date.now() - t0 > 10000) throw new Error('config not applied: ' + JSON.stringify(list));
      await sleep(50);
    }
    assert.equal((await postJSON(srv, '/v1/completions', { model: 'see', prompt: 'x', max_tokens: 1 })).json.model, 'c');
    assert.equal((await postJSON(srv, '/v1/completions', { model: 'b', prompt: 'x', max_tokens: 1 })).status, 404);
    /* a config that does not parse changes nothing */
    writeFileSync(cfg, '{"models": [');
    srv.child.kill('SIGHUP');
    await waitFor(() => srv.logs.some((l) => l.msg === 'SIGHUP: the config was not applied'), 'refusal logged');
    assert.deepEqual(ids((await get(srv, '/v1/models')).json), ['a', 'c']);
  } finally {
    assert.equal((await srv.stop()).code, 0);
    assert.equal(sanitizerReport(srv), null); /* an ASan build: nothing leaked or misused */
  }
});

test('residency is measured off the loop: a slow measurement never delays a scrape or a request', async () => {
  /* each measurement takes 1.5 s (a test hook); the loop only reads the last figures */
  const srv = await startServer({ modelPath: QWEN, env: { CODEMOE_TEST_RESIDENCY_DELAY_MS: '1500' } });
  try {
    const t0 = Date.now();
    for (let i = 0; i < 5; i++) {
      const t = Date.now();
      await metrics(srv);
      assert.ok(Date.now() - t < 1000, `scrape ${i} took ${Date.now() - t} ms`);
      const r = await postJSON(srv, '/v1/completions', { prompt: 'x', max_tokens: 1 });
      assert.equal(r.status, 200);
    }
    assert.ok(Date.now() - t0 < 1500 * 5, 'scrapes waited for measurements');
    /* the measurement lands: the whole file is mapped, some of it resident */
    const size = statSync(QWEN).size;
    const m = await waitMetrics(srv, (x) => x['codemoe_model_mapped_bytes'] > 0, 10000);
    assert.equal(m['codemoe_model_mapped_bytes'], size);
    assert.ok(m['codemoe_model_resident_bytes'] > 0 && m['codemoe_model_resident_bytes'] <= size + 4096);
  } finally {
    /* a measurement in flight at shutdown ends before the process frees the model */
    assert.equal((await srv.stop()).code, 0);
    assert.equal(sanitizerReport(srv), null);
  }
});

test('--experts-resident: same completions, the cold experts released from the process', async () => {
  /* every token runs all 64 experts of both layers: without a limit the whole file is faulted in */
  const big = join(dir, 'all64-resident.gguf');
  execFileSync(binary, ['upcycle', QWEN, big, '--experts', '64', '--top-k', '64', '--segment-experts', '0'], { stdio: 'pipe' });
  const srv = await startServer({ modelPath: `${big},id=all`, args: ['--model', `${big},id=two,experts-resident=2`, '--threads', '2'] });
  try {
    const body = { prompt: 'the cat sat on the mat', max_tokens: 12, temperature: 0, logit_bias: NO_EOS };
    const a = await postJSON(srv, '/v1/completions', { model: 'all', ...body });
    const b = await postJSON(srv, '/v1/completions', { model: 'two', ...body });
    assert.equal(a.status, 200, a.text);
    assert.equal(b.json.choices[0].text, a.json.choices[0].text);
    /* measured after the requests (a measurement starts at most every 2 s) */
    await sleep(2100);
    await metrics(srv);
    const size = statSync(big).size;
    const m = await waitMetrics(srv, (x) => x['codemoe_model_resident_bytes{model="all"}'] > size / 2 &&
      x['codemoe_model_resident_bytes{model="two"}'] > 0);
    /* 2 of 64 experts per layer: about a thirtieth of the expert bytes, plus attention and embeddings */
    assert.ok(m['codemoe_model_resident_bytes{model="two"}'] < size / 4,
      `resident ${m['codemoe_model_resident_bytes{model="two"}']} of ${size}`);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('--pack-output, --pack-layers: the packed head and layers give the same completions and logprobs; off packs nothing', async () => {
  const q8 = modelPath('qwen2-gqa-q8_0');
  const srv = await startServer({ modelPath: `${q8},id=packed`, args: ['--model', `${q8},id=plain,pack-output=off,pack-layers=off`, '--threads', '2'] });
  try {
    /* four choices decode together: every step takes four logits rows (the packed head's GEMM) and four
     * rows through every layer (the packed layers' GEMM) */
    const body = { prompt: 'the cat sat on the mat', max_tokens: 10, n: 4, temperature: 0.8, seed: 5, logprobs: 3, logit_bias: NO_EOS };
    const a = await postJSON(srv, '/v1/completions', { model: 'packed', ...body });
    const b = await postJSON(srv, '/v1/completions', { model: 'plain', ...body });
    assert.equal(a.status, 200, a.text);
    assert.equal(b.status, 200, b.text);
    assert.deepEqual(a.json.choices.map((c) => [c.text, c.logprobs]), b.json.choices.map((c) => [c.text, c.logprobs]));
    const pack = (id, what) => srv.logs.find((l) => l.msg === 'kv pool' && l.model === id)?.[what];
    for (const what of ['output_pack_mib', 'layers_pack_mib']) {
      assert.ok(pack('packed', what) > 0, `packed: ${what} ${pack('packed', what)}`);
      assert.equal(pack('plain', what), 0, what);
    }
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('per-model default sampling: config and --model keys, a request field wins, shown by /v1/models and /props', async () => {
  const cfg = join(dir, 'defaults.json');
  const want = { temperature: 0.25, top_k: 7, max_tokens: 5, seed: 11, stop: ['\u0001never'] };
  writeFileSync(cfg, JSON.stringify({ models: [{ path: QWEN, id: 'a', threads: 1, ...want }, { path: LLAMA, id: 'b', threads: 1 }] }));
  const srv = await startServer({ configPath: cfg, args: ['--threads', '2', '--admin-key', 'adm'] });
  try {
    const list = (await get(srv, '/v1/models', ADMIN)).json;
    assert.deepEqual(list.data.find((m) => m.id === 'a').defaults, want);
    assert.equal(list.data.find((m) => m.id === 'b').defaults, undefined);
    const props = (await get(srv, '/props?model=a', ADMIN)).json.default_generation_settings.params;
    assert.equal(props.temperature, 0.25);
    assert.equal(props.top_k, 7);
    assert.equal(props.n_predict, 5);
    assert.equal(props.seed, 11);
    assert.deepEqual(props.stop, want.stop);
    /* OpenAI: no max_tokens takes the model's 5 (not 16); the request's own wins */
    for (const [extra, n] of [[{}, 5], [{ max_tokens: 2 }, 2]]) {
      const r = await postJSON(srv, '/v1/completions', { model: 'a', prompt: 'the cat', logit_bias: NO_EOS, ...extra }, ADMIN);
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.usage.completion_tokens, n);
    }
    /* llama.cpp: the model's default wins over llama.cpp's own temperature 0.8; the request's over both */
    let r = await postJSON(srv, '/completion', { model: 'a', prompt: 'the cat' }, ADMIN);
    assert.equal(r.json.generation_settings.temperature, 0.25);
    assert.equal(r.json.generation_settings.top_k, 7);
    assert.equal(r.json.generation_settings.seed, 11);
    r = await postJSON(srv, '/completion', { model: 'a', prompt: 'the cat', temperature: 0.5, top_k: 2 }, ADMIN);
    assert.equal(r.json.generation_settings.temperature, 0.5);
    assert.equal(r.json.generation_settings.top_k, 2);
    /* a model without defaults keeps the dialect's */
    r = await postJSON(srv, '/completion', { model: 'b', prompt: 'the cat', n_predict: 1 }, ADMIN);
    assert.ok(Math.abs(r.json.generation_settings.temperature - 0.8) < 1e-6);
    /* the admin route refuses a default out of range with a 400 naming it */
    const bad = await send(srv, 'POST', '/admin/models', { path: LLAMA, id: 'c', temperature: 9 });
    assert.equal(bad.status, 400, bad.text);
    assert.match(bad.json.error.message, /temperature/);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
  /* --model keys: the same defaults */
  const one = await startServer({ modelPath: `${QWEN},id=q,temperature=0.25,top-k=7,max-tokens=5,seed=11,stop=a\\nb` });
  try {
    assert.deepEqual((await get(one, '/v1/models')).json.data[0].defaults,
      { temperature: 0.25, top_k: 7, max_tokens: 5, seed: 11, stop: ['a\nb'] });
  } finally { await one.stop(); }
  /* a bad default in the config or a --model value stops the start with a message naming it */
  writeFileSync(cfg, JSON.stringify({ models: [{ path: QWEN, top_p: 2 }] }));
  for (const args of [['--config', cfg], ['--model', `${QWEN},min-p=-1`]]) {
    let code = 0, stderr = '';
    try { execFileSync(binary, ['serve', ...args, '--port', '0'], { stdio: 'pipe', timeout: 20000 }); }
    catch (e) { code = e.status; stderr = String(e.stderr); }
    assert.equal(code, 2, args.join(' '));
    assert.match(stderr, /top_p|min_p/);
  }
});

test('--config and --model exclude each other; --model-id names the one model only', async () => {
  const cfg = join(dir, 'one.json');
  writeFileSync(cfg, JSON.stringify({ models: [{ path: QWEN }] }));
  for (const args of [['--config', cfg, '--model', QWEN], ['--model', QWEN, '--model', LLAMA, '--model-id', 'x']]) {
    let code = 0;
    try { execFileSync(binary, ['serve', ...args, '--port', '0'], { stdio: 'pipe', timeout: 20000 }); }
    catch (e) { code = e.status; }
    assert.equal(code, 2, args.join(' '));
  }
});

await run();
rmSync(dir, { recursive: true, force: true });
