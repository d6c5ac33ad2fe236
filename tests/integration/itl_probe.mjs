#!/usr/bin/env node
/*
 * itl_probe.mjs - a manual probe (not a registered test): how long a decoding stream stalls while a
 * long prompt is prefilled, with and without --max-itl-ms. Starts `codemoe serve` on MODEL (default: a
 * ~45M-parameter bench model from bench/inputs.sh's cache), streams 400 tokens, sends a ~3.9k-token prompt after 0.8 s, and prints
 * the stream's longest and median gap between chunks during that prefill.
 *
 *   CM_BINARY=build/server/codemoe node tests/integration/itl_probe.mjs [MODEL.gguf] [serve flags...]
 */
import os from 'node:os';
import { join } from 'node:path';
import { startServer, postJSON } from './server_harness.mjs';

const argv = process.argv.slice(2);
// the default is the bench model in bench/inputs.sh's cache directory (`bench/inputs.sh` makes it)
const cache = process.env.CODEMOE_CACHE || join(process.env.XDG_CACHE_HOME || join(os.homedir(), '.cache'), 'codemoe');
const model = argv[0] && argv[0].endsWith('.gguf') ? argv.shift() : join(cache, 'qwen45m-q8_0.gguf');
const srv = await startServer({ modelPath: model, args: ['--threads', '1', '--ctx', '5000', '--parallel', '2', ...argv] });
try {
  const res = await fetch(srv.base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ prompt: 'def main():', max_tokens: 400, temperature: 0, stream: true }) });
  const gaps = [];
  let last = 0;
  const reader = (async () => {
    for await (const _ of res.body) { const t = performance.now(); if (last) gaps.push(t - last); last = t; }
  })();
  await new Promise((r) => setTimeout(r, 800));
  const long = 'import os\n' + Array.from({ length: 320 }, (_, i) => `x${i} = ${i} * 2\n`).join('');
  const g0 = gaps.length, t0 = performance.now();
  const r = await postJSON(srv, '/v1/completions', { prompt: long, max_tokens: 1, temperature: 0 });
  const t1 = performance.now();
  const during = gaps.slice(g0).sort((a, b) => a - b);
  await reader;
  if (!r.json || !r.json.usage) throw new Error(r.text);
  console.log(JSON.stringify({ flags: argv, prompt_tokens: r.json.usage.prompt_tokens, prefill_request_ms: Math.round(t1 - t0),
    stream_max_gap_ms: Math.round(during[during.length - 1]), stream_median_gap_ms: Math.round(during[during.length >> 1]),
    stream_p90_gap_ms: Math.round(during[Math.floor(during.length * 0.9)]), stream_chunks_during: during.length }));
} finally {
  await srv.stop();
}
