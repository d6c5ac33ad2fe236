#!/usr/bin/env node
/*
 * test_server_spec.mjs - the scheduler's prompt-lookup speculation and prefill-first order in the real
 * server (server/scheduler.c, docs/server.md "Speculation"):
 * - greedy output with --spec-draft equals the output without, token count, text and finish reason, on
 *   a dense float model and a dense Q8_0 one (where drafts are accepted: the metrics must show it), and
 *   on hybrid, MoLE and qwen3moe models (which do not speculate: the metrics must show no draft); in
 *   streams too, with every max_tokens from 1 to 40 and stop strings taken from the reference text
 *   (so they land inside accepted drafts), and with n = 2 (forked choices speculate on their own);
 *   concurrent streams speculating in one step equal their runs alone (Q8_0: batch invariant);
 * - a short prompt that arrives while a long one is being prefilled in chunks gets its token first
 *   (prefill-first), checked by the order the responses complete in.
 */
import assert from 'node:assert/strict';
import { startServer, postJSON, metrics, readSSE, sanitizerReport, test, run } from './server_harness.mjs';

const THREADS = ['--threads', '1'];

/* Text that repeats itself, as code does: the lookup finds earlier occurrences to draft from. */
const PROMPTS = [
  'def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n\ndef ',
  'for i in range(10):\n    print(i)\nfor j in range(10):\n    print(j)\nfor k in range(',
  'x = 1\ny = 2\nz = 3\nx = 1\ny = 2\n',
  'The quick brown fox',
  /* the same pairs of words continued differently: drafts from here are often wrong (rejected) */
  'a b c a c b b a c c a b a a c b c b a b b c a c a a b c c b a b c a',
];

async function stopClean(srv) {
  const ex = await srv.stop();
  assert.equal(ex.code, 0, 'server exit code');
  const rep = sanitizerReport(srv);
  assert.equal(rep, null, 'sanitizer report: ' + rep);
}

/* One completion: {text, finish, tokens} from a plain or a streamed response. */
async function complete(srv, body) {
  if (!body.stream) {
    const r = await postJSON(srv, '/v1/completions', body);
    assert.equal(r.status, 200, r.text);
    return r.json.choices.map((c) => ({ text: c.text, finish: c.finish_reason, tokens: r.json.usage.completion_tokens }));
  }
  const res = await fetch(srv.base + '/v1/completions', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ ...body, stream_options: { include_usage: true } }),
  });
  assert.equal(res.status, 200);
  const out = [];
  let tokens = 0;
  for (const ev of await readSSE(res)) {
    if (ev === '[DONE]') continue;
    if (ev.usage) tokens = ev.usage.completion_tokens;
    for (const c of ev.choices || []) {
      out[c.index] ??= { text: '', finish: null };
      out[c.index].text += c.text;
      if (c.finish_reason) out[c.index].finish = c.finish_reason;
    }
  }
  return out.map((c) => ({ ...c, tokens }));
}

/* The requests both servers answer: greedy, varied lengths, stop strings cut from the reference
 * server's own output (known only after asking it), streams and forks. */
async function workload(srv, ref) {
  const got = [];
  const ask = async (body) => { got.push(await complete(srv, body)); };
  for (const prompt of PROMPTS) {
    await ask({ prompt, max_tokens: 64, temperature: 0 });
    await ask({ prompt, max_tokens: 64, temperature: 0, stream: true });
    await ask({ prompt, max_tokens: 24, top_k: 1, n: 2 });
  }
  for (let m = 1; m <= 40; m++) await ask({ prompt: PROMPTS[m % PROMPTS.length], max_tokens: m, temperature: 0, stream: m % 2 === 0 });
  /* stop strings from the middle of the reference texts: they end the choice within a step's tokens */
  for (let i = 0; i < PROMPTS.length; i++) {
    const text = ref ? ref[i * 3][0].text : got[i * 3][0].text;
    for (const at of [3, 11, 20, 33]) {
      const stop = text.slice(at, at + 3);
      if (stop.length < 2) continue;
      await ask({ prompt: PROMPTS[i], max_tokens: 64, temperature: 0, stop: [stop], stream: at % 2 === 1 });
    }
  }
  return got;
}

async function compare(fixture, speculates) {
  const off = await startServer({ model: fixture, args: [...THREADS, '--spec-draft', '0'] });
  let ref;
  try { ref = await workload(off); } finally { await stopClean(off); }
  const on = await startServer({ model: fixture, args: [...THREADS, '--spec-draft', '8', '--kv-check'] });
  try {
    const got = await workload(on, ref);
    assert.equal(got.length, ref.length);
    for (let i = 0; i < ref.length; i++) assert.deepEqual(got[i], ref[i], `${fixture}: request ${i}`);
    const m = await metrics(on);
    const drafted = m.codemoe_spec_draft_tokens_total, accepted = m.codemoe_spec_accepted_tokens_total;
    console.error(`  ${fixture}: ${accepted} of ${drafted} draft tokens accepted`);
    assert.equal(m.codemoe_kv_check_errors, 0, 'kv check');
    assert.equal(m.codemoe_kv_blocks_used, 0, 'no block left held');
    if (speculates) {
      assert.ok(accepted > 0, `${fixture}: drafts accepted (${accepted} of ${drafted})`);
      assert.ok(drafted > accepted, `${fixture}: some drafts rejected too (${accepted} of ${drafted})`);
    } else {
      assert.equal(drafted, 0, `${fixture} does not speculate`);
    }
  } finally {
    await stopClean(on);
  }
}

test('speculation: greedy output unchanged, dense f32', () => compare('qwen2-gqa', true));
test('speculation: greedy output unchanged, dense Q8_0', () => compare('qwen3-gqa-q8_0', true));
test('speculation: greedy output unchanged, hybrid MoE (does not speculate)', () => compare('hybrid-max', false));
test('speculation: greedy output unchanged, MoLE (does not speculate)', () => compare('mole', false));
test('speculation: greedy output unchanged, qwen3moe (does not speculate)', () => compare('qwen3moe', false));

test('speculation: concurrent streams share steps and still equal their runs alone (Q8_0)', async () => {
  /* int8 products are batch invariant at any batch size (docs/engine.md), so several speculating
   * sequences and prefills in one step must not change a token */
  const bodies = PROMPTS.flatMap((prompt) => [{ prompt, max_tokens: 48, temperature: 0, stream: true },
    { prompt: prompt + ' ', max_tokens: 40, temperature: 0 }]);
  const off = await startServer({ model: 'qwen3-gqa-q8_0', args: [...THREADS, '--spec-draft', '0', '--parallel', '16'] });
  const ref = [];
  try { for (const b of bodies) ref.push(await complete(off, b)); } finally { await stopClean(off); }
  const on = await startServer({ model: 'qwen3-gqa-q8_0', args: [...THREADS, '--spec-draft', '8', '--parallel', '16', '--kv-check'] });
  try {
    const got = await Promise.all(bodies.map((b) => complete(on, b)));
    for (let i = 0; i < ref.length; i++) assert.deepEqual(got[i], ref[i], `request ${i}`);
    const m = await metrics(on);
    assert.ok(m.codemoe_spec_accepted_tokens_total > 0, 'drafts accepted');
    assert.equal(m.codemoe_kv_check_errors, 0, 'kv check');
  } finally {
    await stopClean(on);
  }
});

test('speculation: sampled and logprobs requests do not draft', async () => {
  const srv = await startServer({ args: [...THREADS, '--spec-draft', '8'] });
  try {
    await complete(srv, { prompt: PROMPTS[2], max_tokens: 32, temperature: 0.8, seed: 3 });
    await complete(srv, { prompt: PROMPTS[2], max_tokens: 32, temperature: 0, logprobs: 2 });
    const m = await metrics(srv);
    assert.equal(m.codemoe_spec_draft_tokens_total, 0);
    await complete(srv, { prompt: PROMPTS[2], max_tokens: 32, temperature: 0 });
    assert.ok((await metrics(srv)).codemoe_spec_draft_tokens_total > 0, 'control: the greedy one drafts');
  } finally {
    await stopClean(srv);
  }
});

/* ------------------------------------------------------------ prefill-first */

test('prefill-first: a short prompt arriving during a long prefill gets its token first', async () => {
  /* 16-token steps, each slowed down: the long prompt takes many steps, the short one fits in one */
  const srv = await startServer({ args: [...THREADS, '--batch', '16', '--no-prefix-cache'],
    env: { CODEMOE_SERVE_STEP_DELAY_MS: '40' } });
  try {
    const long = 'import os\n' + Array.from({ length: 11 }, (_, i) => `v${i} = os.getenv("K${i}")\n`).join('');
    const order = [];
    const a = postJSON(srv, '/v1/completions', { prompt: long, max_tokens: 1, temperature: 0 }).then((r) => {
      assert.equal(r.status, 200, r.text);
      assert.ok(r.json.usage.prompt_tokens > 8 * 16, `long prompt: ${r.json.usage.prompt_tokens} tokens`);
      order.push('long');
    });
    /* wait until the long prompt's prefill is under way (some chunks computed, far from done) */
    for (;;) {
      const m = await metrics(srv);
      if (m.codemoe_prompt_tokens_computed_total >= 32) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    const b = postJSON(srv, '/v1/completions', { prompt: 'x = 1', max_tokens: 1, temperature: 0 }).then((r) => {
      assert.equal(r.status, 200, r.text);
      order.push('short');
    });
    await Promise.all([a, b]);
    assert.deepEqual(order, ['short', 'long']);
  } finally {
    await stopClean(srv);
  }
});

await run();
