#!/usr/bin/env node
/*
 * test_server_fair.mjs - fair to every member of a team (docs/server.md "Fair queuing and per-client
 * limits"), in the real server:
 * - one key queues 16 requests, then another key sends one: it is admitted within one turn (at most
 *   the request running and one more of the burst finish before it), while the same request sent with
 *   the flooding key waits behind the whole burst (the control: the order is not an accident of timing);
 * - the same for two users of one shared key named by --user-header; an unusable user name is a 400;
 * - --key-max-concurrent: a key's requests beyond the limit get 429 with Retry-After, another key's
 *   go through, and /metrics counts them per key without ever showing a key;
 * - --key-tokens-per-minute: once a key has used its tokens, 429 with a Retry-After that matches its
 *   bucket in /metrics; another key is not held back.
 * - preemption: with every slot held by one key, another key's request does not wait for them: one of
 *   the first key's requests is paused for it (counted per key in /metrics), and its text is the text
 *   it has alone; with --no-preempt (the control) the request waits for a slot.
 * The ordering is observed through completion order with --parallel 1 and a slowed step
 * (CODEMOE_SERVE_STEP_DELAY_MS), never through wall-clock ratios, so a busy machine cannot fail it.
 */
import assert from 'node:assert/strict';
import { startServer, postJSON, metrics, waitMetrics, sanitizerReport, test, run } from './server_harness.mjs';

const KEY_A = 'sk-fair-flood-0123456789';
const KEY_B = 'sk-fair-typist-9876543210';
const BURST = 16;

const auth = (key, extra = {}) => ({ Authorization: `Bearer ${key}`, ...extra });
const body = (i) => ({ prompt: `def f${i}(x):`, max_tokens: 3, temperature: 0 });

async function stopClean(srv) {
  const ex = await srv.stop();
  assert.equal(ex.code, 0, srv.stderr.slice(-2000));
  assert.equal(sanitizerReport(srv), null);
}

/* Sends the burst with headers hA, waits until the scheduler holds it (queue depth), then sends one
 * request with headers hB. Returns how many burst requests finished after that request was sent and
 * before it finished. */
async function burstThenOne(srv, hA, hB) {
  const done = [];
  const burst = [];
  for (let i = 0; i < BURST; i++)
    burst.push(postJSON(srv, '/v1/completions', body(i), hA).then((r) => {
      assert.equal(r.status, 200, r.text);
      done.push(performance.now());
    }));
  await waitMetrics(srv, (m) => m.codemoe_queue_depth >= BURST - 4, 20000, hA);
  const t0 = performance.now();
  const r = await postJSON(srv, '/v1/completions', body(99), hB);
  const t1 = performance.now();
  assert.equal(r.status, 200, r.text);
  await Promise.all(burst);
  return done.filter((t) => t > t0 && t < t1).length;
}

test('a second key is admitted within one turn of a burst; the same request on the flooding key waits', async () => {
  const srv = await startServer({ args: ['--threads', '1', '--parallel', '1', '--api-key', KEY_A, '--api-key', KEY_B],
    env: { CODEMOE_SERVE_STEP_DELAY_MS: '40' } });
  try {
    const other = await burstThenOne(srv, auth(KEY_A), auth(KEY_B));
    assert.ok(other <= 2, `${other} requests of the burst finished before the other key's one`);
    const same = await burstThenOne(srv, auth(KEY_A), auth(KEY_A));
    assert.ok(same >= BURST - 4, `control: only ${same} of the burst finished before the flooding key's own request`);
    const text = await (await fetch(srv.base + '/metrics', { headers: auth(KEY_A) })).text();
    assert.ok(!text.includes(KEY_A) && !text.includes(KEY_B) && !text.includes('sk-fair'), 'a key in /metrics');
    const reqs = [...text.matchAll(/^codemoe_key_requests_total\{key="(k-[0-9a-f]{8})",user=""\} (\d+)$/gm)];
    assert.deepEqual(reqs.map((m) => Number(m[2])).sort((a, b) => a - b), [1, 2 * BURST + 1], text);
  } finally {
    await stopClean(srv);
  }
});

test('--user-header: users of one shared key are queued fairly; a bad user name is a 400', async () => {
  const srv = await startServer({ args: ['--threads', '1', '--parallel', '1', '--api-key', KEY_A,
    '--user-header', 'X-Codemoe-User'], env: { CODEMOE_SERVE_STEP_DELAY_MS: '40' } });
  try {
    const other = await burstThenOne(srv, auth(KEY_A, { 'X-Codemoe-User': 'alice' }),
      auth(KEY_A, { 'X-Codemoe-User': 'bob' }));
    assert.ok(other <= 2, `${other} requests of alice's burst finished before bob's one`);
    const bad = await postJSON(srv, '/v1/completions', body(1), auth(KEY_A, { 'X-Codemoe-User': 'no spaces' }));
    assert.equal(bad.status, 400, bad.text);
    assert.equal(bad.json.error.code, 'invalid_user');
    const m = await metrics(srv, auth(KEY_A));
    const label = Object.keys(m).find((k) => k.startsWith('codemoe_key_requests_total{') && k.includes('user="alice"'));
    assert.ok(label && m[label] === BURST, JSON.stringify(m));
    assert.equal(m[label.replace('alice', 'bob')], 1);
  } finally {
    await stopClean(srv);
  }
});

test('--key-max-concurrent: 429 with Retry-After beyond the limit, per key', async () => {
  const srv = await startServer({ args: ['--threads', '1', '--parallel', '4', '--api-key', KEY_A, '--api-key', KEY_B,
    '--key-max-concurrent', '2'], env: { CODEMOE_SERVE_STEP_DELAY_MS: '40' } });
  try {
    const long = { prompt: 'def f(x):', max_tokens: 12, temperature: 0 };
    const a = await Promise.all([0, 1, 2, 3].map(() => postJSON(srv, '/v1/completions', long, auth(KEY_A))));
    const codes = a.map((r) => r.status).sort();
    assert.deepEqual(codes, [200, 200, 429, 429], a.map((r) => r.text).join('\n'));
    for (const r of a.filter((x) => x.status === 429)) {
      assert.equal(r.headers.get('retry-after'), '1');
      assert.equal(r.json.error.code, 'rate_limit_exceeded');
      assert.match(r.json.error.message, /--key-max-concurrent/);
    }
    /* while A is at its limit, B is not */
    const hold = [0, 1].map(() => postJSON(srv, '/v1/completions', long, auth(KEY_A)));
    await waitMetrics(srv, (m) => Object.entries(m).some(([k, v]) => k.startsWith('codemoe_key_requests_in_flight') && v === 2),
      10000, auth(KEY_B));
    const b = await postJSON(srv, '/v1/completions', long, auth(KEY_B));
    assert.equal(b.status, 200, b.text);
    for (const r of await Promise.all(hold)) assert.equal(r.status, 200, r.text);
    const text = await (await fetch(srv.base + '/metrics', { headers: auth(KEY_B) })).text();
    assert.ok(!text.includes('sk-fair'), 'a key in /metrics');
    const rej = [...text.matchAll(/^codemoe_key_rejected_total\{key="k-[0-9a-f]{8}",user="",reason="concurrency"\} (\d+)$/gm)];
    assert.deepEqual(rej.map((m) => Number(m[1])).sort(), [0, 2], text);
  } finally {
    await stopClean(srv);
  }
});

test('--key-tokens-per-minute: 429 with the Retry-After of the bucket; another key goes on', async () => {
  const srv = await startServer({ args: ['--threads', '1', '--api-key', KEY_A, '--api-key', KEY_B,
    '--key-tokens-per-minute', '60'] });
  try {
    const req = { prompt: 'def add(a, b):\n    return', max_tokens: 40, temperature: 0 };
    let r, used = 0;
    for (let i = 0; i < 6; i++) {
      r = await postJSON(srv, '/v1/completions', req, auth(KEY_A));
      if (r.status !== 200) break;
      used += r.json.usage.total_tokens;
    }
    assert.equal(r.status, 429, r.text);
    assert.ok(used >= 60, `429 after ${used} tokens`);
    assert.equal(r.json.error.code, 'rate_limit_exceeded');
    assert.match(r.json.error.message, /--key-tokens-per-minute/);
    const ra = Number(r.headers.get('retry-after'));
    const m = await metrics(srv, auth(KEY_B));
    const bucket = Object.entries(m).filter(([k]) => k.startsWith('codemoe_key_token_bucket{')).map(([, v]) => v).sort((x, y) => x - y);
    assert.equal(bucket.length, 2);
    assert.equal(bucket[1], 60); /* B's is full */
    /* one token a second: the wait is what A owes, rounded up (the bucket refilled a little since) */
    assert.ok(bucket[0] <= 0 && ra >= 1 && ra >= -bucket[0] && ra <= -bucket[0] + 2, `Retry-After ${ra}, bucket ${bucket[0]}`);
    const b = await postJSON(srv, '/v1/completions', req, auth(KEY_B));
    assert.equal(b.status, 200, b.text);
    const tok = Object.entries(m).filter(([k]) => k.startsWith('codemoe_key_tokens_total{')).map(([, v]) => v).sort((x, y) => x - y);
    assert.deepEqual(tok, [0, used]);
  } finally {
    await stopClean(srv);
  }
});

/* Key A fills both slots with long requests, then key B sends a short one. Returns B's response, A's,
 * and whether B finished before both of A's. */
async function fullThenOther(srv) {
  const long = (i) => ({ prompt: `def f${i}(x):`, max_tokens: 40, temperature: 0 });
  let bDone = 0;
  const a = [0, 1].map((i) => postJSON(srv, '/v1/completions', long(i), auth(KEY_A)).then((r) => ({ r, t: performance.now() })));
  await waitMetrics(srv, (m) => m.codemoe_sequences_running === 2 && m.codemoe_generated_tokens_total >= 2, 10000, auth(KEY_B));
  const b = await postJSON(srv, '/v1/completions', body(7), auth(KEY_B));
  bDone = performance.now();
  const ra = await Promise.all(a);
  for (const { r } of ra) {
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.usage.completion_tokens, 40, 'a flooding request ended early: ' + r.text);
  }
  assert.equal(b.status, 200, b.text);
  return { b, a: ra.map(({ r }) => r), first: ra.every(({ t }) => bDone < t), long };
}

test('preemption: another key gets a slot held by the busiest key; the paused request resumes exactly', async () => {
  const srv = await startServer({ args: ['--threads', '1', '--parallel', '2', '--api-key', KEY_A, '--api-key', KEY_B,
    '--kv-check'], env: { CODEMOE_SERVE_STEP_DELAY_MS: '40' } });
  try {
    const { a, first, long } = await fullThenOther(srv);
    assert.ok(first, "the other key's request finished after one of the full key's");
    const m = await metrics(srv, auth(KEY_B));
    assert.equal(m.codemoe_preemptions_total, 1, JSON.stringify(m));
    assert.equal(m.codemoe_requests_preempted, 0);
    assert.equal(m.codemoe_kv_check_errors, 0);
    const pre = Object.entries(m).filter(([k]) => k.startsWith('codemoe_key_preemptions_total{')).map(([, v]) => v).sort();
    assert.deepEqual(pre, [0, 1]);
    /* the same requests alone: the same texts */
    for (let i = 0; i < 2; i++) {
      const alone = await postJSON(srv, '/v1/completions', long(i), auth(KEY_A));
      assert.equal(alone.status, 200, alone.text);
      assert.equal(a[i].json.choices[0].text, alone.json.choices[0].text);
    }
  } finally {
    await stopClean(srv);
  }
});

test('--no-preempt: the other key waits for a slot (the control)', async () => {
  const srv = await startServer({ args: ['--threads', '1', '--parallel', '2', '--api-key', KEY_A, '--api-key', KEY_B,
    '--no-preempt'], env: { CODEMOE_SERVE_STEP_DELAY_MS: '40' } });
  try {
    const { first } = await fullThenOther(srv);
    assert.ok(!first, "the other key's request finished before both of the full key's without preemption");
    const m = await metrics(srv, auth(KEY_B));
    assert.equal(m.codemoe_preemptions_total, 0);
  } finally {
    await stopClean(srv);
  }
});

await run();
