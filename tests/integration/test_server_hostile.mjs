#!/usr/bin/env node
/*
 * test_server_hostile.mjs - a burst of hostile traffic against the real server on 127.0.0.1:
 * malformed and pathological JSON, invalid UTF-8 and NULs, huge and numerous headers, bad chunked
 * encoding, garbage request lines, slowloris-style partial headers and bodies (cut by
 * --idle-timeout), connections dropped mid-body and mid-stream, pipelined requests. Afterwards the
 * server must still answer, exit 0 on SIGTERM, and (in an ASan/UBSan build, where the sanitizers
 * check at exit) print no sanitizer report: no crash, no leak, no undefined behaviour.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { startServer, postJSON, rawRequest, sanitizerReport, waitMetrics, sleep, test, run } from './server_harness.mjs';

function post(body, extra = '') {
  const b = Buffer.isBuffer(body) ? body : Buffer.from(body, 'latin1');
  return [Buffer.concat([Buffer.from(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n${extra}Content-Length: ${b.length}\r\n\r\n`), b])];
}

const hostileBodies = [
  '', '{', '}', '[', '{"prompt":', '{"prompt":"\\ud800"}', '{"prompt":"\\u0000abc"}', '{"prompt":1e999}',
  '{"prompt":"x","max_tokens":-1}', '{"prompt":"x","max_tokens":1e300}', '{"prompt":"x","n":0}',
  '{"prompt":"x","n":-5}', '{"prompt":"x","logprobs":1000}', '{"prompt":"x","stop":["' + 'a'.repeat(10000) + '"]}',
  '{"prompt":"x","stop":[' + '"a",'.repeat(100) + '"b"]}', '{"prompt":[[[[[[[[[[1]]]]]]]]]]}',
  '['.repeat(20000) + ']'.repeat(20000), '{"a":'.repeat(5000) + '1' + '}'.repeat(5000),
  '{"prompt":' + JSON.stringify('x'.repeat(50000)) + ',"max_tokens":1}',
  '{"prompt":[' + Array.from({ length: 3000 }, (_, i) => i % 250).join(',') + ']}',
  '{"prompt":"x","logit_bias":{"' + '9'.repeat(40) + '":5}}', '{"prompt":"x","logit_bias":{"1":1e308}}',
  '{"prompt":"x","temperature":"NaN"}', '{"prompt":"x","seed":-1}', '{"prompt":"x","seed":1.5}',
  '{"prompt":"x","suffix":123}', '{"prompt":"x","stream":"yes"}', '{"prompt":"x","stream_options":[]}',
  '{"prompt":"x","echo":true,"logprobs":5,"max_tokens":0}', '{"prompt":["a","b","c"],"n":2,"max_tokens":2}',
  '{"prompt":"<|fim_prefix|><|fim_suffix|><|fim_middle|><|endoftext|>","max_tokens":2}',
  '{"prompt":"x","model":null}', '{"prompt":"x","model":' + JSON.stringify('m'.repeat(5000)) + '}',
  '{"prompt":"x","prompt":"y"}', '\u00ff\u00fe\u0000\u0001', '{"prompt":"\u00c3\u0028\u00a0\u00a1"}',
];

test('hostile burst leaves the server healthy and clean', async () => {
  const srv = await startServer({ args: ['--idle-timeout', '1', '--max-body', '200000', '--parallel', '4', '--queue', '8'] });
  const jobs = [];
  /* malformed / pathological bodies, each on its own connection and all pipelined on one */
  for (const b of hostileBodies) jobs.push(rawRequest(srv.port, post(b), { ms: 8000 }));
  jobs.push(rawRequest(srv.port, hostileBodies.slice(0, 10).map((b) => post(b)[0]), { ms: 8000 }));
  /* binary junk with NULs and invalid UTF-8 */
  jobs.push(rawRequest(srv.port, post(Buffer.from([0, 0xff, 0xfe, 0x80, 0xc0, 0, 0x22, 0x7b])), { ms: 8000 }));
  /* huge header, many headers, huge URL, garbage request lines, bad versions */
  jobs.push(rawRequest(srv.port, [`GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(200000)}\r\n\r\n`], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['GET /health HTTP/1.1\r\nHost: x\r\n' + 'X-H: v\r\n'.repeat(5000) + '\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, [`GET /${'a'.repeat(100000)} HTTP/1.1\r\nHost: x\r\n\r\n`], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['GARBAGE\r\n\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['\x00\x01\x02\x03\r\n\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['GET /health HTTP/9.9\r\nHost: x\r\n\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['GET /v1/models%00/../x HTTP/1.1\r\nHost: x\r\n\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['GET /v1/completions/' + '%2F'.repeat(100) + '/routing HTTP/1.1\r\nHost: x\r\n\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{}'], { ms: 8000 }));
  /* bad chunked encodings */
  jobs.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n{}\r\n0\r\n\r\n'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab'], { ms: 8000 }));
  jobs.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n' + '400\r\n' + 'a'.repeat(1024) + '\r\n'.repeat(1) + '3\r\n{}}\r\n0\r\n\r\n'], { ms: 8000 }));
  /* slowloris: partial headers and partial bodies, trickled */
  for (let i = 0; i < 10; i++) {
    jobs.push(rawRequest(srv.port, ['POST /v1/comp', 'letions HTTP/1.1\r\n', 'Host: x\r\n'], { ms: 8000, gapMs: 300 }));
    jobs.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"prompt":', '"ab'], { ms: 8000, gapMs: 200 }));
  }
  /* connections dropped mid-body and right after a streamed request starts */
  for (let i = 0; i < 10; i++) {
    jobs.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro'], { ms: 50 }));
    jobs.push(rawRequest(srv.port, post(JSON.stringify({ prompt: 'x' + i, max_tokens: 200, stream: true })), { ms: 30 + 10 * i }));
    jobs.push(rawRequest(srv.port, post(JSON.stringify({ prompt: 'y' + i, max_tokens: 200 })), { ms: 30 + 10 * i }));
  }
  /* a request that half-closes its side after sending */
  jobs.push(rawRequest(srv.port, post(JSON.stringify({ prompt: 'z', max_tokens: 4 })), { ms: 3000, end: true }));
  const results = await Promise.all(jobs);
  /* every malformed body got a JSON error (4xx) and never a 5xx or a dropped connection */
  for (let i = 0; i < hostileBodies.length; i++) {
    const m = results[i].data.match(/^HTTP\/1\.1 (\d{3})/);
    assert.ok(m, `body ${i}: no response: ${JSON.stringify(results[i]).slice(0, 300)}`);
    const st = Number(m[1]);
    assert.ok(st === 200 || (st >= 400 && st < 500), `body ${i} (${hostileBodies[i].slice(0, 60)}): status ${st}`);
  }
  /* the server is still healthy and every generation was cleaned up */
  const h = await fetch(srv.base + '/health');
  assert.equal(h.status, 200);
  const ok = await postJSON(srv, '/v1/completions', { prompt: 'still alive', max_tokens: 3 });
  assert.equal(ok.status, 200, ok.text);
  await waitMetrics(srv, (m) => m['codemoe_sequences_running'] === 0 && m['codemoe_kv_blocks_used'] === 0 && m['codemoe_queue_depth'] === 0, 15000);
  const ex = await srv.stop();
  assert.equal(ex.code, 0, 'exit code ' + JSON.stringify(ex) + '\n' + srv.stderr.slice(-3000));
  const rep = sanitizerReport(srv);
  assert.equal(rep, null, 'sanitizer report:\n' + rep);
});

test('SIGTERM while hostile connections are open still exits 0 cleanly', async () => {
  const srv = await startServer({ args: ['--idle-timeout', '5', '--grace', '1'] });
  const pending = [];
  for (let i = 0; i < 5; i++) pending.push(rawRequest(srv.port, ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"pr'], { ms: 4000 }));
  for (let i = 0; i < 3; i++) pending.push(rawRequest(srv.port, post(JSON.stringify({ prompt: 'a' + i, max_tokens: 200, stream: true })), { ms: 4000 }));
  await sleep(200);
  const ex = await srv.stop('SIGTERM', 20000);
  assert.equal(ex.code, 0);
  await Promise.all(pending);
  assert.equal(sanitizerReport(srv), null, sanitizerReport(srv));
});

await run();
