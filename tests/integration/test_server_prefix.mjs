#!/usr/bin/env node
/*
 * test_server_prefix.mjs - KV memory as a budget, the prefix cache, forks and chunked prefill in the
 * real server (docs/server.md "KV memory"):
 * - a repeated prompt reuses cached blocks (usage cached_tokens) and gives the same text and logprobs
 *   (1e-4) as its cold run, on a dense, a hybrid MoE and a MoLE model;
 * - under memory pressure (a small --kv-size) distinct prompts evict each other; every output still
 *   equals the same request on a --no-prefix-cache server, requests wait for blocks instead of
 *   failing, and one that can never fit gets a 400 at once;
 * - n > 1 prefills the prompt once (forks): greedy choices are equal, sampled choice i equals the
 *   single-choice request with seed + i, echoed prompt logprobs are copied to every choice;
 * - a client that leaves in the middle of a prefill frees its blocks;
 * - --max-itl-ms splits a prefill into small chunks while another sequence decodes;
 * - a soak of random requests (shared prefixes, n = 2, streams cut off) with --kv-check: no block
 *   leaks (kv_blocks_used back to 0) and no bookkeeping error.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { startServer, postJSON, metrics, waitMetrics, readSSE, sanitizerReport, test, run } from './server_harness.mjs';
// deterministic numbers (mulberry32), so a failing soak can be replayed
import { rng } from '../../bench/loadgen.mjs';

const THREADS = ['--threads', '1'];

const WORDS = ['def', 'return', 'for', 'in', 'range', 'if', 'else', 'print', 'self', 'value', 'index', 'list',
  'while', 'import', 'class', 'None', 'True', 'yield', 'lambda', 'x', 'y', 'n', '+', '-', '(', ')', ':', '=', '\n    '];
function code(r, words) {
  let s = '';
  for (let i = 0; i < words; i++) s += WORDS[Math.floor(r() * WORDS.length)] + ' ';
  return s;
}

async function complete(srv, body) {
  const r = await postJSON(srv, '/v1/completions', body);
  assert.equal(r.status, 200, r.text);
  return r.json;
}

async function stopClean(srv) {
  const ex = await srv.stop();
  assert.equal(ex.code, 0, 'server exit code');
  const rep = sanitizerReport(srv);
  assert.equal(rep, null, 'sanitizer report: ' + rep);
}

function assertSameLogprobs(a, b, what) {
  assert.deepEqual(a.tokens, b.tokens, what + ': tokens');
  assert.equal(a.token_logprobs.length, b.token_logprobs.length);
  for (let i = 0; i < a.token_logprobs.length; i++) {
    const x = a.token_logprobs[i], y = b.token_logprobs[i];
    if (x === null || y === null) { assert.equal(x, y, what); continue; }
    assert.ok(Math.abs(x - y) <= 1e-4, `${what}: logprob ${i}: ${x} vs ${y}`);
    const tx = a.top_logprobs[i], ty = b.top_logprobs[i];
    assert.deepEqual(Object.keys(tx).sort(), Object.keys(ty).sort(), what + ': top tokens');
    for (const k of Object.keys(tx)) assert.ok(Math.abs(tx[k] - ty[k]) <= 1e-4, `${what}: top ${k}`);
  }
}

/* ------------------------------------------------------------ cache hits == cold runs */

for (const model of ['qwen2-gqa', 'hybrid-max', 'mole']) {
  test(`${model}: a repeated prompt is served from the cache with the cold run's output`, async () => {
    const srv = await startServer({ model, args: [...THREADS] });
    try {
      const r = rng(7);
      const prompt = '```python\n' + code(r, 30);
      const body = { prompt, max_tokens: 12, temperature: 0, logprobs: 3 };
      const cold = await complete(srv, body);
      assert.ok(cold.usage.prompt_tokens > 64, 'prompt of more than two blocks: ' + cold.usage.prompt_tokens);
      assert.equal(cold.usage.prompt_tokens_details.cached_tokens, 0);
      const m0 = await metrics(srv);
      const warm = await complete(srv, body);
      const cached = warm.usage.prompt_tokens_details.cached_tokens;
      // a dense model reuses every position but the last (whole blocks, then the cold run's partial
      // block as a tail); a MoE model whole blocks only here (its state is kept at block ends and at a
      // tail's end, and the cold run's tail also holds its generated tokens)
      if (model === 'qwen2-gqa') assert.equal(cached, warm.usage.prompt_tokens - 1, 'cached_tokens');
      else assert.ok(cached >= 64 && cached % 32 === 0 && cached < warm.usage.prompt_tokens, 'cached_tokens ' + cached);
      assert.equal(warm.choices[0].text, cold.choices[0].text);
      assertSameLogprobs(warm.choices[0].logprobs, cold.choices[0].logprobs, model);
      const m1 = await metrics(srv);
      assert.equal(m1['codemoe_prefix_cache_hit_tokens_total'] - m0['codemoe_prefix_cache_hit_tokens_total'], cached);
      assert.equal(m1['codemoe_prompt_tokens_computed_total'] - m0['codemoe_prompt_tokens_computed_total'],
        warm.usage.prompt_tokens - cached, 'only the uncached tail is computed');
      assert.ok(m1['codemoe_prefix_cache_hit_ratio'] > 0 && m1['codemoe_prefix_cache_hit_ratio'] < 1);
      assert.equal(m1['codemoe_kv_blocks_used'], 0);
      assert.ok(m1['codemoe_kv_blocks_cached'] >= 2);
      /* a stream's final usage chunk reports the reuse too */
      const sres = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }) });
      const events = await readSSE(sres);
      const usage = events.filter((e) => e !== '[DONE]' && e.usage).pop().usage;
      assert.equal(usage.prompt_tokens_details.cached_tokens, cached);
      assert.equal(events.filter((e) => e !== '[DONE]').map((e) => e.choices.map((c) => c.text).join('')).join(''),
        cold.choices[0].text);
      /* a prompt that shares only the first blocks reuses those, and is right too */
      const fork = { ...body, prompt: prompt.slice(0, 150) + 'while True: pass' };
      const a = await complete(srv, fork);
      assert.ok(a.usage.prompt_tokens_details.cached_tokens >= 32);
      /* echo + logprobs needs every echoed position's logits: nothing is reused, output unchanged */
      const e1 = await complete(srv, { ...body, echo: true, max_tokens: 2 });
      assert.equal(e1.usage.prompt_tokens_details.cached_tokens, 0);
      assert.ok(e1.choices[0].text.startsWith(prompt));
    } finally {
      await stopClean(srv);
    }
    /* the same on a server without the cache: the cold reference */
    const ref = await startServer({ model, args: [...THREADS, '--no-prefix-cache'] });
    try {
      const r = rng(7);
      const prompt = '```python\n' + code(r, 30);
      const body = { prompt, max_tokens: 12, temperature: 0, logprobs: 3 };
      const x = await complete(ref, body);
      const y = await complete(ref, body);
      assert.equal(y.usage.prompt_tokens_details.cached_tokens, 0);
      assert.equal(x.choices[0].text, y.choices[0].text);
      const m = await metrics(ref);
      assert.equal(m['codemoe_prefix_cache_hit_tokens_total'], 0);
      assert.equal(m['codemoe_prompt_tokens_computed_total'], 2 * x.usage.prompt_tokens);
    } finally {
      await stopClean(ref);
    }
  });
}

/* ------------------------------------------------------------ memory pressure */

test('a small --kv-size: eviction keeps outputs equal to cold runs, requests wait, too big is a 400', async () => {
  const r = rng(11);
  const header = code(r, 12); /* a shared first block or so */
  const prompts = [];
  for (let i = 0; i < 10; i++) prompts.push((i % 2 ? header : '') + code(r, 20 + i));
  const bodies = prompts.map((p, i) => ({ prompt: p, max_tokens: 6 + i, temperature: 0, logprobs: 1 }));
  const order = [...bodies.keys(), ...[...bodies.keys()].reverse(), 3, 3, 7, 0];
  /* reference: no cache, the default (large) pool, one at a time */
  const ref = await startServer({ args: [...THREADS, '--no-prefix-cache'] });
  const want = [];
  try {
    for (const b of bodies) want.push(await complete(ref, b));
  } finally {
    await stopClean(ref);
  }
  /* 16 blocks: about three of these requests at once; 8 slots, so blocks are the limit */
  const srv = await startServer({ args: [...THREADS, '--kv-size', '512', '--parallel', '8', '--kv-check'] });
  try {
    let m = await metrics(srv);
    assert.equal(m['codemoe_kv_blocks'], 16);
    /* 4 at a time */
    let cached = 0;
    for (let k = 0; k < order.length; k += 4) {
      const batch = order.slice(k, k + 4);
      const got = await Promise.all(batch.map((i) => complete(srv, bodies[i])));
      batch.forEach((i, t) => {
        assert.equal(got[t].choices[0].text, want[i].choices[0].text, `prompt ${i}`);
        assertSameLogprobs(got[t].choices[0].logprobs, want[i].choices[0].logprobs, `prompt ${i}`);
        cached += got[t].usage.prompt_tokens_details.cached_tokens;
      });
    }
    m = await metrics(srv);
    assert.ok(m['codemoe_kv_evictions_total'] > 0, 'evictions ' + m['codemoe_kv_evictions_total']);
    assert.ok(cached > 0 && m['codemoe_prefix_cache_hit_tokens_total'] === cached, 'hits ' + cached);
    assert.equal(m['codemoe_kv_blocks_used'], 0);
    assert.equal(m['codemoe_kv_check_errors'], 0);
    /* 8 choices of prompt + 150 tokens cannot fit 16 blocks even alone: refused at once, also when
     * it arrives behind requests that wait for blocks */
    const crowd = [0, 1, 2, 3, 4, 5].map((i) => complete(srv, bodies[i]));
    const big = await postJSON(srv, '/v1/completions', { prompt: prompts[0], max_tokens: 150, n: 8 });
    await Promise.all(crowd);
    assert.equal(big.status, 400, big.text);
    assert.equal(big.json.error.code, 'kv_budget_exceeded');
    assert.equal(big.json.error.param, 'max_tokens');
    /* and the server goes on */
    const again = await complete(srv, bodies[5]);
    assert.equal(again.choices[0].text, want[5].choices[0].text);
  } finally {
    await stopClean(srv);
  }
});

test('--kv-size with a unit is converted with the model\'s bytes per position; bad values are refused', async () => {
  /* qwen2-gqa: 2 layers x (K + V) x 2 kv heads x 16 dims x 4 bytes = 512 bytes per position, 16 KiB
   * per block with f32 K/V (dense: no routing state); f16 (the default) halves that: 8 KiB */
  for (const [kvType, blocks] of [['f32', 4], ['f16', 8], [null, 8]]) {
    const typeArgs = kvType ? ['--kv-type', kvType] : [];
    const srv = await startServer({ args: [...THREADS, '--kv-size', '64KiB', ...typeArgs] });
    try {
      const m = await metrics(srv);
      assert.equal(m['codemoe_kv_blocks'], blocks, `--kv-type ${kvType ?? '(default)'}`);
    } finally {
      await stopClean(srv);
    }
  }
  await assert.rejects(startServer({ args: ['--kv-type', 'f8'] }), /did not start/, 'f8');
  for (const bad of ['12MB', '-1', 'x', '2000000000000']) {
    await assert.rejects(startServer({ args: ['--kv-size', bad] }), /did not start/, bad);
  }
});

/* ------------------------------------------------------------ n > 1: forks */

for (const model of ['qwen2-gqa', 'hybrid-max', 'mole']) {
  test(`${model}: n > 1 prefills the prompt once; choices equal their single-choice runs`, async () => {
    const srv = await startServer({ model, args: [...THREADS, '--no-prefix-cache'] });
    try {
      const r = rng(3);
      const prompt = code(r, 25);
      const m0 = await metrics(srv);
      const g = await complete(srv, { prompt, max_tokens: 10, temperature: 0, n: 2, logprobs: 2 });
      const m1 = await metrics(srv);
      const P = g.usage.prompt_tokens;
      assert.equal(m1['codemoe_prompt_tokens_computed_total'] - m0['codemoe_prompt_tokens_computed_total'], P,
        'the prompt is computed once for both choices');
      assert.equal(g.choices.length, 2);
      assert.equal(g.choices[0].text, g.choices[1].text);
      assertSameLogprobs(g.choices[0].logprobs, g.choices[1].logprobs, 'greedy choices');
      /* sampled: choice i uses seed + i, so it must equal a one-choice request with that seed */
      const body = { prompt, max_tokens: 14, temperature: 1.0, seed: 1234 };
      const many = await complete(srv, { ...body, n: 3 });
      for (let i = 0; i < 3; i++) {
        const one = await complete(srv, { ...body, seed: 1234 + i });
        assert.equal(many.choices[i].text, one.choices[0].text, `choice ${i}`);
      }
      /* echo + logprobs: every choice gets the prompt's logprobs, computed once */
      const e = await complete(srv, { prompt, max_tokens: 3, temperature: 0, n: 2, echo: true, logprobs: 1 });
      assertSameLogprobs(e.choices[0].logprobs, e.choices[1].logprobs, 'echoed choices');
      assert.ok(e.choices[1].logprobs.tokens.length >= P);
      /* max_tokens 0 scoring with n = 2 ends both choices after the prompt */
      const z = await complete(srv, { prompt, max_tokens: 0, n: 2, echo: true, logprobs: 0 });
      assert.equal(z.choices[0].logprobs.tokens.length, z.choices[1].logprobs.tokens.length);
      const m2 = await metrics(srv);
      assert.equal(m2['codemoe_kv_blocks_used'], 0);
    } finally {
      await stopClean(srv);
    }
  });
}

/* ------------------------------------------------------------ cancellation and chunking */

test('a client leaving mid-prefill frees its blocks', async () => {
  /* 40 ms per step and 16 tokens per step: a 200-token prompt takes ~0.5 s to prefill */
  const srv = await startServer({ args: [...THREADS, '--batch', '16', '--max-itl-ms', '5'],
    env: { CODEMOE_SERVE_STEP_DELAY_MS: '40' } });
  try {
    const prompt = code(rng(5), 60);
    const req = http.request(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, agent: false });
    req.on('error', () => {});
    req.end(JSON.stringify({ prompt, max_tokens: 20, temperature: 0, stream: true }));
    const m = await waitMetrics(srv, (x) => x['codemoe_kv_blocks_used'] >= 2 && x['codemoe_prompt_tokens_computed_total'] >= 32, 10000);
    assert.equal(m['codemoe_generated_tokens_total'], 0, 'still prefilling');
    req.destroy();
    const after = await waitMetrics(srv, (x) => x['codemoe_requests_cancelled_total'] === 1 && x['codemoe_sequences_running'] === 0 &&
      x['codemoe_kv_blocks_used'] === 0, 10000);
    assert.equal(after['codemoe_generated_tokens_total'], 0);
    /* what was computed stays cached: the same prompt now starts from there */
    const r = await complete(srv, { prompt, max_tokens: 2, temperature: 0 });
    assert.ok(r.usage.prompt_tokens > 150);
    assert.ok(after['codemoe_prompt_tokens_computed_total'] < r.usage.prompt_tokens, 'cancelled before the end of the prompt');
    assert.ok(r.usage.prompt_tokens_details.cached_tokens >= 32);
  } finally {
    await stopClean(srv);
  }
});

async function prefillWhileDecoding(args) {
  /* 5 ms per step: the stream decodes for about a second */
  const srv = await startServer({ args: [...THREADS, '--batch', '512', ...args], env: { CODEMOE_SERVE_STEP_DELAY_MS: '5' } });
  try {
    /* a stream that decodes for a while */
    const res = await new Promise((resolve, reject) => {
      const q = http.request(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, agent: false }, resolve);
      q.on('error', reject);
      q.end(JSON.stringify({ prompt: 'for i in range(', max_tokens: 200, temperature: 0, stream: true }));
    });
    res.resume();
    await waitMetrics(srv, (x) => x['codemoe_generated_tokens_total'] >= 2, 5000);
    const m0 = await metrics(srv);
    const r = await complete(srv, { prompt: code(rng(9), 60), max_tokens: 1, temperature: 0 });
    assert.ok(r.usage.prompt_tokens > 150, 'prompt tokens ' + r.usage.prompt_tokens);
    const m1 = await metrics(srv);
    await new Promise((resolve) => res.on('end', resolve));
    const big = (m) => m['codemoe_step_tokens_count'] - m['codemoe_step_tokens_bucket{le="64"}'];
    return big(m1) - big(m0);
  } finally {
    await stopClean(srv);
  }
}

test('--max-itl-ms chunks a long prefill while another stream decodes', async () => {
  /* without the bound the prompt goes in one step; with an unreachable bound, one block per step */
  assert.ok(await prefillWhileDecoding([]) >= 1, 'control: a big step without --max-itl-ms');
  assert.equal(await prefillWhileDecoding(['--max-itl-ms', '0.001']), 0, 'no step over 64 tokens with the bound');
});

/* ------------------------------------------------------------ soak */

test('soak: random requests with shared prefixes, n = 2, cut streams; no leak, pool consistent', async () => {
  const r = rng(2024);
  const srv = await startServer({ model: 'hybrid-max', args: [...THREADS, '--kv-size', '384', '--parallel', '6', '--kv-check', '--queue', '256'] });
  try {
    const prefixes = [];
    for (let i = 0; i < 6; i++) prefixes.push(code(r, Math.floor(r() * 26)));
    const N = Number(process.env.CM_SOAK_REQUESTS || 240);
    const greedy = new Map(); /* key -> text: the same greedy request always gives the same text */
    let next = 0, cut = 0;
    const worker = async () => {
      while (next < N) {
        const k = next++;
        const prompt = prefixes[Math.floor(r() * prefixes.length)] + code(r, 1 + Math.floor(r() * 8));
        const body = { prompt, max_tokens: 1 + Math.floor(r() * 24), temperature: 0 };
        const kind = r();
        if (kind < 0.2) {
          body.n = 2;
        } else if (kind < 0.35) {
          /* a stream whose client leaves after some events (or before anything comes) */
          const events = 1 + Math.floor(r() * 40);
          await new Promise((resolve) => {
            const q = http.request(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, agent: false }, (res) => {
              let seen = 0;
              res.on('data', () => { if (++seen === events) { q.destroy(); resolve(); } });
              res.on('end', resolve);
              res.on('error', resolve);
            });
            q.on('error', resolve);
            q.end(JSON.stringify({ ...body, max_tokens: 100, stream: true }));
            if (k % 3 === 0) setTimeout(() => { q.destroy(); resolve(); }, 1);
          });
          cut++;
          continue;
        } else if (kind < 0.45) {
          body.temperature = 0.8;
          body.seed = k;
        }
        const res = await complete(srv, body);
        if (body.temperature === 0) {
          const key = JSON.stringify([prompt, body.max_tokens]);
          for (const c of res.choices) {
            if (!greedy.has(key)) greedy.set(key, c.text);
            assert.equal(c.text, greedy.get(key), 'greedy output differs between runs of request ' + k);
          }
        }
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    assert.ok(cut > 10);
    const m = await waitMetrics(srv, (x) => x['codemoe_requests_running'] === 0 && x['codemoe_queue_depth'] === 0 &&
      x['codemoe_kv_blocks_used'] === 0, 20000);
    assert.equal(m['codemoe_kv_check_errors'], 0);
    assert.ok(m['codemoe_prefix_cache_hit_tokens_total'] > 0);
    assert.ok(m['codemoe_kv_evictions_total'] > 0, 'the pool was under pressure');
    assert.equal(m['codemoe_kv_blocks_cached'] + (m['codemoe_kv_blocks_available'] - m['codemoe_kv_blocks_cached']),
      m['codemoe_kv_blocks']);
  } finally {
    await stopClean(srv);
  }
});

await run();
