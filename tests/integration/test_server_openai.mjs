#!/usr/bin/env node
/*
 * test_server_openai.mjs - the official `openai` npm client against the real server:
 * completions.create non-streaming and streaming (with suffix/FIM and logprobs), echo, n > 1,
 * stop strings, include_usage, and that the client's typed errors come out of our error bodies
 * (400 BadRequestError with param, 401 AuthenticationError, 404 NotFoundError).
 */
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { startServer, root, test, run } from './server_harness.mjs';

const require = createRequire(join(root, 'tests', 'js', 'package.json'));
const OpenAI = require('openai').default ?? require('openai');

const KEY = 'sk-test-key';

function client(srv, key = KEY) {
  return new OpenAI({ apiKey: key, baseURL: srv.base + '/v1', maxRetries: 0, timeout: 30000 });
}

let srv;

test('start', async () => {
  /* --strict-model: an unknown name is the NotFoundError the client types */
  srv = await startServer({ args: ['--api-key', KEY, '--parallel', '4', '--strict-model'] });
});

test('models.list', async () => {
  const page = await client(srv).models.list();
  const ids = page.data.map((m) => m.id);
  assert.deepEqual(ids, ['qwen2-gqa']);
});

test('completions.create, not streamed, with logprobs', async () => {
  const c = client(srv);
  const r = await c.completions.create({ model: 'qwen2-gqa', prompt: 'def fib(n):', max_tokens: 8, temperature: 0, logprobs: 2 });
  assert.equal(r.object, 'text_completion');
  assert.match(r.id, /^cmpl-/);
  assert.equal(r.choices.length, 1);
  const ch = r.choices[0];
  assert.equal(typeof ch.text, 'string');
  assert.ok(['length', 'stop'].includes(ch.finish_reason));
  assert.equal(ch.logprobs.tokens.length, r.usage.completion_tokens);
  assert.equal(ch.logprobs.token_logprobs.length, ch.logprobs.tokens.length);
  for (const lp of ch.logprobs.token_logprobs) assert.ok(lp <= 0);
  for (const top of ch.logprobs.top_logprobs) assert.ok(Object.keys(top).length >= 1 && Object.keys(top).length <= 2);
  /* tokens that are not whole UTF-8 render as "bytes:\\xNN" (OpenAI's convention) */
  if (!ch.logprobs.tokens.some((t) => t.startsWith('bytes:'))) assert.equal(ch.logprobs.tokens.join(''), ch.text);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
  /* greedy is deterministic */
  const again = await c.completions.create({ model: 'qwen2-gqa', prompt: 'def fib(n):', max_tokens: 8, temperature: 0 });
  assert.equal(again.choices[0].text, ch.text);
});

test('completions.create, streamed with suffix (FIM) and logprobs == not streamed', async () => {
  const c = client(srv);
  const req = { model: 'qwen2-gqa', prompt: 'def add(a, b):\n    ', suffix: '\n\nprint(add(1, 2))\n', max_tokens: 12, temperature: 0, logprobs: 1 };
  const full = await c.completions.create(req);
  const stream = await c.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
  let text = '';
  const tokens = [];
  let finish = null;
  let usage = null;
  let chunks = 0;
  const ids = new Set();
  for await (const chunk of stream) {
    chunks++;
    if (chunk.usage) { usage = chunk.usage; assert.equal(chunk.choices.length, 0); continue; }
    ids.add(chunk.id);
    const ch = chunk.choices[0];
    text += ch.text;
    if (ch.logprobs) tokens.push(...ch.logprobs.tokens);
    if (ch.finish_reason) { assert.equal(finish, null, 'one finish_reason'); finish = ch.finish_reason; }
  }
  assert.ok(chunks >= 2);
  assert.equal(ids.size, 1, 'one id for the whole stream');
  assert.equal(text, full.choices[0].text);
  assert.equal(finish, full.choices[0].finish_reason);
  assert.deepEqual(tokens, full.choices[0].logprobs.tokens);
  assert.ok(usage, 'include_usage chunk');
  assert.equal(usage.completion_tokens, full.usage.completion_tokens);
  assert.equal(usage.prompt_tokens, full.usage.prompt_tokens);
});

test('echo with logprobs, n > 1 with a seed, stop strings', async () => {
  const c = client(srv);
  const e = await c.completions.create({ model: 'qwen2-gqa', prompt: 'x = 1', max_tokens: 3, temperature: 0, echo: true, logprobs: 0 });
  assert.ok(e.choices[0].text.startsWith('x = 1'));
  assert.equal(e.choices[0].logprobs.token_logprobs[0], null);
  const n = await c.completions.create({ model: 'qwen2-gqa', prompt: 'import ', max_tokens: 6, n: 3, seed: 7, temperature: 1 });
  assert.deepEqual(n.choices.map((x) => x.index), [0, 1, 2]);
  const n2 = await c.completions.create({ model: 'qwen2-gqa', prompt: 'import ', max_tokens: 6, n: 3, seed: 7, temperature: 1 });
  assert.deepEqual(n2.choices.map((x) => x.text), n.choices.map((x) => x.text), 'seeded n>1 is reproducible');
  /* a stop string taken from the greedy output itself must cut it there */
  const g = await c.completions.create({ model: 'qwen2-gqa', prompt: 'while True:', max_tokens: 16, temperature: 0 });
  const t = g.choices[0].text;
  if (t.length >= 4) {
    const stop = t.slice(2, 4);
    const s = await c.completions.create({ model: 'qwen2-gqa', prompt: 'while True:', max_tokens: 16, temperature: 0, stop: [stop] });
    assert.equal(s.choices[0].text, t.slice(0, t.indexOf(stop)));
    assert.equal(s.choices[0].finish_reason, 'stop');
  }
});

test('typed client errors', async () => {
  const c = client(srv);
  await assert.rejects(c.completions.create({ model: 'qwen2-gqa', prompt: 'x', temperature: 9 }), (err) => {
    assert.equal(err.status, 400);
    assert.ok(err instanceof OpenAI.BadRequestError);
    assert.equal(err.param, 'temperature');
    return true;
  });
  await assert.rejects(c.completions.create({ model: 'no-such-model', prompt: 'x' }), (err) => {
    assert.equal(err.status, 404);
    assert.ok(err instanceof OpenAI.NotFoundError);
    assert.equal(err.code, 'model_not_found');
    return true;
  });
  await assert.rejects(client(srv, 'wrong').completions.create({ model: 'qwen2-gqa', prompt: 'x' }), (err) => {
    assert.equal(err.status, 401);
    assert.ok(err instanceof OpenAI.AuthenticationError);
    return true;
  });
});

test('stop', async () => {
  assert.equal((await srv.stop()).code, 0);
});

await run();
