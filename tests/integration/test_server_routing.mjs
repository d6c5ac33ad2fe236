#!/usr/bin/env node
/*
 * test_server_routing.mjs - the routing record store of the real server:
 * - a record (GET /v1/completions/{id}/routing) is served only to the API key that created the
 *   completion, or to an --admin-key; any other key gets the same 404 as an unknown id;
 * - the store is bounded in bytes (--routing-retention-bytes): records are evicted oldest first, the
 *   codemoe_routing_store_bytes gauge never passes the cap and equals the served records' sizes.
 */
import assert from 'node:assert/strict';
import { startServer, postJSON, metrics, sanitizerReport, test, run } from './server_harness.mjs';

const auth = (key) => (key ? { Authorization: `Bearer ${key}` } : {});

async function get(srv, path, key) {
  const r = await fetch(srv.base + path, { headers: auth(key) });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, text, json };
}

test('a routing record is readable by the key that created it and by admin keys only', async () => {
  const srv = await startServer({ args: ['--api-key', 'key-a', '--api-key', 'key-b', '--admin-key', 'key-admin'] });
  try {
    const a = await postJSON(srv, '/v1/completions', { prompt: 'def f(x):', max_tokens: 2 }, auth('key-a'));
    assert.equal(a.status, 200, a.text);
    const b = await postJSON(srv, '/v1/completions', { prompt: 'def g(x):', max_tokens: 2 }, auth('key-b'));
    assert.equal(b.status, 200, b.text);
    const pathA = `/v1/completions/${a.json.id}/routing`, pathB = `/v1/completions/${b.json.id}/routing`;

    const mine = await get(srv, pathA, 'key-a');
    assert.equal(mine.status, 200, mine.text);
    assert.equal(mine.json.id, a.json.id);
    assert.equal((await get(srv, pathB, 'key-b')).json.id, b.json.id);
    for (const p of [pathA, pathB]) {
      const adm = await get(srv, p, 'key-admin');
      assert.equal(adm.status, 200, adm.text);
    }
    // another key: exactly what an unknown id gets (the id's existence is not revealed)
    const unknown = await get(srv, '/v1/completions/cmpl-000000000000000000000000/routing', 'key-a');
    assert.equal(unknown.status, 404);
    for (const [p, key] of [[pathA, 'key-b'], [pathB, 'key-a']]) {
      const other = await get(srv, p, key);
      assert.equal(other.status, 404, other.text);
      assert.equal(other.json.error.code, unknown.json.error.code);
      assert.equal(other.json.error.type, unknown.json.error.type);
      assert.equal(other.json.error.message.replace(/'[^']*'/, "'ID'"), unknown.json.error.message.replace(/'[^']*'/, "'ID'"));
    }
    assert.equal((await get(srv, pathA)).status, 401);
    assert.equal((await get(srv, pathA, 'key-wrong')).status, 401);
    // an admin key is a key like the others, and its own records are its own
    const c = await postJSON(srv, '/v1/completions', { prompt: 'x', max_tokens: 1 }, auth('key-admin'));
    assert.equal(c.status, 200);
    assert.equal((await get(srv, `/v1/completions/${c.json.id}/routing`, 'key-a')).status, 404);
    assert.equal((await get(srv, `/v1/completions/${c.json.id}/routing`, 'key-admin')).status, 200);
  } finally {
    await srv.stop();
  }
  assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
});

test('the routing store is bounded in bytes, oldest records evicted first', async () => {
  const cap = 6000;
  // a hybrid model's records carry per-layer expert counts (a few KB with routing "full")
  const srv = await startServer({ model: 'hybrid-max', args: ['--routing-retention', '1000', '--routing-retention-bytes', String(cap)] });
  try {
    const ids = [];
    for (let i = 0; i < 12; i++) {
      const r = await postJSON(srv, '/v1/completions', { prompt: `def f${i}(x):\n    return x * ${i}`, max_tokens: 3, routing: 'full' });
      assert.equal(r.status, 200, r.text);
      ids.push(r.json.id);
      const m = await metrics(srv);
      assert.ok(m['codemoe_routing_store_bytes'] <= cap, `store holds ${m['codemoe_routing_store_bytes']} bytes`);
    }
    // the kept records are the newest ones, and their served sizes sum to the gauge
    let kept = 0, bytes = 0, seenGone = false;
    for (let i = ids.length - 1; i >= 0; i--) {
      const g = await get(srv, `/v1/completions/${ids[i]}/routing`);
      if (g.status === 200) {
        assert.ok(!seenGone, `record ${i} kept after an evicted newer one`);
        kept++;
        bytes += Buffer.byteLength(g.text);
      } else {
        assert.equal(g.status, 404);
        seenGone = true;
      }
    }
    assert.ok(seenGone, 'some records were evicted for bytes (not count: the count bound is 1000)');
    assert.ok(kept >= 1);
    const m = await metrics(srv);
    assert.equal(m['codemoe_routing_store_records'], kept);
    assert.equal(m['codemoe_routing_store_bytes'], bytes);
  } finally {
    await srv.stop();
  }
  assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
});

await run();
