#!/usr/bin/env node
/*
 * test_server_stream.mjs - streaming behaviour of the real server under continuous batching:
 * - a client that disconnects mid-stream (or while waiting for a plain response) cancels its
 *   generation: /metrics shows it cancelled, nothing running, and KV blocks back to 0 used;
 * - 16 concurrent streams, each equal to its own run alone with the same seed (the batch a sequence
 *   shares must not change its tokens);
 * - SIGTERM mid-stream: the stream finishes (within --grace) or ends with an error event (after it),
 *   new connections are refused, and the exit code is 0.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { startServer, postJSON, metrics, waitMetrics, readSSE, sleep, test, run } from './server_harness.mjs';

/* Starts a streamed completion with node:http; resolves with {req, res} once headers arrive. */
function rawStream(srv, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, agent: false }, (res) => resolve({ req, res }));
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

function firstData(res) {
  return new Promise((resolve) => res.once('data', (d) => resolve(d.toString())));
}

async function streamText(srv, body) {
  const res = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
  assert.equal(res.status, 200);
  const events = await readSSE(res);
  assert.equal(events[events.length - 1], '[DONE]', 'stream ends with [DONE]');
  let text = '';
  let finish = null;
  for (const e of events) {
    if (e === '[DONE]') continue;
    assert.ok(!e.error, JSON.stringify(e));
    for (const c of e.choices) { text += c.text; if (c.finish_reason) finish = c.finish_reason; }
  }
  return { text, finish };
}

/* Greedy on this prompt loops without ever producing an end-of-text token (the 429 test in
 * test_server_http.mjs relies on the same), so these generations run until cancelled. */
test('disconnecting mid-stream cancels the generation and frees its KV blocks', async () => {
  const srv = await startServer({ args: ['--ctx', '16384'] });
  try {
    const { req, res } = await rawStream(srv, { prompt: 'for i in range(', max_tokens: 16000, temperature: 0, stream: true });
    assert.equal(res.statusCode, 200);
    const d = await firstData(res);
    assert.match(d, /^data: /);
    let m = await metrics(srv);
    assert.equal(m['codemoe_sequences_running'], 1);
    assert.ok(m['codemoe_kv_blocks_used'] > 0);
    req.destroy();
    m = await waitMetrics(srv, (x) => x['codemoe_requests_cancelled_total'] === 1 && x['codemoe_sequences_running'] === 0 &&
      x['codemoe_kv_blocks_used'] === 0, 5000);
    assert.ok(m['codemoe_generated_tokens_total'] < 16000);

    /* a plain (non-streamed) request whose client leaves while it is generating */
    const plain = http.request(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, agent: false });
    plain.on('error', () => {});
    plain.end(JSON.stringify({ prompt: 'for i in range(', max_tokens: 16000, temperature: 0 }));
    await waitMetrics(srv, (x) => x['codemoe_sequences_running'] === 1, 5000);
    plain.destroy();
    await waitMetrics(srv, (x) => x['codemoe_requests_cancelled_total'] === 2 && x['codemoe_sequences_running'] === 0 &&
      x['codemoe_kv_blocks_used'] === 0, 5000);
    /* and the server goes on serving */
    const r = await postJSON(srv, '/v1/completions', { prompt: 'x', max_tokens: 2 });
    assert.equal(r.status, 200);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('16 concurrent streams each equal their run alone (same seed)', async () => {
  const srv = await startServer({ args: ['--parallel', '16', '--batch', '256'] });
  try {
    const prompts = [];
    for (let i = 0; i < 16; i++) {
      prompts.push({ prompt: `# task ${i}\ndef f${i}(x):` + ' '.repeat(i), max_tokens: 24 + i, temperature: 0.9, top_p: 0.95, seed: 1000 + i });
    }
    const alone = [];
    for (const p of prompts) alone.push(await streamText(srv, p));
    const m0 = await metrics(srv);
    const together = await Promise.all(prompts.map((p) => streamText(srv, p)));
    for (let i = 0; i < 16; i++) {
      assert.equal(together[i].text, alone[i].text, `stream ${i} differs when batched`);
      assert.equal(together[i].finish, alone[i].finish);
    }
    const m = await metrics(srv);
    /* they really were batched: while the 16 ran together, several tokens per forward pass (counted
     * over that phase only: the runs alone, one token per decode step, would dilute it) */
    const tokens = m['codemoe_batch_tokens_total'] - m0['codemoe_batch_tokens_total'];
    const steps = m['codemoe_decode_steps_total'] - m0['codemoe_decode_steps_total'];
    assert.ok(tokens > steps * 2, `${tokens} tokens in ${steps} steps (one sequence at a time would be ~1 per step)`);
    assert.equal(m['codemoe_kv_blocks_used'], 0);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

test('SIGTERM mid-stream: the stream finishes within --grace, exit 0', async () => {
  const srv = await startServer({ args: ['--grace', '20'] });
  const res = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ prompt: 'for x in', max_tokens: 120, temperature: 0.7, seed: 3, stream: true }) });
  assert.equal(res.status, 200);
  let signalled = false;
  const events = await readSSE(res, () => {
    if (!signalled) { signalled = true; srv.child.kill('SIGTERM'); }
  });
  assert.equal(events[events.length - 1], '[DONE]');
  assert.ok(events.every((e) => e === '[DONE]' || !e.error));
  const ex = await srv.exitPromise;
  assert.equal(ex.code, 0);
  assert.ok(srv.logs.some((l) => l.msg === 'shutting down'));
});

test('SIGTERM with a short grace: the stream ends with an error event, new connections refused, exit 0', async () => {
  const srv = await startServer({ args: ['--grace', '0.3', '--ctx', '16384'] });
  const res = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ prompt: 'for i in range(', max_tokens: 16000, temperature: 0, stream: true }) });
  assert.equal(res.status, 200);
  let signalled = false;
  let refused = null;
  const events = await readSSE(res, () => {
    if (!signalled) {
      signalled = true;
      srv.child.kill('SIGTERM');
      setTimeout(() => {
        const s = net.connect(srv.port, '127.0.0.1');
        s.on('connect', () => { refused = false; s.destroy(); });
        s.on('error', () => { refused = true; });
      }, 100);
    }
  });
  const last = events[events.length - 1];
  assert.ok(last && last.error, 'last event is an error: ' + JSON.stringify(last));
  assert.equal(last.error.code, 'server_shutting_down');
  const ex = await srv.exitPromise;
  assert.equal(ex.code, 0);
  await sleep(50);
  assert.equal(refused, true, 'listener closed after SIGTERM');
});

test('a reader that falls --stream-buffer behind gets an error event; its generation is cancelled', async () => {
  /* 4 choices with 5 logprobs each produce more than 4 KiB per step, so the stream's buffer
   * overflows before the client could drain it: the path a stuck reader takes once the kernel's
   * socket buffers are full */
  const srv = await startServer({ args: ['--stream-buffer', '4096', '--ctx', '4096'] });
  try {
    const res = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ prompt: 'x', max_tokens: 4000, n: 4, logprobs: 5, stream: true }) });
    assert.equal(res.status, 200);
    const events = await readSSE(res);
    const last = events[events.length - 1];
    assert.ok(last && last.error, JSON.stringify(last));
    assert.equal(last.error.code, 'slow_reader');
    await waitMetrics(srv, (m) => m['codemoe_slow_reader_streams_total'] === 1 && m['codemoe_sequences_running'] === 0 &&
      m['codemoe_kv_blocks_used'] === 0 && m['codemoe_generated_tokens_total'] < 4 * 4000, 5000);
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
});

await run();
