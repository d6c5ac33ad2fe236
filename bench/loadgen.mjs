#!/usr/bin/env node
// loadgen.mjs - IDE-like streaming load on an OpenAI-compatible /v1/completions server, over loopback.
//
//   node bench/loadgen.mjs --url http://127.0.0.1:PORT --workload humaneval|fim|typing [options]
//   node bench/loadgen.mjs --report RUN.json...        (side-by-side table of saved runs)
//
// Workloads (prompts from HumanEval-X, six languages interleaved, order fixed by --seed):
//   humaneval  each prompt as a plain completion.
//   fim        fill-in-the-middle: the canonical solution is cut at a line boundary; prefix = prompt +
//              the lines before the cut, suffix = the rest. By default the FIM tokens are written into
//              the prompt text (<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>), which both codemoe and
//              llama-server tokenize as the same special tokens, so both servers see identical token
//              sequences; --fim suffix sends `suffix` instead (codemoe's native path; llama-server's
//              /v1/completions rejects `suffix`).
//   typing     a user types a file's solution a few characters at a time; every keystroke sends a new
//              completion of the prefix so far and aborts the previous in-flight request (closes its
//              connection). Keystrokes come in bursts; after a burst the user waits for the last
//              suggestion, then pauses. So most requests are cancelled, by construction, on every server.
// --concurrency N independent users, each closed-loop (one request, or one typing session, at a time).
// The run stops starting requests after --requests requests or --duration seconds, whichever comes first.
//
// Per request: TTFT (request start to the first SSE event carrying text), inter-token latency (between
// consecutive text events), generated tokens (usage.completion_tokens when the stream finished, else the
// number of text events), prompt tokens and cached prompt tokens (usage.prompt_tokens_details.
// cached_tokens; for llama-server, timings.cache_n, or prompt_tokens - timings.prompt_n in versions
// without cache_n), outcome (ok, cancelled by the client, error). Counters of GET /metrics are read
// before and after the run and their differences kept in the JSON (prefix-cache counters, if the server
// has any, are reported there).
//
// Only Node built-ins; loopback addresses only.

import http from "node:http";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";

const LANGS = ["python", "cpp", "java", "js", "go", "rust"];
// bench/load_compare.sh passes --data from the benchmark cache (bench/inputs.sh humaneval-x)
const DEFAULT_DATA = process.env.CODEMOE_HUMANEVAL_X || "";

const USAGE = `usage: node bench/loadgen.mjs --url URL --workload humaneval|fim|typing [options]
       node bench/loadgen.mjs --report RUN.json...
  --url URL              server base URL, loopback only (default http://127.0.0.1:8080)
  --workload W           humaneval | fim | typing (default humaneval)
  --concurrency N        concurrent users (default 1)
  --requests N           stop after starting N requests (default 32; typing: keystroke requests)
  --duration SEC         stop starting requests after SEC seconds (default 60)
  --timeout SEC          abort one request after SEC seconds, counted as an error (default 120)
  --max-tokens N         max_tokens of every request (default 16)
  --temperature T        (default 0)
  --fim inline|suffix    FIM request form (default inline: FIM tokens in the prompt text)
  --data DIR             HumanEval-X *.jsonl.gz directory (default $CODEMOE_HUMANEVAL_X;
                         bench/inputs.sh humaneval-x fetches it and prints its path)
  --langs a,b,...        languages (default ${LANGS.join(",")})
  --seed N               prompt order, FIM cuts and typing rhythm (default 1)
  --model NAME           send "model": NAME (default: no model field)
  --type-chars A-B       characters per keystroke request (default 1-4)
  --type-ms A-B          milliseconds between keystrokes in a burst (default 60-160)
  --burst A-B            keystrokes per burst (default 3-8)
  --think-ms A-B         pause after the last suggestion of a burst (default 200-600)
  --warmup N             unmeasured short requests before the run (default 1)
  --affinity             typing: user u sends X-Codemoe-Affinity: user<u> (the key a load balancer
                         in front of several replicas routes on, deploy/haproxy/)
  --label NAME           name of this run in tables (default: the URL)
  --json FILE            write the run (summary, per-request records, metrics) as JSON
  --quiet                no table on stdout`;

// ------------------------------------------------------------------------------------------ arguments

function parseArgs(argv) {
    const o = {
        url: "http://127.0.0.1:8080", workload: "humaneval", concurrency: 1, requests: 32, duration: 60,
        timeout: 120, maxTokens: 16, temperature: 0, fim: "inline", data: DEFAULT_DATA, langs: LANGS,
        seed: 1, model: null, typeChars: [1, 4], typeMs: [60, 160], burst: [3, 8], thinkMs: [200, 600],
        warmup: 1, label: null, json: null, quiet: false, report: null, affinity: false, userHeaders: null,
    };
    const range = (s, k) => {
        const m = /^(\d+)(?:-(\d+))?$/.exec(s);
        if (!m) die(`${k}: expected A-B, got ${s}`);
        const a = +m[1], b = m[2] === undefined ? a : +m[2];
        if (b < a) die(`${k}: ${s} is empty`);
        return [a, b];
    };
    const num = (s, k, min) => {
        const v = Number(s);
        if (!Number.isFinite(v) || v < min) die(`${k}: expected a number >= ${min}, got ${s}`);
        return v;
    };
    for (let i = 0; i < argv.length; i++) {
        const k = argv[i];
        if (k === "--report") { o.report = argv.slice(i + 1); break; }
        if (k === "--quiet") { o.quiet = true; continue; }
        if (k === "--affinity") { o.affinity = true; o.userHeaders = (u) => ({ "x-codemoe-affinity": `user${u}` }); continue; }
        if (k === "-h" || k === "--help") { console.log(USAGE); process.exit(0); }
        const v = argv[++i];
        if (v === undefined) die(`${k}: missing value`);
        switch (k) {
        case "--url": o.url = v; break;
        case "--workload": o.workload = v; break;
        case "--concurrency": o.concurrency = num(v, k, 1) | 0; break;
        case "--requests": o.requests = num(v, k, 1) | 0; break;
        case "--duration": o.duration = num(v, k, 0.1); break;
        case "--timeout": o.timeout = num(v, k, 0.1); break;
        case "--max-tokens": o.maxTokens = num(v, k, 1) | 0; break;
        case "--temperature": o.temperature = num(v, k, 0); break;
        case "--fim": o.fim = v; break;
        case "--data": o.data = v; break;
        case "--langs": o.langs = v.split(",").filter(Boolean); break;
        case "--seed": o.seed = num(v, k, 0) | 0; break;
        case "--model": o.model = v; break;
        case "--type-chars": o.typeChars = range(v, k); break;
        case "--type-ms": o.typeMs = range(v, k); break;
        case "--burst": o.burst = range(v, k); break;
        case "--think-ms": o.thinkMs = range(v, k); break;
        case "--warmup": o.warmup = num(v, k, 0) | 0; break;
        case "--label": o.label = v; break;
        case "--json": o.json = v; break;
        default: die(`unknown option ${k}\n${USAGE}`);
        }
    }
    if (!["humaneval", "fim", "typing"].includes(o.workload)) die(`--workload: unknown ${o.workload}`);
    if (!["inline", "suffix"].includes(o.fim)) die(`--fim: inline or suffix, not ${o.fim}`);
    for (const l of o.langs) if (!LANGS.includes(l)) die(`--langs: unknown language ${l}`);
    if (o.typeChars[0] < 1) die("--type-chars: at least 1 character per keystroke");
    if (o.burst[0] < 1) die("--burst: at least 1 keystroke per burst");
    return o;
}

function die(msg) {
    console.error(`loadgen: ${msg}`);
    process.exit(2);
}

// The benchmark drives a local server only: refuse anything but a loopback address.
function loopbackTarget(url) {
    let u;
    try { u = new URL(url); } catch { die(`--url: not a URL: ${url}`); }
    if (u.protocol !== "http:") die("--url: http:// only");
    const h = u.hostname.replace(/^\[|\]$/g, "");
    if (!(h === "localhost" || h === "::1" || /^127\.\d+\.\d+\.\d+$/.test(h))) die(`--url: ${h} is not loopback`);
    return { host: h === "localhost" ? "127.0.0.1" : h, port: +(u.port || 80), base: u.pathname.replace(/\/$/, "") };
}

// ------------------------------------------------------------------------------------------ data

// mulberry32: small seeded PRNG, so both servers get the same prompts, cuts and keystroke rhythm (also
// used by tests/integration/test_server_prefix.mjs for its replayable soak).
export function rng(seed) {
    let a = seed >>> 0;
    return () => {
        a = (a + 0x6d2b79f5) >>> 0;
        let t = a;
        t = Math.imul(t ^ (t >>> 15), t | 1);
        t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
        return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
}
const randint = (r, [a, b]) => a + Math.floor(r() * (b - a + 1));

function shuffle(r, xs) {
    for (let i = xs.length - 1; i > 0; i--) {
        const j = Math.floor(r() * (i + 1));
        [xs[i], xs[j]] = [xs[j], xs[i]];
    }
    return xs;
}

// Problems of all languages, interleaved (python, cpp, ..., python, ...), each language's order shuffled.
function loadProblems(dir, langs, seed) {
    if (!dir) die("no HumanEval-X directory: pass --data DIR or set CODEMOE_HUMANEVAL_X (bench/inputs.sh humaneval-x)");
    const r = rng(seed);
    const per = langs.map((lang) => {
        const file = path.join(dir, `humaneval_${lang}.jsonl.gz`);
        let text;
        try { text = zlib.gunzipSync(fs.readFileSync(file)).toString("utf8"); } catch (e) { die(`${file}: ${e.message}`); }
        const rows = text.split("\n").filter((l) => l.trim()).map((l, i) => {
            let j;
            try { j = JSON.parse(l); } catch { die(`${file}:${i + 1}: bad JSON`); }
            if (typeof j.prompt !== "string" || typeof j.canonical_solution !== "string")
                die(`${file}:${i + 1}: no prompt/canonical_solution`);
            return { lang, id: j.task_id, prompt: j.prompt, solution: j.canonical_solution };
        });
        return shuffle(r, rows);
    });
    const out = [];
    const n = Math.max(...per.map((p) => p.length));
    for (let i = 0; i < n; i++) for (const p of per) if (i < p.length) out.push(p[i]);
    return out;
}

const FIM_PRE = "<|fim_prefix|>", FIM_SUF = "<|fim_suffix|>", FIM_MID = "<|fim_middle|>";

// Request bodies of the humaneval and fim workloads, in order (users take the next one).
function buildRequests(o, problems) {
    const r = rng(o.seed ^ 0x5eed);
    return problems.map((p) => {
        if (o.workload === "humaneval") return { tag: `${p.lang}/${p.id}`, prompt: p.prompt };
        // cut the solution at the start of one of its lines (never before the first or after the last)
        const starts = [];
        for (let i = 0; i < p.solution.length; i++) if (p.solution[i] === "\n" && i + 1 < p.solution.length) starts.push(i + 1);
        const cut = starts.length ? starts[Math.floor(r() * starts.length)] : 0;
        const prefix = p.prompt + p.solution.slice(0, cut), suffix = p.solution.slice(cut);
        return o.fim === "inline"
            ? { tag: `${p.lang}/${p.id}`, prompt: FIM_PRE + prefix + FIM_SUF + suffix + FIM_MID }
            : { tag: `${p.lang}/${p.id}`, prompt: prefix, suffix };
    });
}

// ------------------------------------------------------------------------------------------ requests

// One streaming completion. Returns {done: Promise<record>, cancel()}; never rejects.
function startCompletion(target, agent, o, req) {
    const body = {
        prompt: req.prompt, max_tokens: o.maxTokens, temperature: o.temperature, stream: true,
        stream_options: { include_usage: true }, cache_prompt: true,
    };
    if (req.suffix !== undefined) body.suffix = req.suffix;
    if (o.model) body.model = o.model;
    const payload = JSON.stringify(body);
    const rec = {
        tag: req.tag, start_ms: 0, end_ms: 0, ttft_ms: null, itl_ms: [], events: 0, tokens: 0,
        prompt_tokens: null, cached_tokens: null, outcome: null, status: null, served_by: null, error: null,
    };
    let hreq = null, timer = null, settle;
    const done = new Promise((res) => { settle = res; });
    const t0 = performance.now();
    rec.start_ms = t0;
    let last = 0, usage = null, timings = null, finished = false;

    const finish = (outcome, error) => {
        if (rec.outcome) return;
        clearTimeout(timer);
        rec.outcome = outcome;
        rec.error = error || null;
        rec.end_ms = performance.now();
        if (usage && typeof usage.completion_tokens === "number" && outcome === "ok") rec.tokens = usage.completion_tokens;
        else rec.tokens = rec.events;
        if (usage && typeof usage.prompt_tokens === "number") rec.prompt_tokens = usage.prompt_tokens;
        const det = usage && usage.prompt_tokens_details;
        if (det && typeof det.cached_tokens === "number") rec.cached_tokens = det.cached_tokens;
        else if (timings && typeof timings.cache_n === "number") rec.cached_tokens = timings.cache_n;
        else if (timings && typeof timings.prompt_n === "number" && rec.prompt_tokens !== null)
            rec.cached_tokens = Math.max(0, rec.prompt_tokens - timings.prompt_n);
        settle(rec);
    };
    const onEvent = (data) => {
        if (data === "[DONE]") { finished = true; return; }
        let j;
        try { j = JSON.parse(data); } catch { finish("error", "bad SSE JSON"); hreq.destroy(); return; }
        if (j.error) { finish("error", `stream error: ${j.error.code || j.error.message || "?"}`); hreq.destroy(); return; }
        const c = Array.isArray(j.choices) && j.choices[0];
        if (c && typeof c.text === "string" && c.text.length > 0) {
            const now = performance.now();
            if (rec.ttft_ms === null) rec.ttft_ms = now - t0;
            else rec.itl_ms.push(now - last);
            last = now;
            rec.events++;
        }
        if (c && c.finish_reason) finished = true;
        if (j.usage) usage = j.usage;
        if (j.timings) timings = j.timings;
    };

    hreq = http.request({
        host: target.host, port: target.port, path: `${target.base}/v1/completions`, method: "POST", agent,
        headers: {
            "content-type": "application/json", "content-length": Buffer.byteLength(payload), accept: "text/event-stream",
            ...(req.headers || {}),
        },
    });
    hreq.on("response", (res) => {
        rec.status = res.statusCode;
        // which replica answered, when a load balancer says so (deploy/haproxy/haproxy.cfg does)
        rec.served_by = res.headers["x-codemoe-replica"] || null;
        res.setEncoding("utf8");
        let buf = "";
        if (res.statusCode !== 200) {
            res.on("data", (d) => { if (buf.length < 4096) buf += d; });
            res.on("end", () => finish("error", `HTTP ${res.statusCode}: ${buf.slice(0, 200)}`));
            res.on("error", () => finish("error", `HTTP ${res.statusCode}`));
            return;
        }
        res.on("data", (d) => {
            buf += d;
            let k;
            // SSE events end with a blank line; a data field may be split across reads
            while ((k = buf.search(/\r?\n\r?\n/)) >= 0) {
                const ev = buf.slice(0, k);
                buf = buf.slice(k).replace(/^\r?\n\r?\n/, "");
                const data = ev.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
                if (data) onEvent(data);
                if (rec.outcome) return;
            }
        });
        res.on("end", () => finish(finished ? "ok" : "error", finished ? null : "stream ended early"));
        res.on("error", (e) => finish("error", e.message));
    });
    hreq.on("error", (e) => finish("error", e.code || e.message));
    timer = setTimeout(() => { finish("error", "timeout"); hreq.destroy(); }, o.timeout * 1000);
    hreq.end(payload);
    return {
        done,
        // the client gives up on the request, as an editor does on the next keystroke
        cancel() {
            if (rec.outcome) return;
            finish("cancelled");
            hreq.destroy();
        },
    };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------------------------------ metrics

async function getText(target, p) {
    return new Promise((resolve) => {
        const r = http.get({ host: target.host, port: target.port, path: target.base + p, agent: false }, (res) => {
            let b = "";
            res.setEncoding("utf8");
            res.on("data", (d) => { b += d; });
            res.on("end", () => resolve(res.statusCode === 200 ? b : null));
            res.on("error", () => resolve(null));
        });
        r.on("error", () => resolve(null));
        r.setTimeout(5000, () => { r.destroy(); resolve(null); });
    });
}

// Prometheus text -> {"name{labels}": value}, histogram buckets left out
function parseMetrics(text) {
    const m = {};
    if (!text) return m;
    for (const line of text.split("\n")) {
        if (!line || line.startsWith("#")) continue;
        const k = line.lastIndexOf(" ");
        if (k < 0) continue;
        const name = line.slice(0, k), v = Number(line.slice(k + 1));
        if (name.includes("_bucket{") || !Number.isFinite(v)) continue;
        m[name] = v;
    }
    return m;
}

function metricDeltas(a, b) {
    const d = {};
    for (const [k, v] of Object.entries(b)) if (k in a && v !== a[k]) d[k] = +(v - a[k]).toFixed(6);
    return d;
}

// ------------------------------------------------------------------------------------------ run

// One user of the typing workload (user u of o.concurrency): types problems u, u+C, u+2C, ... (C =
// o.concurrency), each from the end of its prompt, while claim() grants requests; every record goes to
// onRecord when its request ends. o.userHeaders(u), if set, gives extra request headers of user u (an
// affinity key behind a load balancer). Also used by tests/integration/test_deploy_haproxy.mjs.
export async function typingUser(target, agent, o, problems, u, claim, onRecord) {
    const r = rng(o.seed * 1000003 + u);
    let file = u, cursor = -1, text = "", inflight = null;
    while (true) {
        const burst = randint(r, o.burst);
        let stop = false;
        for (let k = 0; k < burst; k++) {
            if (cursor < 0 || cursor >= text.length) {
                // next file: user u types files u, u+C, u+2C, ... starting at the prompt's end
                const p = problems[file % problems.length];
                file += o.concurrency;
                text = p.prompt + p.solution;
                cursor = p.prompt.length;
            }
            cursor = Math.min(text.length, cursor + randint(r, o.typeChars));
            if (!claim()) { stop = true; break; }   // the last suggestion is still awaited below
            if (inflight) inflight.cancel();
            inflight = startCompletion(target, agent, o, { tag: `user${u}`, prompt: text.slice(0, cursor), headers: o.userHeaders ? o.userHeaders(u) : undefined });
            inflight.done.then(onRecord);
            await sleep(randint(r, o.typeMs));
        }
        if (inflight) {
            await inflight.done;   // the user reads the suggestion of the burst's last keystroke
            inflight = null;
        }
        if (stop) break;
        await sleep(randint(r, o.thinkMs));
    }
}

async function run(o) {
    const target = loopbackTarget(o.url);
    const problems = loadProblems(o.data, o.langs, o.seed);
    // One connection per request, as on both servers alike: a kept-alive socket that the server closes
    // between requests (cpp-httplib does after a few requests) turns a POST into a spurious ECONNRESET.
    const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
    const records = [];
    let started = 0, t0 = 0;
    const claim = () => {
        if (started >= o.requests || performance.now() - t0 >= o.duration * 1000) return false;
        started++;
        return true;
    };

    for (let i = 0; i < o.warmup; i++) {
        const r = await startCompletion(target, agent, { ...o, maxTokens: 4 }, { tag: "warmup", prompt: "def hello_world():\n" }).done;
        if (r.outcome !== "ok") die(`warm-up request failed: ${r.error}`);
    }
    const before = parseMetrics(await getText(target, "/metrics"));
    const load1 = os.loadavg()[0];
    t0 = performance.now();

    if (o.workload === "typing") {
        const user = (u) => typingUser(target, agent, o, problems, u, claim, (rec) => records.push(rec));
        await Promise.all(Array.from({ length: o.concurrency }, (_, u) => user(u)));
    } else {
        const reqs = buildRequests(o, problems);
        let next = 0;
        const user = async () => {
            while (claim()) {
                const rec = await startCompletion(target, agent, o, reqs[next++ % reqs.length]).done;
                records.push(rec);
            }
        };
        await Promise.all(Array.from({ length: o.concurrency }, () => user()));
    }
    const wallMs = records.length ? Math.max(...records.map((r) => r.end_ms)) - t0 : 0;
    const after = parseMetrics(await getText(target, "/metrics"));
    agent.destroy();

    for (const r of records) {
        r.start_ms = +(r.start_ms - t0).toFixed(3);
        r.end_ms = +(r.end_ms - t0).toFixed(3);
        if (r.ttft_ms !== null) r.ttft_ms = +r.ttft_ms.toFixed(3);
        r.itl_ms = r.itl_ms.map((x) => +x.toFixed(3));
    }
    records.sort((a, b) => a.start_ms - b.start_ms);
    const deltas = metricDeltas(before, after);
    const summary = summarize(o, records, wallMs, deltas, load1);
    return { summary, metrics_delta: deltas, records };
}

function pct(xs, p) {
    if (!xs.length) return null;
    const s = [...xs].sort((a, b) => a - b);
    return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

// Tokens the server ran through its model during the run, from its own counters (prompt tokens it did
// not take from a cache, plus generated ones), cancelled requests included: codemoe's forward-pass tokens,
// llama-server's processed prompt tokens + predicted tokens. null for a server with neither.
function serverTokens(d) {
    if ("codemoe_batch_tokens_total" in d) return d.codemoe_batch_tokens_total;
    if ("llamacpp:prompt_tokens_total" in d || "llamacpp:tokens_predicted_total" in d)
        return (d["llamacpp:prompt_tokens_total"] || 0) + (d["llamacpp:tokens_predicted_total"] || 0);
    return null;
}

export function summarize(o, records, wallMs, deltas, load1) {
    const ok = records.filter((r) => r.outcome === "ok");
    const errs = records.filter((r) => r.outcome === "error");
    const tokens = records.reduce((s, r) => s + r.tokens, 0);
    const ttft = records.filter((r) => r.ttft_ms !== null).map((r) => r.ttft_ms);
    const itl = records.flatMap((r) => r.itl_ms);
    const withCache = ok.filter((r) => r.cached_tokens !== null && r.prompt_tokens);
    const ptok = withCache.reduce((s, r) => s + r.prompt_tokens, 0);
    const ctok = withCache.reduce((s, r) => s + r.cached_tokens, 0);
    const errKinds = {};
    for (const r of errs) errKinds[r.error] = (errKinds[r.error] || 0) + 1;
    const pc = Object.keys(deltas).filter((k) => /prefix_cache/.test(k));
    const r3 = (x) => (x === null ? null : +x.toFixed(3));
    return {
        label: o.label || o.url, url: o.url, workload: o.workload, concurrency: o.concurrency,
        max_tokens: o.maxTokens, fim: o.workload === "fim" ? o.fim : undefined, seed: o.seed,
        load1: +load1.toFixed(2), wall_s: r3(wallMs / 1000),
        requests: records.length, ok: ok.length, cancelled: records.filter((r) => r.outcome === "cancelled").length,
        errors: errs.length, error_kinds: errKinds,
        generated_tokens: tokens, tokens_per_s: wallMs > 0 ? r3(tokens / (wallMs / 1000)) : null,
        ttft_n: ttft.length, ttft_p50_ms: r3(pct(ttft, 50)), ttft_p99_ms: r3(pct(ttft, 99)),
        ttft_ok_p50_ms: r3(pct(ok.filter((r) => r.ttft_ms !== null).map((r) => r.ttft_ms), 50)),
        itl_n: itl.length, itl_p50_ms: r3(pct(itl, 50)), itl_p99_ms: r3(pct(itl, 99)),
        prompt_tokens: ok.reduce((s, r) => s + (r.prompt_tokens || 0), 0),
        cache_source: withCache.length ? "usage/timings" : null,
        cache_hit_ratio: ptok > 0 ? +(ctok / ptok).toFixed(4) : null,
        prefix_cache_metrics: pc.length ? Object.fromEntries(pc.map((k) => [k, deltas[k]])) : null,
        server_tokens: serverTokens(deltas),
    };
}

// ------------------------------------------------------------------------------------------ tables

const f = (x, d = 1) => (x === null || x === undefined ? "-" : Number(x).toFixed(d));
const HEAD = "| server | workload | users | requests ok/cancelled/err | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | cache hit | server tokens | load |";
const SEP = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

function row(s) {
    const cache = s.cache_hit_ratio === null ? "-" : `${(100 * s.cache_hit_ratio).toFixed(1)}%`;
    return `| ${s.label} | ${s.workload} | ${s.concurrency} | ${s.ok}/${s.cancelled}/${s.errors} | ${f(s.tokens_per_s)} | ` +
        `${f(s.ttft_p50_ms)} | ${f(s.ttft_p99_ms)} | ${f(s.itl_p50_ms)} | ${f(s.itl_p99_ms)} | ${cache} | ` +
        `${s.server_tokens === null || s.server_tokens === undefined ? "-" : s.server_tokens} | ${f(s.load1, 2)} |`;
}

// Side-by-side tables of saved runs: all rows, then ours/theirs ratios for every (workload, users) that
// two labels share (the first label seen is "ours").
function report(files) {
    const runs = files.map((p) => {
        let j;
        try { j = JSON.parse(fs.readFileSync(p, "utf8")); } catch (e) { die(`${p}: ${e.message}`); }
        if (j.summary.server_tokens === undefined) j.summary.server_tokens = serverTokens(j.metrics_delta || {});
        return j.summary;
    });
    const lines = [HEAD, SEP, ...runs.map(row)];
    const labels = [...new Set(runs.map((s) => s.label))];
    if (labels.length >= 2) {
        const [a, b] = labels;
        const key = (s) => `${s.workload}/${s.concurrency}`;
        const A = new Map(runs.filter((s) => s.label === a).map((s) => [key(s), s]));
        const B = new Map(runs.filter((s) => s.label === b).map((s) => [key(s), s]));
        const ratio = (x, y) => (x === null || y === null || !y ? "-" : (x / y).toFixed(2));
        lines.push("", `Ratios ${a} / ${b} (tok/s: above 1 = ${a} faster; latencies: below 1 = ${a} faster):`, "",
            "| workload | users | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |", "|---|---:|---:|---:|---:|---:|---:|");
        for (const [k, x] of A) {
            const y = B.get(k);
            if (!y) continue;
            lines.push(`| ${x.workload} | ${x.concurrency} | ${ratio(x.tokens_per_s, y.tokens_per_s)} | ` +
                `${ratio(x.ttft_p50_ms, y.ttft_p50_ms)} | ${ratio(x.ttft_p99_ms, y.ttft_p99_ms)} | ` +
                `${ratio(x.itl_p50_ms, y.itl_p50_ms)} | ${ratio(x.itl_p99_ms, y.itl_p99_ms)} |`);
        }
    }
    return lines.join("\n");
}

// ------------------------------------------------------------------------------------------ main

async function main() {
    const o = parseArgs(process.argv.slice(2));
    if (o.report) {
        if (!o.report.length) die("--report: no files");
        console.log(report(o.report));
        return;
    }
    const out = await run(o);
    if (o.json) fs.writeFileSync(o.json, JSON.stringify({ options: { ...o, report: undefined }, ...out }, null, 1) + "\n");
    if (!o.quiet) {
        console.log([HEAD, SEP, row(out.summary)].join("\n"));
        const ek = Object.entries(out.summary.error_kinds);
        if (ek.length) console.log("errors: " + ek.map(([k, v]) => `${v} x ${k}`).join(", "));
    }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) main();
