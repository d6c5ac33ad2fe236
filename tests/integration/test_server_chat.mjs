#!/usr/bin/env node
/*
 * test_server_chat.mjs - POST /v1/chat/completions against the real server with the chat fixture
 * (qwen2-gqa plus Qwen2.5's chat template and its <|im_start|>/<|im_end|> tokens), through the clients
 * chat tools use: the official `openai` client (streamed and not, logprobs, n, seed, stop,
 * max_completion_tokens, include_usage, typed errors), LangChain's ChatOpenAI, the AI SDK's OpenAI
 * provider (generateText, streamText) and Continue's @continuedev/openai-adapters. It proves that the prompt is the template's rendering
 * (the same text sent to /v1/completions, rendered here by @huggingface/jinja, generates the same
 * tokens), that the template's end-of-turn token ends a choice with finish "stop", and that a model
 * without a template is refused with code model_not_chat_capable.
 */
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, root, test, run } from './server_harness.mjs';

const require = createRequire(join(root, 'tests', 'js', 'package.json'));
const OpenAI = require('openai').default ?? require('openai');
const { Template } = require('@huggingface/jinja');
const { ChatOpenAI } = require('@langchain/openai');
const { generateText, streamText } = require('ai');
const { createOpenAI } = require('@ai-sdk/openai');

const KEY = 'sk-test-key';
const MODEL = 'qwen2-chat';
const messages = [
  { role: 'system', content: 'You complete code.' },
  { role: 'user', content: 'def fib(n):' },
];

let srv, plain, imEnd;

function client(s = srv) {
  return new OpenAI({ apiKey: KEY, baseURL: s.base + '/v1', maxRetries: 0, timeout: 30000 });
}

test('start', async () => {
  /* OpenAI's strict rules: the typed errors below include an unknown model and max_completion_tokens over the context */
  srv = await startServer({ model: MODEL, args: ['--api-key', KEY, '--parallel', '4', '--strict-model', '--strict-context'] });
  plain = await startServer({ args: ['--api-key', KEY] });
  const m = await client().models.retrieve(MODEL);
  imEnd = m.n_vocab - 1; /* the fixture appends <|im_start|>, <|im_end|> */
});

test('chat.completions.create: the prompt is the template rendering, greedy is deterministic', async () => {
  const r = await client().chat.completions.create({ model: MODEL, messages, max_tokens: 8, temperature: 0 });
  assert.equal(r.object, 'chat.completion');
  assert.match(r.id, /^chatcmpl-/);
  assert.equal(r.choices.length, 1);
  const ch = r.choices[0];
  assert.equal(ch.message.role, 'assistant');
  assert.equal(typeof ch.message.content, 'string');
  assert.equal(ch.finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 8);
  /* the same text through /v1/completions, rendered by the reference Jinja implementation */
  const fx = JSON.parse(readFileSync(join(root, 'tests', 'fixtures', 'template', 'qwen2.5.json'), 'utf8'));
  const prompt = new Template(fx.template).render({ messages, add_generation_prompt: true, bos_token: '',
    eos_token: '<|endoftext|>' });
  assert.ok(prompt.endsWith('<|im_start|>assistant\n'));
  const c = await client().completions.create({ model: MODEL, prompt, max_tokens: 8, temperature: 0 });
  assert.equal(c.usage.prompt_tokens, r.usage.prompt_tokens);
  assert.equal(c.choices[0].text, ch.message.content);
  const again = await client().chat.completions.create({ model: MODEL, messages, max_tokens: 8, temperature: 0 });
  assert.equal(again.choices[0].message.content, ch.message.content);
});

test('streamed == not streamed; role first, one finish_reason, include_usage', async () => {
  const req = { model: MODEL, messages, max_completion_tokens: 6, temperature: 0 };
  const full = await client().chat.completions.create(req);
  const stream = await client().chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
  let text = '', finish = null, usage = null, n = 0, role = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) { usage = chunk.usage; assert.equal(chunk.choices.length, 0); continue; }
    const d = chunk.choices[0].delta;
    if (n++ === 0) role = d.role; else assert.equal(d.role, undefined);
    text += d.content ?? '';
    if (chunk.choices[0].finish_reason) { assert.equal(finish, null); finish = chunk.choices[0].finish_reason; }
  }
  assert.equal(role, 'assistant');
  assert.equal(text, full.choices[0].message.content);
  assert.equal(finish, 'length');
  assert.equal(usage.completion_tokens, 6);
  assert.equal(usage.prompt_tokens, full.usage.prompt_tokens);
});

test('the template end-of-turn token ends the choice with finish stop', async () => {
  const r = await client().chat.completions.create({ model: MODEL, messages, max_tokens: 8,
    logit_bias: { [imEnd]: 100 } });
  assert.equal(r.choices[0].finish_reason, 'stop');
  assert.equal(r.choices[0].message.content, '');
  assert.equal(r.usage.completion_tokens, 0);
});

test('logprobs, n with a seed, stop', async () => {
  const r = await client().chat.completions.create({ model: MODEL, messages, max_tokens: 4, logprobs: true,
    top_logprobs: 2, n: 2, seed: 7 });
  assert.equal(r.choices.length, 2);
  for (const ch of r.choices) {
    assert.equal(ch.logprobs.content.length, 4);
    for (const t of ch.logprobs.content) {
      assert.ok(t.logprob <= 0);
      assert.ok(Array.isArray(t.bytes));
      assert.ok(t.top_logprobs.length >= 1 && t.top_logprobs.length <= 2);
    }
  }
  const again = await client().chat.completions.create({ model: MODEL, messages, max_tokens: 4, n: 2, seed: 7 });
  assert.deepEqual(again.choices.map((c) => c.message.content), r.choices.map((c) => c.message.content));
  const greedy = await client().chat.completions.create({ model: MODEL, messages, max_tokens: 8, temperature: 0 });
  const text = greedy.choices[0].message.content;
  if (text.length >= 3) {
    const cut = text.slice(1, 3);
    const s = await client().chat.completions.create({ model: MODEL, messages, max_tokens: 8, temperature: 0, stop: [cut] });
    assert.equal(s.choices[0].finish_reason, 'stop');
    assert.equal(s.choices[0].message.content, text.slice(0, text.indexOf(cut)));
  }
});

test('typed errors: no template, bad messages, top_logprobs without logprobs', async () => {
  await assert.rejects(client(plain).chat.completions.create({ model: 'qwen2-gqa', messages }), (e) => {
    assert.ok(e instanceof OpenAI.BadRequestError);
    assert.equal(e.code, 'model_not_chat_capable');
    assert.equal(e.param, 'messages');
    return true;
  });
  await assert.rejects(client().chat.completions.create({ model: MODEL, messages: [] }), (e) => e.status === 400 && e.param === 'messages');
  await assert.rejects(client().chat.completions.create({ model: MODEL, messages, top_logprobs: 2 }),
    (e) => e.status === 400 && e.param === 'top_logprobs');
  await assert.rejects(client().chat.completions.create({ model: 'nope', messages }), (e) => e instanceof OpenAI.NotFoundError);
  await assert.rejects(client().chat.completions.create({ model: MODEL, messages, max_completion_tokens: 100000 }),
    (e) => e.status === 400 && e.code === 'context_length_exceeded');
});

test('LangChain ChatOpenAI: invoke and stream', async () => {
  const llm = new ChatOpenAI({ model: MODEL, apiKey: KEY, configuration: { baseURL: srv.base + '/v1' }, temperature: 0,
    maxTokens: 6, maxRetries: 0 });
  const want = (await client().chat.completions.create({ model: MODEL, messages, max_tokens: 6, temperature: 0 }))
    .choices[0].message.content;
  const res = await llm.invoke([['system', messages[0].content], ['human', messages[1].content]]);
  assert.equal(res.content, want);
  let text = '';
  for await (const chunk of await llm.stream([['system', messages[0].content], ['human', messages[1].content]]))
    text += chunk.content;
  assert.equal(text, want);
});

test('AI SDK (@ai-sdk/openai chat model): generateText and streamText', async () => {
  const provider = createOpenAI({ apiKey: KEY, baseURL: srv.base + '/v1' });
  const model = provider.chat(MODEL);
  const want = (await client().chat.completions.create({ model: MODEL, messages, max_tokens: 6, temperature: 0 }))
    .choices[0].message.content;
  const g = await generateText({ model, system: messages[0].content, messages: messages.slice(1), maxOutputTokens: 6, temperature: 0, maxRetries: 0 });
  assert.equal(g.text, want);
  assert.equal(g.finishReason, 'length');
  assert.equal(g.usage.outputTokens, 6);
  const s = streamText({ model, system: messages[0].content, messages: messages.slice(1), maxOutputTokens: 6, temperature: 0, maxRetries: 0 });
  let text = '';
  for await (const part of s.textStream) text += part;
  assert.equal(text, want);
});

test('Continue (@continuedev/openai-adapters, provider openai): chat streamed and not, completion', async () => {
  const { constructLlmApi } = await import(require.resolve('@continuedev/openai-adapters'));
  const api = constructLlmApi({ provider: 'openai', apiBase: srv.base + '/v1', apiKey: KEY });
  const req = { model: MODEL, messages, max_tokens: 6, temperature: 0 };
  const want = (await client().chat.completions.create(req)).choices[0].message.content;
  const r = await api.chatCompletionNonStream(req, AbortSignal.timeout(30000));
  assert.equal(r.choices[0].message.content, want);
  let text = '';
  for await (const c of api.chatCompletionStream({ ...req, stream: true }, AbortSignal.timeout(30000)))
    text += c.choices[0]?.delta?.content ?? '';
  assert.equal(text, want);
  const c = await api.completionNonStream({ model: MODEL, prompt: 'def f(', max_tokens: 4, temperature: 0 },
    AbortSignal.timeout(30000));
  assert.equal(c.usage.completion_tokens, 4);
});

test('stop', async () => {
  assert.equal((await srv.stop()).code, 0);
  assert.equal((await plain.stop()).code, 0);
});

await run();
