#!/usr/bin/env node
/*
 * test_server_ollama.mjs - Ollama's API against the real server through the official `ollama` npm
 * client: generate with suffix (fill in the middle: the same tokens as /v1/completions with suffix),
 * raw generate, generate through the chat template, chat streamed and not (NDJSON; the streamed text
 * equals the non-streamed one, the last object carries done, done_reason and the counts), options
 * (num_predict, temperature, seed, stop, num_ctx as a smaller context), load requests, list (tags), ps,
 * show and version, Ollama-shaped errors, and the fields this server cannot honour (template, format,
 * images) refused by name.
 */
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { startServer, root, test, run } from './server_harness.mjs';

const require = createRequire(join(root, 'tests', 'js', 'package.json'));
const { Ollama } = require('ollama');

const MODEL = 'qwen2-chat';
let srv, ollama;

async function openai(path, body) {
  const r = await fetch(srv.base + path, { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body) });
  return r.json();
}

test('start', async () => {
  /* --strict-model: the unknown-model cases below test the 404 (one model served otherwise answers any name) */
  srv = await startServer({ model: MODEL, args: ['--strict-model'] });
  ollama = new Ollama({ host: srv.base });
});

test('version, list (tags), ps, show', async () => {
  const v = await ollama.version();
  assert.match(v.version, /^\d+\.\d+\.\d+$/);
  const tags = await ollama.list();
  assert.deepEqual(tags.models.map((m) => m.name), [MODEL]);
  assert.equal(tags.models[0].details.format, 'gguf');
  assert.equal(tags.models[0].details.family, 'qwen2');
  assert.ok(tags.models[0].size > 0);
  const ps = await ollama.ps();
  assert.equal(ps.models[0].name, MODEL);
  assert.equal(ps.models[0].context_length, 256);
  const show = await ollama.show({ model: MODEL });
  assert.ok(show.template.includes('<|im_start|>'), 'the chat template source');
  assert.deepEqual(show.capabilities, ['completion', 'insert', 'chat']);
  assert.equal(show.model_info['qwen2.context_length'], 256);
  await assert.rejects(ollama.show({ model: 'nope' }), (e) => e.status_code === 404 && /not found/.test(e.error));
});

test('generate with suffix is fill in the middle, as /v1/completions with suffix', async () => {
  const req = { prompt: 'def add(a, b):\n    ', suffix: '\n\nprint(add(1, 2))\n' };
  const g = await ollama.generate({ model: MODEL, ...req, stream: false, options: { num_predict: 6, temperature: 0 } });
  assert.equal(g.done, true);
  assert.ok(['stop', 'length'].includes(g.done_reason));
  const c = await openai('/v1/completions', { ...req, max_tokens: 6, temperature: 0 });
  assert.equal(g.response, c.choices[0].text);
  assert.equal(g.eval_count, c.usage.completion_tokens);
  assert.equal(g.prompt_eval_count, c.usage.prompt_tokens);
  assert.ok(g.total_duration >= g.eval_duration && g.eval_duration > 0);
});

test('generate: raw, through the template, streamed == not streamed, options', async () => {
  const raw = await ollama.generate({ model: MODEL, prompt: 'import os\n', raw: true, stream: false,
    options: { num_predict: 5, temperature: 0 } });
  const c = await openai('/v1/completions', { prompt: 'import os\n', max_tokens: 5, temperature: 0 });
  assert.equal(raw.response, c.choices[0].text);
  assert.equal(raw.done_reason, 'length');
  assert.equal(raw.eval_count, 5);
  /* not raw: system + prompt go through the chat template, as /v1/chat/completions */
  const t = await ollama.generate({ model: MODEL, prompt: 'hi', system: 'Be brief.', stream: false,
    options: { num_predict: 4, temperature: 0 } });
  const cc = await openai('/v1/chat/completions', { messages: [{ role: 'system', content: 'Be brief.' },
    { role: 'user', content: 'hi' }], max_tokens: 4, temperature: 0 });
  assert.equal(t.response, cc.choices[0].message.content);
  assert.equal(t.prompt_eval_count, cc.usage.prompt_tokens);
  let text = '', last = null, parts = 0;
  for await (const p of await ollama.generate({ model: MODEL, prompt: 'hi', system: 'Be brief.', stream: true,
    options: { num_predict: 4, temperature: 0 } })) {
    parts++;
    text += p.response;
    last = p;
  }
  assert.ok(parts >= 2);
  assert.equal(text, t.response);
  assert.equal(last.done, true);
  assert.equal(last.eval_count, 4);
  /* seed: reproducible sampling */
  const s1 = await ollama.generate({ model: MODEL, prompt: 'x = ', raw: true, stream: false, options: { num_predict: 6, seed: 5, temperature: 1 } });
  const s2 = await ollama.generate({ model: MODEL, prompt: 'x = ', raw: true, stream: false, options: { num_predict: 6, seed: 5, temperature: 1 } });
  assert.equal(s1.response, s2.response);
  if (raw.response.length >= 2) {
    const stop = raw.response.slice(0, 2);
    const st = await ollama.generate({ model: MODEL, prompt: 'import os\n', raw: true, stream: false,
      options: { num_predict: 5, temperature: 0, stop: [stop] } });
    assert.equal(st.done_reason, 'stop');
    assert.equal(st.response, '');
  }
});

test('chat: streamed == not streamed, as /v1/chat/completions', async () => {
  const messages = [{ role: 'user', content: 'def fib(n):' }];
  const full = await ollama.chat({ model: MODEL, messages, stream: false, options: { num_predict: 6, temperature: 0 } });
  assert.equal(full.message.role, 'assistant');
  assert.equal(full.done, true);
  assert.equal(full.eval_count, 6);
  const cc = await openai('/v1/chat/completions', { messages, max_tokens: 6, temperature: 0 });
  assert.equal(full.message.content, cc.choices[0].message.content);
  let text = '', last = null;
  for await (const p of await ollama.chat({ model: MODEL, messages, stream: true, options: { num_predict: 6, temperature: 0 } })) {
    assert.equal(p.message.role, 'assistant');
    text += p.message.content;
    last = p;
  }
  assert.equal(text, full.message.content);
  assert.equal(last.done, true);
  assert.equal(last.done_reason, 'length');
});

test('load requests (no prompt, no messages) generate nothing: done_reason load', async () => {
  const g = await ollama.generate({ model: MODEL, prompt: '', stream: false });
  assert.equal(g.done, true);
  assert.equal(g.done_reason, 'load');
  assert.equal(g.eval_count, 0);
  assert.equal(g.response, '');
  const c = await ollama.chat({ model: MODEL, messages: [], stream: false });
  assert.equal(c.done_reason, 'load');
  assert.equal(c.eval_count, 0);
});

test('num_ctx: a smaller context for the request; a larger one is the served context', async () => {
  const base = { model: MODEL, prompt: 'def f(x):\n', raw: true, stream: false };
  const full = await ollama.generate({ ...base, options: { num_predict: 100, temperature: 0 } });
  assert.equal(full.eval_count, 100);
  // prompt + completion within num_ctx: the completion gets what is left and ends with "length"
  const capped = await ollama.generate({ ...base, options: { num_predict: 100, num_ctx: 20, temperature: 0 } });
  assert.equal(capped.done_reason, 'length');
  assert.equal(capped.prompt_eval_count + capped.eval_count, 20);
  assert.equal(capped.response, full.response.slice(0, capped.response.length));
  // num_predict -1 (until the context is full) stops at num_ctx too
  const open = await ollama.generate({ ...base, options: { num_predict: -1, num_ctx: 24, temperature: 0 } });
  assert.equal(open.prompt_eval_count + open.eval_count, 24);
  // more than the server runs with: the served context (256) applies
  const big = await ollama.generate({ ...base, options: { num_predict: 100, num_ctx: 1 << 20, temperature: 0 } });
  assert.equal(big.eval_count, 100);
  // a prompt that alone does not fit num_ctx is refused, not cut
  await assert.rejects(ollama.generate({ ...base, prompt: 'x = 1\n'.repeat(20), options: { num_ctx: 8 } }),
    (e) => e.status_code === 400 && /context length is 8 tokens/.test(e.error));
  await assert.rejects(ollama.generate({ ...base, options: { num_ctx: 0 } }),
    (e) => e.status_code === 400 && /num_ctx/.test(e.error));
});

test('template, format and images cannot be honoured: 400 naming the field', async () => {
  await assert.rejects(ollama.generate({ model: MODEL, prompt: 'x', stream: false, template: '{{ .Prompt }}' }),
    (e) => e.status_code === 400 && /'template' is not supported/.test(e.error));
  await assert.rejects(ollama.generate({ model: MODEL, prompt: 'x', stream: false, format: 'json' }),
    (e) => e.status_code === 400 && /'format' is not supported/.test(e.error));
  await assert.rejects(ollama.chat({ model: MODEL, messages: [{ role: 'user', content: 'x' }], stream: false,
    format: { type: 'object', properties: { a: { type: 'string' } } } }),
  (e) => e.status_code === 400 && /'format' is not supported/.test(e.error));
  await assert.rejects(ollama.generate({ model: MODEL, prompt: 'x', stream: false, images: ['aGk='] }),
    (e) => e.status_code === 400 && /'images' is not supported/.test(e.error));
  // empty values say nothing and are accepted
  const g = await ollama.generate({ model: MODEL, prompt: 'x', stream: false, template: '', format: '', images: [],
    options: { num_predict: 2 } });
  assert.equal(g.done, true);
});

test('errors are {"error": "..."}', async () => {
  await assert.rejects(ollama.generate({ model: 'nope', prompt: 'x', stream: false }), (e) => e.status_code === 404 && /nope/.test(e.error));
  await assert.rejects(ollama.chat({ model: MODEL, messages: 'hi', stream: false }), (e) => e.status_code === 400 && /messages/.test(e.error));
  await assert.rejects(ollama.generate({ model: MODEL, prompt: 'x', stream: false, options: { temperature: 'hot' } }),
    (e) => e.status_code === 400 && /temperature/.test(e.error));
});

test('stop', async () => {
  assert.equal((await srv.stop()).code, 0);
});

await run();
