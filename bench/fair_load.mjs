#!/usr/bin/env node
// fair_load.mjs - is a shared server fair to every member of a team? One API key floods the server with
// --flood concurrent closed-loop requests (a script, a plugin that never debounces) while another key
// types: one streamed completion at a time, its prompt growing by a few characters each request. The
// typist's time to first token (TTFT) is measured alone, then under the flood, then under the flood
// with the typist sending on the flooding key (one client: first come, first served, the order without
// fair queuing).
//
//   node bench/fair_load.mjs --url http://127.0.0.1:PORT --key-flood K1 --key-typist K2 [options]
//
//   --flood N          concurrent flooding requests (default 50)
//   --requests N       typist requests per phase (default 40)
//   --think MS         typist pause between requests (default 30)
//   --max-tokens N     max_tokens of every request (default 16)
//   --json FILE        also write the results as JSON
//   --no-same-key      skip the third phase (with --key-max-concurrent the typist would be refused there)
//   --rounds N         alternate the alone and flooded phases N times (default 1) and pool their samples,
//                      so that a change in the machine's other load falls on both alike; each round's
//                      own p50s and ratio are printed too (and in the JSON: "per_round")
// A flooding request answered 429 waits its Retry-After and is sent again (what OpenAI's SDKs do). The
// flood runs in a child process (this script with --role flood), so that reading its streams never
// delays the typist's measurements in this one.
// Only Node built-ins; loopback addresses only.

import { spawn } from "node:child_process";
import fs from "node:fs";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : def;
};
const url = opt("--url", "http://127.0.0.1:8080");
if (!/^http:\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$/.test(url)) {
  console.error("fair_load: --url must be a loopback address");
  process.exit(2);
}
const keyFlood = opt("--key-flood", ""), keyTypist = opt("--key-typist", "");
const FLOOD = Number(opt("--flood", "50")), REQUESTS = Number(opt("--requests", "40"));
const THINK = Number(opt("--think", "30")), MAX_TOKENS = Number(opt("--max-tokens", "16"));
const jsonOut = opt("--json", "");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const FILE = "def moving_average(values, window):\n    \"\"\"Return the moving averages of values.\"\"\"\n" +
  "    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n" +
  "        if i >= window:\n            total -= values[i - window]\n        if i + 1 >= window:\n" +
  "            out.append(total / window)\n    return out\n";

/* One streamed completion; resolves {status, ttft (ms, to the first text event), retryAfter}. */
async function complete(key, prompt, signal) {
  const t0 = performance.now();
  const res = await fetch(url + "/v1/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) },
    body: JSON.stringify({ prompt, max_tokens: MAX_TOKENS, temperature: 0, stream: true }),
    signal,
  });
  if (res.status !== 200) {
    await res.text();
    return { status: res.status, retryAfter: Number(res.headers.get("retry-after") || 1) };
  }
  let ttft = null, buf = "";
  const dec = new TextDecoder();
  for await (const chunk of res.body) {
    buf += dec.decode(chunk, { stream: true });
    if (ttft === null && buf.includes('"text"')) ttft = performance.now() - t0;
  }
  return { status: 200, ttft };
}

function pct(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))] : NaN;
}

async function typist(key) {
  const ttfts = [];
  let pos = 40;
  for (let i = 0; i < REQUESTS; i++) {
    pos = Math.min(FILE.length, pos + 1 + (i % 4));
    const r = await complete(key, FILE.slice(0, pos));
    if (r.status !== 200) throw new Error(`typist got ${r.status}`);
    ttfts.push(r.ttft);
    if (pos >= FILE.length) pos = 40;
    await sleep(THINK);
  }
  return ttfts;
}

const summary = (ttfts) => ({ p50: pct(ttfts, 0.5), p90: pct(ttfts, 0.9), n: ttfts.length });

/* --role flood: floods until SIGTERM, then prints the counts of answers by status (JSON) and exits. */
async function floodChild(key) {
  const ctl = new AbortController();
  const counts = {};
  let running = true;
  const worker = async (w) => {
    for (let i = 0; running; i++) {
      try {
        const r = await complete(key, `# task ${w}.${i}\n` + FILE.slice(0, 120 + ((w * 7 + i) % 80)), ctl.signal);
        counts[r.status] = (counts[r.status] || 0) + 1;
        if (r.status === 429 && running) await sleep(1000 * r.retryAfter);
      } catch (e) {
        if (running) throw e;
      }
    }
  };
  const all = Array.from({ length: FLOOD }, (_, w) => worker(w));
  process.on("SIGTERM", async () => {
    running = false;
    ctl.abort();
    await Promise.allSettled(all);
    process.stdout.write(JSON.stringify(counts) + "\n");
    process.exit(0);
  });
}

/* Starts the flood in a child process; returns stop() resolving the counts of answers by status. */
function flood(key) {
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), ...args, "--role", "flood", "--flood-key", key],
    { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  child.stdout.on("data", (d) => { out += d; });
  const exited = new Promise((r) => child.on("exit", r));
  return async () => {
    child.kill("SIGTERM");
    await exited;
    return JSON.parse(out || "{}");
  };
}

if (opt("--role", "") === "flood") {
  await floodChild(opt("--flood-key", ""));
  await new Promise(() => {}); // until SIGTERM
}

const ROUNDS = Number(opt("--rounds", "1"));
const results = { url, flood: FLOOD, requests: REQUESTS, max_tokens: MAX_TOKENS, rounds: ROUNDS };
await typist(keyTypist); // warm-up: the server's samplers, the file's prefix in the cache
const alone = [], flooded = [], answers = {};
results.per_round = [];
for (let r = 0; r < ROUNDS; r++) {
  const a = await typist(keyTypist);
  const stop = flood(keyFlood), t0 = performance.now();
  await sleep(1000);
  const fl = await typist(keyTypist);
  const got = await stop(), secs = (performance.now() - t0) / 1000;
  for (const [k, v] of Object.entries(got)) answers[k] = (answers[k] || 0) + v;
  alone.push(...a);
  flooded.push(...fl);
  results.per_round.push({ alone: summary(a), flooded: summary(fl), flood_answers: got, flood_seconds: secs });
}
results.alone = summary(alone);
results.flooded = summary(flooded);
results.flood_answers = answers;
if (!args.includes("--no-same-key")) {
  const stop = flood(keyFlood);
  await sleep(1000);
  results.flooded_same_key = summary(await typist(keyFlood));
  results.flood_answers_same_key = await stop();
}
const f = (x) => x.toFixed(1);
console.log(`typist TTFT (ms)                 p50     p90   p50 ratio`);
for (const k of ["alone", "flooded", "flooded_same_key"].filter((x) => results[x]))
  console.log(`${k.padEnd(30)} ${f(results[k].p50).padStart(7)} ${f(results[k].p90).padStart(7)}   ` +
    `${(results[k].p50 / results.alone.p50).toFixed(2)}x`);
if (ROUNDS > 1)
  results.per_round.forEach((x, i) => console.log(`round ${i + 1}: alone p50 ${f(x.alone.p50)}, flooded p50 ` +
    `${f(x.flooded.p50)} p90 ${f(x.flooded.p90)}, ${(x.flooded.p50 / x.alone.p50).toFixed(2)}x; flood answers ` +
    `${JSON.stringify(x.flood_answers)} in ${f(x.flood_seconds)} s (${f((x.flood_answers[200] || 0) / x.flood_seconds)}/s)`));
console.log(`flood answers by status: ${JSON.stringify(results.flood_answers)}` +
  (results.flood_answers_same_key ? `; same key: ${JSON.stringify(results.flood_answers_same_key)}` : ""));
if (jsonOut) fs.writeFileSync(jsonOut, JSON.stringify(results, null, 2) + "\n");
