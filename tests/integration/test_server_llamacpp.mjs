#!/usr/bin/env node
/*
 * test_server_llamacpp.mjs - llama.cpp's /completion and /infill against the real server, replaying the
 * request bodies llama.vscode and llama.vim send (tests/integration/plugins/llama_requests.json) and
 * checking the fields they read back: content, timings{prompt_n, prompt_ms, predicted_n, predicted_ms,
 * ...}, tokens_cached, truncated, stop/stop_type; llama.vim's response_fields projection ("timings/..."
 * keys) and its warm-up ([""]: an empty object); /completion streamed (SSE, final stop:true) equals
 * not streamed; and that the prefix cache survives the plugins' habit of resending the same input_extra:
 * a short llama.vscode editing trace (warm-up, then one request per typed character) reuses all but
 * the last few prompt tokens (tokens_cached, printed for docs/server.md); stop_type "word" (with
 * stopping_word) and "limit"; n_indent and t_max_predict_ms honoured with llama.cpp's rules. Runs on the chat fixture, which
 * has Qwen2.5-Coder's <|repo_name|> / <|file_sep|> tokens.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, root, test, run } from './server_harness.mjs';

const fx = JSON.parse(readFileSync(join(root, 'tests', 'integration', 'plugins', 'llama_requests.json'), 'utf8'));
let srv;

async function post(path, body) {
  const r = await fetch(srv.base + path, { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body) });
  return { status: r.status, type: r.headers.get('content-type'), text: await r.text() };
}

function checkFull(j, req) {
  assert.equal(typeof j.content, 'string');
  assert.equal(j.stop, true);
  assert.ok(['eos', 'limit', 'word'].includes(j.stop_type));
  assert.equal(typeof j.truncated, 'boolean');
  assert.ok(j.tokens_predicted <= req.n_predict);
  assert.ok(j.tokens_evaluated > 0);
  assert.ok(j.tokens_cached >= 0 && j.tokens_cached < j.tokens_evaluated);
  for (const k of ['prompt_n', 'prompt_ms', 'prompt_per_token_ms', 'prompt_per_second', 'predicted_n', 'predicted_ms',
    'predicted_per_token_ms', 'predicted_per_second']) assert.equal(typeof j.timings[k], 'number', k);
  assert.equal(j.timings.prompt_n + j.tokens_cached, j.tokens_evaluated);
  assert.equal(j.timings.predicted_n, j.tokens_predicted);
}

test('start', async () => {
  srv = await startServer({ model: 'qwen2-chat' });
});

test('llama.vscode: warm-up, then infill with the same input_extra', async () => {
  const w = await post('/infill', fx.llama_vscode_warmup);
  assert.equal(w.status, 200);
  const wj = JSON.parse(w.text);
  assert.equal(wj.tokens_predicted, 0);
  const r = await post('/infill', { ...fx.llama_vscode_infill, n_predict: 12 });
  assert.equal(r.status, 200, r.text);
  assert.match(r.type, /^application\/json/);
  const j = JSON.parse(r.text);
  checkFull(j, { n_predict: 12 });
  assert.equal(j.truncated, false);
  /* the warm-up computed the repository context: this request reuses all of it, up to and including
   * <fim_prefix> (the warm-up's prompt ends <fim_prefix><fim_suffix><fim_middle>) */
  assert.equal(j.tokens_cached, wj.tokens_evaluated - 2, `cached ${j.tokens_cached}, warm-up ${wj.tokens_evaluated}`);
});

test('llama.vim: response_fields projection and its warm-up', async () => {
  const r = await post('/infill', { ...fx.llama_vim_infill, n_predict: 8 });
  assert.equal(r.status, 200, r.text);
  const j = JSON.parse(r.text);
  const want = fx.llama_vim_infill.response_fields;
  assert.deepEqual(Object.keys(j).sort(), [...want].sort());
  assert.equal(typeof j['timings/prompt_n'], 'number');
  assert.equal(typeof j['timings/predicted_per_second'], 'number');
  assert.equal(typeof j.content, 'string');
  assert.equal(j.truncated, false);
  const w = await post('/infill', fx.llama_vim_warmup);
  assert.equal(w.status, 200);
  assert.deepEqual(JSON.parse(w.text), {});
});

test('infill trims to the context and says so', async () => {
  const big = 'x = 1\n'.repeat(200);
  const r = await post('/infill', { ...fx.llama_vscode_infill, input_prefix: big, input_extra: [{ filename: 'big.py', text: big }],
    n_predict: 8, temperature: 0 });
  assert.equal(r.status, 200, r.text);
  const j = JSON.parse(r.text);
  assert.equal(j.truncated, true);
  assert.ok(j.tokens_evaluated + 8 <= 256);
});

test('/completion: streamed == not streamed, stop strings', async () => {
  const req = { ...fx.completion, n_predict: 10 };
  const full = JSON.parse((await post('/completion', req)).text);
  checkFull(full, req);
  const s = await post('/completion', { ...req, stream: true });
  assert.equal(s.status, 200);
  assert.match(s.type, /^text\/event-stream/);
  const events = s.text.split('\n\n').filter((e) => e).map((e) => { assert.ok(e.startsWith('data: ')); return JSON.parse(e.slice(6)); });
  const last = events.pop();
  assert.equal(last.stop, true);
  for (const e of events) assert.equal(e.stop, false);
  assert.equal(events.map((e) => e.content).join(''), full.content);
  assert.equal(last.tokens_predicted, full.tokens_predicted);
  /* token-id prompts, and errors in OpenAI's shape with llama.cpp's parameter names */
  const ids = JSON.parse((await post('/completion', { prompt: [1, 2, 3], n_predict: 2, temperature: 0 })).text);
  assert.equal(ids.tokens_evaluated, 3);
  /* n_predict beyond the context is clamped to what it leaves (no --strict-context here) */
  const clamped = await post('/completion', { prompt: 'x', n_predict: 100000, temperature: 0 });
  assert.equal(clamped.status, 200);
  const cj = JSON.parse(clamped.text);
  assert.equal(cj.stop, true);
  assert.ok(cj.tokens_predicted > 0 && cj.tokens_predicted < 100000);
  const bad = await post('/completion', { prompt: 'x', repeat_penalty: 0 });
  assert.equal(bad.status, 400);
  assert.equal(JSON.parse(bad.text).error.param, 'repeat_penalty');
  const nofim = await post('/infill', { input_prefix: 'a', input_suffix: 'b', repeat_penalty: 0 });
  assert.equal(nofim.status, 400);
  assert.equal(JSON.parse(nofim.text).error.param, 'repeat_penalty');
});

test('prefix cache across a llama.vscode editing trace', async () => {
  const base = { ...fx.llama_vscode_infill, n_predict: 4, temperature: 0 };
  await post('/infill', { ...fx.llama_vscode_warmup });
  const typed = 'math.pi * r';
  const rows = [];
  for (let i = 0; i <= typed.length; i += 2) {
    const j = JSON.parse((await post('/infill', { ...base, prompt: base.prompt + typed.slice(0, i) })).text);
    rows.push({ step: i, evaluated: j.tokens_evaluated, cached: j.tokens_cached, computed: j.timings.prompt_n });
  }
  console.error('editing trace (tokens): ' + JSON.stringify(rows));
  for (const r of rows) {
    /* only the text at the cursor and what follows it (<fim_suffix> suffix <fim_middle>) is recomputed */
    assert.ok(r.computed <= 24, `step ${r.step}: ${r.computed} of ${r.evaluated} prompt tokens recomputed`);
    assert.ok(r.cached >= r.evaluated - 24);
  }
});

test('stop_type: word (with stopping_word), limit', async () => {
  // greedy on this fixture writes newlines, one token each
  const req = { prompt: 'def f(x):\n', n_predict: 12, temperature: 0 };
  const limit = JSON.parse((await post('/completion', req)).text);
  assert.equal(limit.stop_type, 'limit');
  assert.equal(limit.stopping_word, '');
  assert.equal(limit.content, '\n'.repeat(12));
  for (const stream of [false, true]) {
    const r = await post('/completion', { ...req, stop: ['zz', '\n\n\n'], stream });
    const j = stream ? JSON.parse(r.text.trim().split('\n\n').pop().slice(6)) : JSON.parse(r.text);
    assert.equal(j.stop_type, 'word', r.text);
    assert.equal(j.stopping_word, '\n\n\n');
    assert.equal(j.tokens_predicted, 3);
  }
  // "eos" (this fixture never samples its end-of-generation token greedily): tests/api/test_format.c
});

test('n_indent: a later line indented less than n_indent ends the completion', async () => {
  const req = { prompt: 'def f(x):\n', n_predict: 12, temperature: 0 };
  // the second line is empty: its first byte (a newline) sits at column 0; llama.cpp cuts before it
  const j = JSON.parse((await post('/completion', { ...req, n_indent: 4 })).text);
  assert.equal(j.content, '\n');
  assert.equal(j.stop_type, 'limit');
  assert.equal(j.tokens_predicted, 2);
  const inf = JSON.parse((await post('/infill', { ...fx.llama_vscode_infill, ...req, n_indent: 4 })).text);
  assert.ok(inf.tokens_predicted <= 12);
  for (const v of [0, -1, null]) assert.equal(JSON.parse((await post('/completion', { ...req, n_indent: v })).text).tokens_predicted, 12);
  const bad = await post('/completion', { ...req, n_indent: 'four' });
  assert.equal(bad.status, 400);
  assert.equal(JSON.parse(bad.text).error.param, 'n_indent');
});

test('t_max_predict_ms: after the time, the completion ends at the next newline', async () => {
  // 20 ms per step, so the time limit falls in the middle of the completion
  const slow = await startServer({ model: 'qwen2-chat', env: { CODEMOE_SERVE_STEP_DELAY_MS: '20' } });
  try {
    const req = { prompt: 'def f(x):\n', n_predict: 60, temperature: 0 };
    const p = async (body) => JSON.parse(await (await fetch(slow.base + '/completion', { method: 'POST',
      headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) })).text());
    const full = await p(req);
    assert.equal(full.tokens_predicted, 60);
    const j = await p({ ...req, t_max_predict_ms: 200 });
    assert.equal(j.stop_type, 'limit');
    assert.ok(j.tokens_predicted > 1 && j.tokens_predicted < 60, `${j.tokens_predicted} tokens`);
    assert.ok(j.timings.predicted_ms >= 200, `${j.timings.predicted_ms} ms`);
    assert.ok(j.content.endsWith('\n'));
    assert.equal(j.content, full.content.slice(0, j.content.length));
    const bad = await p({ ...req, t_max_predict_ms: 1.5 });
    assert.equal(bad.error.param, 't_max_predict_ms');
  } finally {
    await slow.stop();
  }
});

test('stop', async () => {
  assert.equal((await srv.stop()).code, 0);
});

await run();
