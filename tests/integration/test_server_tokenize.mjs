#!/usr/bin/env node
/*
 * test_server_tokenize.mjs - a request's prompt is tokenized off the event loop:
 * - while two connections send ~4 MB prompts back to back (each takes the tokenizer about a second,
 *   more on a loaded machine), a running stream keeps its pace and /health keeps answering: both stay
 *   under a second at worst (what is left on the loop is parsing each 4 MB body's JSON, tens to a few
 *   hundred ms; tokenizing there made gaps of seconds per prompt); the
 *   long prompts still get their exact 400 context_length_exceeded;
 * - the same for a chat request with a ~4 MB message (its template is rendered off the loop too) and
 *   an /infill request with a ~4 MB input_extra chunk (its repository context is built off the loop);
 * - a prompt that cannot fit whatever its tokens is refused before tokenization;
 * - a client that hangs up while its prompt is being tokenized leaves nothing behind (run it in an
 *   ASan/UBSan build, where a leak or error report at exit fails it).
 * CM_TOKENIZE_PROMPT_BYTES sets the long prompts' size (default 4000000; an unoptimised ASan build
 * tokenizes some 40 times slower, so 200000 keeps such a run in minutes; the latency bounds are meant
 * for the optimised build).
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { startServer, postJSON, metrics, waitMetrics, sanitizerReport, sleep, test, run } from './server_harness.mjs';

const BIG = Number(process.env.CM_TOKENIZE_PROMPT_BYTES || 4_000_000); // bytes of spaces: BIG / 4 tokens
const bigBody = JSON.stringify({ prompt: ' '.repeat(BIG), max_tokens: 1 });

// A context of BIG / 8 tokens: the long prompts pass the cheap length bound (BIG / 39 tokens at least)
// and must be tokenized to find that they do not fit; a small KV pool, since nothing long ever runs.
// Steps are paced so the stream below outlives the long prompts: one token per step (no speculation,
// which would let a greedy stream on a looping model take several tokens per step and end early).
const serverArgs = ['--ctx', String(Math.floor(BIG / 8)), '--kv-size', '4096', '--parallel', '4', '--threads', '1',
  '--max-body', String(8 << 20), '--spec-draft', '0'];

/* While sendOne() runs on two connections, twice each, back to back, a greedy stream on srv keeps its
 * pace and /health keeps answering. streamBody: the stream's request (it must outlast the senders; it
 * is aborted at the end). Returns the senders' four responses. */
async function whileStreaming(srv, what, sendOne, streamBody) {
  const ac = new AbortController();
  const res = await fetch(srv.base + '/v1/completions', {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, signal: ac.signal,
    body: JSON.stringify(streamBody),
  });
  assert.equal(res.status, 200);
  const arrivals = [];
  const reading = (async () => {
    try { for await (const _ of res.body) arrivals.push(Date.now()); } catch { /* aborted */ }
  })();
  while (arrivals.length < 5) await sleep(10);

  // /health every 50 ms, timed
  let healthMax = 0, healthN = 0, probing = true;
  const prober = (async () => {
    while (probing) {
      const t0 = Date.now();
      const r = await fetch(srv.base + '/health');
      await r.text();
      healthMax = Math.max(healthMax, Date.now() - t0);
      healthN++;
      await sleep(50);
    }
  })();

  const tStart = Date.now();
  const sender = async () => {
    const out = [];
    for (let i = 0; i < 2; i++) out.push(await sendOne());
    return out;
  };
  const results = (await Promise.all([sender(), sender()])).flat();
  const tEnd = Date.now();
  probing = false;
  await prober;
  const ended = arrivals.length && arrivals[arrivals.length - 1] < tEnd - 1000;
  ac.abort();
  await reading;

  assert.ok(!ended, 'the stream ran until the senders were done');
  const during = arrivals.filter((t) => t >= tStart && t <= tEnd);
  assert.ok(during.length > 10, `the stream went on meanwhile (${during.length} chunks in ${tEnd - tStart} ms)`);
  let gap = 0;
  for (let i = 1; i < arrivals.length; i++)
    if (arrivals[i] >= tStart && arrivals[i - 1] <= tEnd) gap = Math.max(gap, arrivals[i] - arrivals[i - 1]);
  console.error(`  4 ${what} in ${tEnd - tStart} ms: longest stream gap ${gap} ms, ` +
    `slowest /health ${healthMax} ms over ${healthN} probes`);
  assert.ok(gap < 1000, `longest gap between stream chunks ${gap} ms`);
  assert.ok(healthMax < 1000, `slowest /health ${healthMax} ms`);
  return results;
}

test('long prompts do not stall running streams or /health', async () => {
  const srv = await startServer({ args: serverArgs, env: { CODEMOE_SERVE_STEP_DELAY_MS: '5' } });
  try {
    // greedy on this prompt never ends by itself
    const stream = { prompt: 'for i in range(', max_tokens: 3000, temperature: 0, stream: true };
    const results = await whileStreaming(srv, `prompts of ${BIG} bytes`,
      () => postJSON(srv, '/v1/completions', bigBody), stream);
    for (const r of results) {
      assert.equal(r.status, 400, r.text.slice(0, 300));
      assert.equal(r.json.error.code, 'context_length_exceeded');
      assert.equal(r.json.error.param, 'prompt');
      // counted exactly after tokenization, not the early bound
      assert.match(r.json.error.message, /however you requested \d+ tokens \(\d+ in your prompt/);
    }
  } finally {
    await srv.stop();
  }
  assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
});

// The chat template and /infill's repository context grow with the request too: they are built with
// the tokenization, off the loop (rendering and tokenizing them on the loop stalled the stream for
// seconds per request).
test('long chat messages and /infill context do not stall running streams or /health', async () => {
  const srv = await startServer({ model: 'qwen2-chat', args: serverArgs, env: { CODEMOE_SERVE_STEP_DELAY_MS: '5' } });
  try {
    const stream = { prompt: 'for i in range(', max_tokens: 3000, temperature: 0, stream: true };
    const chatBody = JSON.stringify({ messages: [{ role: 'user', content: ' '.repeat(BIG) }], max_tokens: 1 });
    const chats = await whileStreaming(srv, `chat messages of ${BIG} bytes`,
      () => postJSON(srv, '/v1/chat/completions', chatBody), stream);
    for (const r of chats) {
      assert.equal(r.status, 400, r.text.slice(0, 300));
      assert.equal(r.json.error.code, 'context_length_exceeded');
      assert.equal(r.json.error.param, 'messages');
      assert.match(r.json.error.message, /however you requested \d+ tokens \(\d+ in your prompt/);
    }
    // llama.vscode's chunks of other files: one too large for the context is tokenized, then left out
    const infillBody = JSON.stringify({ input_prefix: 'def f(x):\n', input_suffix: '\n', prompt: '    return ',
      input_extra: [{ filename: 'big.py', text: ' '.repeat(BIG) }], n_predict: 1 });
    const infills = await whileStreaming(srv, `input_extra chunks of ${BIG} bytes`,
      () => postJSON(srv, '/infill', infillBody), stream);
    for (const r of infills) {
      assert.equal(r.status, 200, r.text.slice(0, 300));
      assert.equal(r.json.truncated, true);
      assert.ok(r.json.tokens_evaluated < 100, `the big file was left out (${r.json.tokens_evaluated} prompt tokens)`);
    }
  } finally {
    await srv.stop();
  }
  assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
});

test('a prompt that cannot fit is refused before tokenization', async () => {
  const srv = await startServer({ args: ['--max-body', String(8 << 20)] }); // the model's 256-token context
  try {
    const t0 = Date.now();
    const r = await postJSON(srv, '/v1/completions', bigBody);
    assert.equal(r.status, 400);
    assert.equal(r.json.error.code, 'context_length_exceeded');
    assert.equal(r.json.error.param, 'prompt');
    assert.match(r.json.error.message, /at least \d+ in your prompt/);
    console.error(`  refused in ${Date.now() - t0} ms`);
  } finally {
    await srv.stop();
  }
  assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
});

test('hanging up while the prompt is tokenized frees the request', async () => {
  const srv = await startServer({ args: serverArgs });
  try {
    // more at once than libuv's pool has threads (4): some hang up while running, the others while
    // still queued (their work is cancelled before it starts)
    const n = 7;
    await Promise.all(Array.from({ length: n }, (_, i) => new Promise((resolve) => {
      const req = http.request(srv.base + '/v1/completions', { method: 'POST', agent: false,
        headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(bigBody) } });
      req.on('error', () => resolve());
      req.on('response', () => resolve()); // too late: the hang-up below comes first
      req.end(bigBody, () => setTimeout(() => { req.destroy(); resolve(); }, 100 + 20 * i));
    })));
    // the server serves on, and every connection is gone once the tokenizations finished
    await waitMetrics(srv, (m) => m['codemoe_http_connections'] === 1, 120000);
    const r = await postJSON(srv, '/v1/completions', { prompt: 'x', max_tokens: 2 });
    assert.equal(r.status, 200);
    const m = await metrics(srv);
    assert.equal(m['codemoe_requests_running'], 0);
    await sleep(100);
    const gone = srv.logs.filter((l) => l.msg === 'request' && l.route === 'completions' && l.outcome === 'client_gone');
    assert.equal(gone.length, n, JSON.stringify(srv.logs.filter((l) => l.msg === 'request')));
  } finally {
    await srv.stop();
  }
  assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
});

await run();
