#!/usr/bin/env node
/*
 * test_server_compat.mjs - the server against what editor plugins and SDKs other than openai's send:
 * Tabby's agent (its request shapes replayed from fixtures/tabby_agent_requests.json, its health
 * route, its telemetry events counted in /metrics), Continue's @continuedev/openai-adapters (completion and fimStream), the `ai` SDK with 5 stop
 * strings, LangChain's OpenAI with its default model name, llama.cpp's routes (/tokenize,
 * /detokenize, /props, n_predict), the model-name and context rules (--alias, --strict-model,
 * --strict-context) and CORS preflights as browsers send them.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer, postJSON, root, test, run } from './server_harness.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(root, 'tests', 'js', 'package.json'));
const tabby = JSON.parse(readFileSync(join(here, 'fixtures', 'tabby_agent_requests.json'), 'utf8'));

const get = (srv, path, headers = {}, method = 'GET') => fetch(srv.base + path, { method, headers });

/* The ids of the model's end-of-generation tokens, banned below so that a length limit is what ends a
 * completion (the fixture model is random). */
async function eogBias(srv) {
  const bias = {};
  for (const s of ['<|endoftext|>', '<|im_end|>', '<|fim_pad|>']) {
    const r = await postJSON(srv, '/tokenize', { content: s });
    assert.equal(r.status, 200, r.text);
    if (r.json.tokens.length === 1) bias[r.json.tokens[0]] = -100;
  }
  assert.ok(Object.keys(bias).length > 0, 'the fixture model has an end-of-text token');
  return bias;
}

let srv; /* the default server: one model, lenient names, clamped context */

test('start', async () => {
  srv = await startServer({ args: ['--ctx', '128', '--alias', 'starcoder', '--cors-origin', 'http://editor.example'] });
});

test('Tabby: /v1/health in Tabby\'s shape', async () => {
  const r = await get(srv, '/v1/health');
  assert.equal(r.status, 200);
  const h = await r.json();
  assert.equal(h.model, 'qwen2-gqa');
  assert.equal(h.device, 'cpu');
  for (const k of ['arch', 'cpu_info']) assert.equal(typeof h[k], 'string', k);
  assert.ok(Number.isInteger(h.cpu_count) && h.cpu_count > 0);
  assert.deepEqual(h.cuda_devices, []);
  for (const k of ['build_date', 'build_timestamp', 'git_sha', 'git_describe']) assert.equal(typeof h.version[k], 'string', k);
});

test('Tabby: the agent\'s request shapes complete the code at the cursor', async () => {
  for (const req of tabby.requests) {
    const r = await postJSON(srv, '/v1/completions', req);
    assert.equal(r.status, 200, r.text);
    /* what the agent reads back */
    assert.match(r.json.id, /^cmpl-/);
    assert.equal(r.json.choices.length, 1);
    assert.equal(r.json.choices[0].index, 0);
    assert.equal(typeof r.json.choices[0].text, 'string');
    /* a FIM prompt of prefix and suffix, not an empty one */
    assert.ok(r.json.usage.prompt_tokens > 3, JSON.stringify(r.json.usage));
  }
  /* the same tokens as /v1/completions with prompt + suffix: compare greedy outputs */
  const seg = tabby.requests[0].segments;
  const greedy = { temperature: 0, max_tokens: 8 };
  const a = await postJSON(srv, '/v1/completions', { ...tabby.requests[0], ...greedy });
  const b = await postJSON(srv, '/v1/completions', { prompt: seg.prefix, suffix: seg.suffix, ...greedy });
  assert.equal(a.status, 200, a.text);
  assert.equal(a.json.choices[0].text, b.json.choices[0].text);
  assert.equal(a.json.usage.prompt_tokens, b.json.usage.prompt_tokens);
});

test('Tabby: the agent\'s telemetry (POST /v1/events) is accepted and counted', async () => {
  const count = async () => {
    const text = await (await get(srv, '/metrics')).text();
    const out = {};
    for (const m of text.matchAll(/^codemoe_tabby_events_total\{type="(\w+)"\} (\d+)$/gm)) out[m[1]] = Number(m[2]);
    return out;
  };
  const before = await count();
  for (const ev of tabby.events) {
    const r = await fetch(srv.base + '/v1/events' + (ev.query ? '?' + ev.query : ''), { method: 'POST',
      headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(ev.body) });
    assert.equal(r.status, 200); // what Tabby's server answers; the agent reads the body as text
    assert.equal(await r.text(), '');
  }
  const after = await count();
  const want = { view: 1, select: 2, dismiss: 1 };
  for (const k of Object.keys(want)) assert.equal((after[k] || 0) - (before[k] || 0), want[k], k);
  // not an event: 400 naming the field, counted nowhere
  for (const [body, param, query] of [[{ ...tabby.events[0].body, type: 'click' }, 'type', ''],
    [{ type: 'view', choice_index: 0 }, 'completion_id', ''], [{ ...tabby.events[0].body, choice_index: '0' }, 'choice_index', ''],
    [tabby.events[1].body, 'select_kind', '?select_kind=word']]) {
    const r = await postJSON(srv, '/v1/events' + query, body);
    assert.equal(r.status, 400, r.text);
    assert.equal(r.json.error.param, param);
  }
  assert.deepEqual(await count(), after);
});

test('Continue: @continuedev/openai-adapters completion and fimStream', async () => {
  const { constructLlmApi } = require('@continuedev/openai-adapters');
  const api = constructLlmApi({ provider: 'openai', apiKey: 'unused', apiBase: srv.base + '/v1/' });
  const signal = new AbortController().signal;
  /* tab autocomplete's 12 stop strings, max_tokens beyond the context */
  const stop = ['\n\n', '\r\n\r\n', '/src/', '#- coding: utf-8', '```', '\ndef', '\nclass', '\n"""#', '\nfunction',
    '\nconst', '\nlet', '\nvar'];
  const c = await api.completionNonStream({ model: 'qwen2-gqa', prompt: 'def f(x):\n    return ', max_tokens: 4096,
    temperature: 0.01, stop }, signal);
  assert.equal(typeof c.choices[0].text, 'string');
  assert.ok(['stop', 'length'].includes(c.choices[0].finish_reason));
  let text = '', chunks = 0;
  for await (const chunk of api.fimStream({ model: 'codestral-latest', prompt: 'def f(x):\n    return ', suffix: '\n',
    max_tokens: 6, temperature: 0, stop }, signal)) {
    text += chunk.choices[0].delta.content;
    chunks++;
  }
  assert.ok(chunks > 0);
  /* what the FIM route streamed equals its non-streamed answer */
  const r = await postJSON(srv, '/v1/fim/completions', { prompt: 'def f(x):\n    return ', suffix: '\n', max_tokens: 6,
    temperature: 0, stop });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.object, 'chat.completion');
  assert.equal(r.json.choices[0].message.role, 'assistant');
  assert.equal(text, r.json.choices[0].message.content);
});

test('the ai SDK: 5 stop strings (6 with its own)', async () => {
  const { generateText } = require('ai');
  const { createOpenAI } = require('@ai-sdk/openai');
  const provider = createOpenAI({ baseURL: srv.base + '/v1', apiKey: 'unused' });
  const stops = ['\n\n', '```', 'END', '#', '//'];
  const out = await generateText({ model: provider.completion('qwen2-gqa'), prompt: 'def f(x):', stopSequences: stops,
    maxOutputTokens: 8, temperature: 0 });
  assert.equal(typeof out.text, 'string');
  for (const s of stops) assert.ok(!out.text.includes(s), `stop ${JSON.stringify(s)} in ${JSON.stringify(out.text)}`);
});

test('LangChain OpenAI: its default model name', async () => {
  const { OpenAI } = require('@langchain/openai');
  const llm = new OpenAI({ apiKey: 'unused', configuration: { baseURL: srv.base + '/v1' }, maxTokens: 4, maxRetries: 0 });
  assert.equal(llm.model, 'gpt-3.5-turbo-instruct');
  assert.equal(typeof (await llm.invoke('def f(')), 'string');
});

test('model names: any name while one model is served; aliases listed', async () => {
  for (const model of ['', 'gpt-3.5-turbo-instruct', 'starcoder', 'qwen2-gqa']) {
    const r = await postJSON(srv, '/v1/completions', { model, prompt: 'x', max_tokens: 1 });
    assert.equal(r.status, 200, model + ': ' + r.text);
    assert.equal(r.json.model, 'qwen2-gqa');
  }
  const m = await (await get(srv, '/v1/models')).json();
  assert.deepEqual(m.data[0].aliases, ['starcoder']);
  assert.equal((await get(srv, '/v1/models/starcoder')).status, 200);
  assert.equal((await get(srv, '/v1/models/gpt-4')).status, 404); /* a lookup, not a request's choice */
});

test('context: max_tokens beyond it is clamped and ends with "length"; n_predict; no prompt', async () => {
  const bias = await eogBias(srv);
  let r = await postJSON(srv, '/v1/completions', { prompt: 'def f(x):', max_tokens: 4096, logit_bias: bias, seed: 1 });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.choices[0].finish_reason, 'length');
  assert.equal(r.json.usage.total_tokens, 128);
  r = await postJSON(srv, '/v1/completions', { prompt: 'def f(x):', n_predict: 3, logit_bias: bias });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.usage.completion_tokens, 3);
  r = await postJSON(srv, '/v1/completions', { prompt: 'def f(x):', n_predict: 3, max_tokens: 3 });
  assert.equal(r.status, 400);
  assert.equal(r.json.error.param, 'n_predict');
  r = await postJSON(srv, '/v1/completions', { max_tokens: 3 });
  assert.equal(r.status, 400);
  assert.equal(r.json.error.param, 'prompt');
  r = await postJSON(srv, '/v1/completions', { prompt: 'word '.repeat(200), max_tokens: 1 });
  assert.equal(r.status, 400);
  assert.equal(r.json.error.code, 'context_length_exceeded');
});

test('llama.cpp: /tokenize, /detokenize, /props', async () => {
  let r = await postJSON(srv, '/tokenize', { content: 'def f(x):<|endoftext|>', with_pieces: true });
  assert.equal(r.status, 200, r.text);
  const pieces = r.json.tokens;
  assert.equal(pieces.map((t) => t.piece).join(''), 'def f(x):<|endoftext|>');
  r = await postJSON(srv, '/tokenize', { content: 'def f(x):<|endoftext|>', parse_special: false });
  assert.ok(r.json.tokens.length > pieces.length, 'parse_special false tokenizes the control string as text');
  r = await postJSON(srv, '/detokenize', { tokens: pieces.map((t) => t.id) });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.content, 'def f(x):<|endoftext|>');
  r = await postJSON(srv, '/tokenize', {});
  assert.equal(r.status, 400);
  assert.equal(r.json.error.param, 'content');
  const p = await (await get(srv, '/props')).json();
  assert.equal(p.default_generation_settings.n_ctx, 128);
  assert.equal(p.default_generation_settings.params.n_predict, 16);
  assert.equal(p.total_slots, 4);
  assert.match(p.model_path, /qwen2-gqa\.gguf$/);
  assert.equal(typeof p.chat_template, 'string');
});

test('llama.cpp: /tokenize of a large body (on the thread pool); a client leaving mid-way is harmless', async () => {
  const content = 'def f(x):\n    return x\n'.repeat(40000); /* ~1 MB */
  const r = await postJSON(srv, '/tokenize', { content });
  assert.equal(r.status, 200);
  assert.ok(r.json.tokens.length > 40000);
  const ac = new AbortController();
  const gone = fetch(srv.base + '/detokenize', { method: 'POST', body: JSON.stringify({ tokens: r.json.tokens }),
    headers: { 'Content-Type': 'application/json' }, signal: ac.signal }).catch(() => null);
  ac.abort();
  await gone;
  const again = await postJSON(srv, '/detokenize', { tokens: r.json.tokens.slice(0, 7) });
  assert.equal(again.json.content, 'def f(x):'); /* d, ef, ' f', (, x, ), : */
});

test('CORS: a preflight is answered with the headers it asks for', async () => {
  const asked = 'authorization, content-type, x-api-key, api-key, x-stainless-os, x-stainless-retry-count';
  let r = await get(srv, '/v1/fim/completions', { Origin: 'http://editor.example', 'Access-Control-Request-Method': 'POST',
    'Access-Control-Request-Headers': asked }, 'OPTIONS');
  assert.equal(r.status, 204);
  assert.equal(r.headers.get('access-control-allow-origin'), 'http://editor.example');
  assert.equal(r.headers.get('access-control-allow-headers'), asked);
  assert.equal(r.headers.get('access-control-max-age'), '600');
  /* a header value that is not a list of names is not echoed */
  r = await get(srv, '/v1/completions', { Origin: 'http://editor.example', 'Access-Control-Request-Method': 'POST',
    'Access-Control-Request-Headers': 'x-a\u00ff' }, 'OPTIONS');
  assert.match(r.headers.get('access-control-allow-headers'), /Authorization, Content-Type/);
  /* another origin gets nothing */
  r = await get(srv, '/v1/completions', { Origin: 'http://evil.example', 'Access-Control-Request-Method': 'POST',
    'Access-Control-Request-Headers': asked }, 'OPTIONS');
  assert.equal(r.headers.get('access-control-allow-origin'), null);
  assert.equal(r.headers.get('access-control-allow-headers'), null);
});

test('stop', async () => {
  assert.equal((await srv.stop()).code, 0);
});

test('--strict-model and --strict-context: OpenAI\'s rules', async () => {
  const s = await startServer({ args: ['--ctx', '64', '--alias', 'starcoder', '--strict-model', '--strict-context'] });
  try {
    let r = await postJSON(s, '/v1/completions', { model: 'starcoder', prompt: 'x', max_tokens: 1 });
    assert.equal(r.status, 200, r.text);
    for (const model of ['', 'gpt-3.5-turbo-instruct']) {
      r = await postJSON(s, '/v1/completions', { model, prompt: 'x', max_tokens: 1 });
      assert.equal(r.status, 404, model);
      assert.equal(r.json.error.code, 'model_not_found');
    }
    r = await postJSON(s, '/v1/completions', { prompt: 'x', max_tokens: 4096 });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.code, 'context_length_exceeded');
    assert.equal(r.json.error.param, 'max_tokens');
  } finally {
    assert.equal((await s.stop()).code, 0);
  }
});

test('Tabby on a MoLE model: an editor language id without an adapter is left to detection', async () => {
  const s = await startServer({ model: 'mole' });
  try {
    const req = { language: 'typescriptreact', segments: { prefix: 'const x = ', suffix: ';\n' }, max_tokens: 2 };
    let r = await postJSON(s, '/v1/completions', req);
    assert.equal(r.status, 200, r.text);
    /* the same language on a plain request is the client's explicit choice: a 400 */
    r = await postJSON(s, '/v1/completions', { prompt: 'const x = ', language: 'typescriptreact', max_tokens: 2 });
    assert.equal(r.status, 400);
    assert.equal(r.json.error.param, 'language');
  } finally {
    assert.equal((await s.stop()).code, 0);
  }
});

await run();
