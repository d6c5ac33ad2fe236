#!/usr/bin/env node
/*
 * openapi_conformance.mjs - sends real requests to a running codemoe server and checks every status
 * code, content type and body (JSON responses, each SSE event, error bodies) against openapi.yaml with
 * ajv, plus the invariants a schema cannot express (usage sums, one finish_reason per streamed choice,
 * streamed text == non-streamed text at temperature 0, no stop string in any output).
 *
 *   CM_BASE_URL=http://127.0.0.1:8080 [CM_API_KEY=key] [CM_MAX_BODY=bytes] [CM_OPENAPI=spec.yaml] \
 *     node tests/integration/openapi_conformance.mjs
 *
 * Needs tests/js/node_modules (cd tests/js && npm ci). Exits 0 when everything conforms, 1 on any
 * violation (each is printed), 2 on a usage error or an unreachable server.
 */
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');
const require = createRequire(join(root, 'tests', 'js', 'package.json'));
const Ajv2020 = require('ajv/dist/2020').default;
const YAML = require('yaml');

const base = (process.env.CM_BASE_URL || '').replace(/\/+$/, '');
if (!base) {
  console.error('set CM_BASE_URL to the running server, e.g. http://127.0.0.1:8080');
  process.exit(2);
}
const apiKey = process.env.CM_API_KEY || '';
const maxBody = Number(process.env.CM_MAX_BODY || 4 * 1024 * 1024);

/* ------------------------------------------------------------ the spec */

const spec = YAML.parse(readFileSync(process.env.CM_OPENAPI || join(root, 'openapi.yaml'), 'utf8'));
// the spec documents this release: its version is meson's project version (what `codemoe --version` prints)
if (process.env.CM_VERSION && spec.info.version !== process.env.CM_VERSION) {
  console.error(`openapi.yaml info.version ${spec.info.version} != the project version ${process.env.CM_VERSION} (meson.build)`);
  process.exit(1);
}
const ajv = new Ajv2020({ strict: false, allErrors: true });
const SPEC_ID = 'https://codemoe.invalid/openapi.yaml';
ajv.addSchema({ $id: SPEC_ID, components: { schemas: spec.components.schemas } });
const validators = new Map();
function validatorFor(ref) {
  if (!validators.has(ref)) validators.set(ref, ajv.getSchema(SPEC_ID + ref));
  return validators.get(ref);
}

/* Resolves {$ref: '#/components/...'} in the spec document (responses, schemas). */
function deref(node) {
  while (node && node.$ref) {
    node = node.$ref.slice(2).split('/').reduce((o, k) => o && o[k], spec);
  }
  return node;
}

/* The spec's operation for a concrete path: matches templates like /v1/models/{model}. */
function operation(method, path) {
  const p = path.split('?')[0];
  for (const [tmpl, item] of Object.entries(spec.paths)) {
    const re = new RegExp('^' + tmpl.replace(/\{[^}]+\}/g, '[^/]+') + '$');
    if (re.test(p)) return { tmpl, op: item[method.toLowerCase()] };
  }
  return { tmpl: null, op: null };
}

/* ------------------------------------------------------------ reporting */

let checks = 0;
const violations = [];
function fail(where, msg) {
  violations.push(`${where}: ${msg}`);
  console.error(`FAIL ${where}: ${msg}`);
}
function expect(cond, where, msg) {
  checks++;
  if (!cond) fail(where, msg);
  return !!cond;
}

/* Validates value against a schema node (a $ref into components or an inline schema). */
function validate(schemaNode, value, where) {
  checks++;
  let v;
  if (schemaNode.$ref) {
    v = validatorFor(schemaNode.$ref);
  } else {
    /* inline schema (e.g. a oneOf of refs): make its refs absolute, then compile it on its own */
    const abs = JSON.parse(JSON.stringify(schemaNode).replaceAll('"#/components/', `"${SPEC_ID}#/components/`));
    const key = JSON.stringify(abs);
    if (!validators.has(key)) validators.set(key, ajv.compile(abs));
    v = validators.get(key);
  }
  if (!v) return fail(where, `no validator for ${JSON.stringify(schemaNode)}`);
  if (!v(value)) {
    const errs = v.errors.slice(0, 5).map((e) => `${e.instancePath || '/'} ${e.message}`).join('; ');
    fail(where, `does not match ${schemaNode.$ref || 'schema'}: ${errs}; body ${JSON.stringify(value).slice(0, 300)}`);
    return false;
  }
  return true;
}

/* ------------------------------------------------------------ HTTP */

async function call(method, path, { body, headers = {}, auth = true, raw } = {}) {
  const h = { ...headers };
  if (auth && apiKey) h['Authorization'] = `Bearer ${apiKey}`;
  let payload;
  if (raw !== undefined) payload = raw;
  else if (body !== undefined) payload = JSON.stringify(body);
  if (payload !== undefined && !h['Content-Type']) h['Content-Type'] = 'application/json';
  const res = await fetch(base + path, { method, headers: h, body: payload });
  const text = await res.text();
  return { status: res.status, type: (res.headers.get('content-type') || '').split(';')[0].trim(), headers: res.headers, text };
}

/* Checks a response against the spec: documented status, documented content type, body schema.
 * Returns the parsed JSON body (or the text for non-JSON types). */
function conform(method, path, res, where) {
  const { tmpl, op } = operation(method, path);
  where = where || `${method} ${path}`;
  if (!op) {
    /* unknown URL or method: the server must still answer with the error schema */
    expect([404, 405].includes(res.status), where, `undocumented route answered ${res.status}`);
    const j = parseJSON(res.text, where);
    if (j !== undefined) validate({ $ref: '#/components/schemas/ErrorResponse' }, j, where);
    return j;
  }
  const resp = deref(op.responses[String(res.status)]);
  if (!expect(resp, where, `status ${res.status} is not documented for ${method} ${tmpl} (body ${res.text.slice(0, 200)})`))
    return undefined;
  if (!resp.content) {
    return res.text;
  }
  const media = resp.content[res.type];
  if (!expect(media, where, `content type '${res.type}' not documented for ${res.status} (have ${Object.keys(resp.content)})`))
    return undefined;
  if (res.type === 'application/json') {
    const j = parseJSON(res.text, where);
    if (j !== undefined) validate(media.schema, j, where);
    return j;
  }
  if (res.type === 'text/event-stream') return res.text; /* events are checked by sse() */
  if (res.type === 'application/x-ndjson') return res.text; /* lines are checked by ndjsonLines() */
  return res.text;
}

function parseJSON(text, where) {
  try {
    return JSON.parse(text);
  } catch (e) {
    fail(where, `body is not JSON: ${text.slice(0, 200)}`);
    return undefined;
  }
}

/* Splits an SSE body into its data payloads; checks the framing. */
function sseEvents(text, where) {
  expect(text.endsWith('\n\n'), where, 'stream does not end with a blank line');
  const events = [];
  for (const block of text.split('\n\n')) {
    if (block === '') continue;
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue; /* comment / keep-alive */
      if (line.startsWith('data: ')) data.push(line.slice(6));
      else if (line.startsWith('data:')) data.push(line.slice(5));
      else expect(false, where, `unexpected SSE line ${JSON.stringify(line.slice(0, 80))}`);
    }
    if (data.length) events.push(data.join('\n'));
  }
  return events;
}

/* ------------------------------------------------------------ the checks */

const errorRef = { $ref: '#/components/schemas/ErrorResponse' };
const chunkRef = { $ref: '#/components/schemas/CompletionChunk' };
const requestRef = { $ref: '#/components/schemas/CompletionRequest' };

async function waitReady() {
  const deadline = Date.now() + 120e3;
  for (;;) {
    let res;
    try {
      res = await call('GET', '/health', { auth: false });
    } catch (e) {
      if (Date.now() > deadline) {
        console.error(`server at ${base} unreachable: ${e.message}`);
        process.exit(2);
      }
      await new Promise((r) => setTimeout(r, 250));
      continue;
    }
    conform('GET', '/health', res);
    if (res.status === 200) return;
    if (Date.now() > deadline) {
      fail('GET /health', `not ready after 120 s (status ${res.status})`);
      return;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

function checkUsage(j, where) {
  const u = j.usage;
  if (!u) return;
  expect(u.total_tokens === u.prompt_tokens + u.completion_tokens, where, `usage does not add up: ${JSON.stringify(u)}`);
}

function checkCompletion(j, req, where) {
  if (!j || !Array.isArray(j.choices)) return;
  const nPrompts = Array.isArray(req.prompt) && typeof req.prompt[0] !== 'number' ? req.prompt.length : 1;
  const n = req.n || 1;
  expect(j.choices.length === nPrompts * n, where, `${j.choices.length} choices, expected ${nPrompts * n}`);
  const idx = j.choices.map((c) => c.index).sort((a, b) => a - b);
  expect(idx.every((v, i) => v === i), where, `choice indices ${idx}`);
  checkUsage(j, where);
  const maxTokens = req.max_tokens ?? 16;
  expect(j.usage.completion_tokens <= maxTokens * nPrompts * n, where, `completion_tokens ${j.usage.completion_tokens} > max`);
  const stops = req.stop === undefined || req.stop === null ? [] : [].concat(req.stop);
  for (const c of j.choices) {
    for (const s of stops) expect(!c.text.includes(s), where, `choice ${c.index} text contains stop ${JSON.stringify(s)}`);
    if (req.logprobs !== undefined && req.logprobs !== null) {
      const l = c.logprobs;
      if (!expect(l, where, 'logprobs requested but null')) continue;
      const k = l.tokens.length;
      expect(l.token_logprobs.length === k && l.top_logprobs.length === k && l.text_offset.length === k, where,
        'logprobs arrays differ in length');
      for (const t of l.top_logprobs) if (t) expect(Object.keys(t).length <= req.logprobs, where, 'too many top_logprobs');
      for (let i = 1; i < k; i++) expect(l.text_offset[i] >= l.text_offset[i - 1], where, 'text_offset decreases');
      if (req.echo && typeof req.prompt === 'string') expect(c.text.startsWith(req.prompt), where, 'echo text missing');
    } else {
      expect(c.logprobs === null, where, 'logprobs present though not requested');
    }
  }
}

async function completion(req, where) {
  validate(requestRef, req, where + ' (request vs. spec)'); /* the spec must admit what the server accepts */
  const res = await call('POST', '/v1/completions', { body: req });
  const j = conform('POST', '/v1/completions', res, where);
  expect(res.status === 200, where, `status ${res.status}: ${res.text.slice(0, 300)}`);
  if (res.status === 200) checkCompletion(j, req, where);
  return j;
}

/* A streamed completion: every event validated; returns the text per choice index. */
async function streamed(req, where) {
  validate(requestRef, req, where + ' (request vs. spec)');
  const res = await call('POST', '/v1/completions', { body: req });
  conform('POST', '/v1/completions', res, where);
  if (!expect(res.status === 200 && res.type === 'text/event-stream', where, `status ${res.status} type ${res.type}: ${res.text.slice(0, 300)}`))
    return null;
  const events = sseEvents(res.text, where);
  expect(events.length > 0 && events[events.length - 1] === '[DONE]', where, 'stream does not end with [DONE]');
  const texts = new Map(), finished = new Map();
  let usageChunk = null, id = null;
  const includeUsage = !!(req.stream_options && req.stream_options.include_usage);
  for (let e = 0; e < events.length; e++) {
    if (events[e] === '[DONE]') {
      expect(e === events.length - 1, where, '[DONE] is not the last event');
      continue;
    }
    const j = parseJSON(events[e], where);
    if (j === undefined) continue;
    if (j.error) {
      validate(errorRef, j, where + ' (error event)');
      fail(where, `stream error event: ${events[e]}`);
      continue;
    }
    validate(chunkRef, j, `${where} event ${e}`);
    id = id || j.id;
    expect(j.id === id, where, 'chunk ids differ within one stream');
    if (includeUsage) expect('usage' in j, where, 'include_usage: chunk without usage key');
    else expect(!('usage' in j), where, 'usage key without include_usage');
    if (j.choices.length === 0) {
      expect(includeUsage && j.usage, where, 'chunk without choices that is not the usage chunk');
      expect(!usageChunk, where, 'two usage chunks');
      usageChunk = j;
      continue;
    }
    expect(!usageChunk, where, 'choice chunk after the usage chunk');
    for (const c of j.choices) {
      expect(!finished.has(c.index), where, `choice ${c.index} continues after its finish_reason`);
      texts.set(c.index, (texts.get(c.index) || '') + c.text);
      if (c.finish_reason) finished.set(c.index, c.finish_reason);
      if (req.logprobs !== undefined && req.logprobs !== null) expect(c.logprobs, where, 'chunk without logprobs');
    }
  }
  const nPrompts = Array.isArray(req.prompt) && typeof req.prompt[0] !== 'number' ? req.prompt.length : 1;
  const nChoices = nPrompts * (req.n || 1);
  for (let i = 0; i < nChoices; i++) expect(finished.has(i), where, `choice ${i} never got a finish_reason`);
  if (includeUsage) {
    if (expect(usageChunk, where, 'include_usage but no usage chunk')) checkUsage(usageChunk, where);
  }
  const stops = req.stop === undefined || req.stop === null ? [] : [].concat(req.stop);
  for (const [i, t] of texts) for (const s of stops) expect(!t.includes(s), where, `streamed choice ${i} contains stop ${JSON.stringify(s)}`);
  return { texts, finished, id };
}

/* Chat completions: the plain object and every streamed event against the spec; streamed text ==
 * non-streamed text at temperature 0; a choice's first delta carries the role. */
async function chat(mid, where) {
  const CP = '/v1/chat/completions';
  const req = { model: mid, messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: [{ type: 'text', text: 'def add(a, b):' }] }],
    max_completion_tokens: 6, temperature: 0 };
  validate({ $ref: '#/components/schemas/ChatCompletionRequest' }, req, where + ' (request vs. spec)');
  const res = await call('POST', CP, { body: req });
  const j = conform('POST', CP, res, where);
  if (!expect(res.status === 200 && j, where, `status ${res.status}: ${res.text.slice(0, 300)}`)) return;
  checkUsage(j, where);
  const lp = await call('POST', CP, { body: { ...req, n: 2, seed: 3, temperature: 0.8, logprobs: true, top_logprobs: 2 } });
  const jl = conform('POST', CP, lp, where + ' n=2 logprobs');
  if (jl && jl.choices) expect(jl.choices.length === 2 && jl.choices.every((c) => c.logprobs && c.logprobs.content.length > 0),
    where + ' n=2 logprobs', 'two choices with logprobs expected');
  const sres = await call('POST', CP, { body: { ...req, stream: true, stream_options: { include_usage: true } } });
  conform('POST', CP, sres, where + ' stream');
  if (!expect(sres.status === 200 && sres.type === 'text/event-stream', where + ' stream', `status ${sres.status}`)) return;
  const events = sseEvents(sres.text, where + ' stream');
  expect(events[events.length - 1] === '[DONE]', where + ' stream', 'stream does not end with [DONE]');
  let text = '', first = true, usage = null;
  for (const ev of events.slice(0, -1)) {
    const c = parseJSON(ev, where + ' stream');
    if (!c) continue;
    validate({ $ref: '#/components/schemas/ChatCompletionChunk' }, c, where + ' stream event');
    if (c.choices.length === 0) { usage = c.usage; continue; }
    const d = c.choices[0].delta;
    expect(first ? d.role === 'assistant' : d.role === undefined, where + ' stream', `role in ${ev.slice(0, 200)}`);
    first = false;
    text += d.content || '';
  }
  expect(usage && usage.completion_tokens === j.usage.completion_tokens, where + ' stream', 'usage chunk');
  expect(text === j.choices[0].message.content, where + ' stream', `streamed ${JSON.stringify(text)} != ${JSON.stringify(j.choices[0].message.content)}`);
  await expectError('POST', CP, { body: { model: mid, messages: [] } }, 400, 'messages', undefined, where + ' error messages');
}

/* A streamed response's events (SSE data payloads or NDJSON lines), each validated against the
 * operation's x-event-schema; returns the parsed events. */
function streamEvents(method, path, res, where) {
  const { op } = operation(method, path);
  const media = op && deref(op.responses['200']).content[res.type];
  if (!expect(media && media['x-event-schema'], where, `no event schema for ${res.type}`)) return [];
  let raw;
  if (res.type === 'application/x-ndjson') {
    expect(res.text.endsWith('\n'), where, 'NDJSON does not end with a newline');
    raw = res.text.split('\n').filter((l) => l !== '');
  } else {
    raw = sseEvents(res.text, where);
  }
  const out = [];
  for (const [i, t] of raw.entries()) {
    const j = parseJSON(t, where);
    if (j === undefined) continue;
    validate(media['x-event-schema'], j, `${where} event ${i}`);
    out.push(j);
  }
  return out;
}

/* Ollama's API: listings, generate (plain, streamed, FIM when the model has FIM tokens), chat when the
 * model can chat, and its error shape. */
async function ollama(model) {
  for (const p of ['/api/version', '/api/tags', '/api/ps']) {
    const r = await call('GET', p);
    conform('GET', p, r);
    expect(r.status === 200, p, `status ${r.status}`);
  }
  const show = await call('POST', '/api/show', { body: { model: model.id } });
  conform('POST', '/api/show', show);
  /* one model served without --strict-model: any name selects it */
  const showAny = await call('POST', '/api/show', { body: { model: 'no-such-model' } });
  conform('POST', '/api/show', showAny, 'ollama show any name');
  expect(showAny.status === 200, 'ollama show any name', `status ${showAny.status}`);
  const G = '/api/generate';
  const req = { model: model.id, prompt: 'def add(a, b):', raw: true, options: { num_predict: 5, temperature: 0 } };
  const full = await call('POST', G, { body: { ...req, stream: false } });
  const fj = conform('POST', G, full, 'ollama generate');
  expect(full.status === 200 && fj && fj.eval_count <= 5, 'ollama generate', `status ${full.status}: ${full.text.slice(0, 200)}`);
  const st = await call('POST', G, { body: req });
  conform('POST', G, st, 'ollama generate stream');
  if (expect(st.status === 200 && st.type === 'application/x-ndjson', 'ollama generate stream', `status ${st.status} type ${st.type}`)) {
    const ev = streamEvents('POST', G, st, 'ollama generate stream');
    const last = ev[ev.length - 1];
    expect(last && last.done === true && ev.slice(0, -1).every((e) => e.done === false), 'ollama generate stream', 'done only last');
    if (fj) expect(ev.map((e) => e.response).join('') === fj.response, 'ollama generate stream', 'streamed text != not streamed');
  }
  if (model.fim) {
    const fim = await call('POST', G, { body: { ...req, suffix: '\n    return a + b\n', stream: false } });
    conform('POST', G, fim, 'ollama generate suffix');
    expect(fim.status === 200, 'ollama generate suffix', `status ${fim.status}`);
  }
  const C = '/api/chat';
  const chatReq = { model: model.id, messages: [{ role: 'user', content: 'hi' }], options: { num_predict: 4 } };
  if (model.chat) {
    const c1 = await call('POST', C, { body: { ...chatReq, stream: false } });
    conform('POST', C, c1, 'ollama chat');
    const c2 = await call('POST', C, { body: chatReq });
    conform('POST', C, c2, 'ollama chat stream');
    if (c2.status === 200) streamEvents('POST', C, c2, 'ollama chat stream');
  } else {
    await expectError('POST', C, { body: chatReq }, 400, undefined, undefined, 'ollama chat without a template');
  }
  const genAny = await call('POST', G, { body: { model: 'no-such-model', prompt: 'x', stream: false, options: { num_predict: 1 } } });
  conform('POST', G, genAny, 'ollama generate any name');
  expect(genAny.status === 200, 'ollama generate any name', `status ${genAny.status}`);
}

/* llama.cpp's /completion (plain, streamed, response_fields) and /infill. */
async function llamacpp(model) {
  const P = '/completion';
  const req = { prompt: 'import os\n', n_predict: 6, temperature: 0 };
  const full = await call('POST', P, { body: req });
  const fj = conform('POST', P, full, 'llama completion');
  expect(full.status === 200 && fj && fj.stop === true, 'llama completion', `status ${full.status}: ${full.text.slice(0, 200)}`);
  const st = await call('POST', P, { body: { ...req, stream: true } });
  conform('POST', P, st, 'llama completion stream');
  if (st.status === 200) {
    const ev = streamEvents('POST', P, st, 'llama completion stream');
    const last = ev[ev.length - 1];
    expect(last && last.stop === true, 'llama completion stream', 'no final stop:true event');
    if (fj) expect(ev.slice(0, -1).map((e) => e.content).join('') === fj.content, 'llama completion stream', 'streamed text != not streamed');
  }
  const proj = await call('POST', P, { body: { ...req, response_fields: ['content', 'timings/prompt_n'] } });
  const pj = conform('POST', P, proj, 'llama completion response_fields');
  if (pj) expect(Object.keys(pj).sort().join() === 'content,timings/prompt_n', 'llama completion response_fields', JSON.stringify(pj));
  if (fj && fj.content) { /* a stop string: stop_type "word" with the string in stopping_word */
    const stop = fj.content.slice(0, 1);
    const w = await call('POST', P, { body: { ...req, stop: [stop], n_indent: 0, t_max_predict_ms: 0 } });
    const wj = conform('POST', P, w, 'llama completion stop word');
    expect(wj && wj.stop_type === 'word' && wj.stopping_word === stop, 'llama completion stop word', w.text.slice(0, 200));
  }
  await expectError('POST', P, { body: { prompt: 'x', temperature: 'hot' } }, 400, 'temperature', undefined, 'llama completion error');
  const I = '/infill';
  const inf = { input_prefix: 'def add(a, b):\n', input_suffix: '\n', prompt: '    return ',
    input_extra: [{ filename: 'util.py', text: 'def sub(a, b):\n    return a - b\n' }], n_predict: 4, temperature: 0 };
  if (model.fim) {
    const r = await call('POST', I, { body: inf });
    const j = conform('POST', I, r, 'llama infill');
    expect(r.status === 200 && j && j.truncated === false, 'llama infill', `status ${r.status}: ${r.text.slice(0, 200)}`);
  } else {
    await expectError('POST', I, { body: inf }, 400, 'input_suffix', undefined, 'llama infill without FIM');
  }
}

async function expectError(method, path, opts, status, param, code, where) {
  const res = await call(method, path, opts);
  const j = conform(method, path, res, where);
  expect(res.status === status, where, `status ${res.status}, expected ${status}: ${res.text.slice(0, 300)}`);
  if (j && j.error) {
    if (param !== undefined) expect(j.error.param === param, where, `param ${JSON.stringify(j.error.param)}, expected ${JSON.stringify(param)}`);
    if (code !== undefined) expect(j.error.code === code, where, `code ${JSON.stringify(j.error.code)}, expected ${JSON.stringify(code)}`);
  }
  return { res, j };
}

/* An over-limit body. The server may answer 413 from the headers alone and close without reading the
 * body, which makes fetch() fail mid-upload; so send the headers, wait briefly for an early answer,
 * and only then the body. */
async function tooLarge(path) {
  const where = 'error body too large';
  const body = Buffer.from(JSON.stringify({ prompt: 'x'.repeat(maxBody + 1) }));
  const url = new URL(base + path);
  const res = await new Promise((resolve) => {
    const headers = { 'Content-Type': 'application/json', 'Content-Length': body.length };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const req = http.request({ method: 'POST', hostname: url.hostname, port: url.port, path: url.pathname, headers });
    let done = false;
    req.on('response', (r) => {
      const parts = [];
      r.on('data', (d) => parts.push(d));
      r.on('end', () => {
        done = true;
        resolve({ status: r.statusCode, type: (r.headers['content-type'] || '').split(';')[0].trim(),
          text: Buffer.concat(parts).toString('utf8') });
      });
    });
    req.on('error', (e) => { if (!done) { done = true; resolve({ error: e }); } });
    req.flushHeaders();
    setTimeout(() => { if (!done) req.end(body); }, 1000);
  });
  if (!expect(!res.error, where, `no answer: ${res.error && res.error.message}`)) return;
  const j = conform('POST', path, res, where);
  expect(res.status === 413, where, `status ${res.status}, expected 413`);
  return j;
}

async function main() {
  await waitReady();

  /* models */
  const mres = await call('GET', '/v1/models');
  const models = conform('GET', '/v1/models', mres);
  expect(mres.status === 200, 'GET /v1/models', `status ${mres.status}`);
  const model = models && models.data && models.data[0];
  if (!expect(model, 'GET /v1/models', 'no model listed')) return;
  const one = await call('GET', '/v1/models/' + encodeURIComponent(model.id));
  const m1 = conform('GET', '/v1/models/{model}', one, 'GET /v1/models/{id}');
  expect(one.status === 200 && m1 && m1.id === model.id, 'GET /v1/models/{id}', `status ${one.status}`);
  await expectError('GET', '/v1/models/no-such-model', {}, 404, undefined, undefined, 'GET /v1/models/unknown');
  const moeKind = { multipl_moe: 'hybrid', mole: 'mole', qwen3moe: 'sparse' }[model.architecture];
  expect(moeKind ? model.moe && model.moe.kind === moeKind : model.moe === undefined, 'GET /v1/models',
    `architecture ${model.architecture} with moe ${JSON.stringify(model.moe)}`);

  /* metrics */
  const met = await call('GET', '/metrics');
  conform('GET', '/metrics', met);
  expect(met.status === 200 && /^# (HELP|TYPE) /m.test(met.text), 'GET /metrics', 'not Prometheus text');

  /* completions */
  const mid = model.id;
  const base1 = { model: mid, prompt: 'def add(a, b):', max_tokens: 8, temperature: 0 };
  const plain = await completion(base1, 'completion plain');
  if (plain && plain.id) {
    const r = await call('GET', `/v1/completions/${encodeURIComponent(plain.id)}/routing`);
    conform('GET', '/v1/completions/{id}/routing', r, 'GET routing (known id)');
  }
  /* the routing extension in full detail (segment windows on hybrid models) */
  const routed = await completion({ ...base1, routing: 'full' }, 'completion routing full');
  if (routed && routed.id) {
    expect(routed.routing && routed.routing.id === routed.id, 'completion routing full', 'no routing record');
    expect(moeKind ? routed.routing.layers.length > 0 : routed.routing.layers.length === 0,
      'completion routing full', `layers ${JSON.stringify(routed.routing.layers).slice(0, 200)}`);
  }
  /* per-token routing: an entry per position but the last sampled one, each summing into the counts */
  const perTok = await completion({ ...base1, routing: 'tokens' }, 'completion routing tokens');
  if (perTok && perTok.routing) {
    const rt = perTok.routing, u = perTok.usage;
    if (moeKind) {
      expect(rt.tokens && rt.tokens.length === u.prompt_tokens + u.completion_tokens - 1, 'completion routing tokens',
        `${rt.tokens && rt.tokens.length} entries for ${u.prompt_tokens} + ${u.completion_tokens} tokens`);
      if (moeKind !== 'mole' && rt.tokens) {
        const n = rt.layers[0].token.reduce((a, c) => a + c.prompt_tokens + c.generated_tokens, 0);
        const m = rt.tokens.reduce((a, t) => a + t.experts[0].length, 0);
        expect(n === m, 'completion routing tokens', `layer 0: counts ${n}, per-token ids ${m}`);
      }
    } else {
      expect(rt.tokens === undefined, 'completion routing tokens', 'a dense model has no per-token detail');
    }
  }
  await completion({ model: mid, prompt: 'x = ', max_tokens: 6, n: 2, seed: 7, temperature: 0.8, logprobs: 2, echo: true },
    'completion n=2 logprobs echo');
  await completion({ model: mid, prompt: ['a', 'bb'], max_tokens: 4, n: 2, seed: 1 }, 'completion prompt array');
  await completion({ model: mid, prompt: [1, 2, 3], max_tokens: 4 }, 'completion token prompt');
  await completion({ model: mid, prompt: [[1, 2], [3]], max_tokens: 3 }, 'completion token prompts');
  await completion({ prompt: 'no model field', max_tokens: 2, top_k: 5, min_p: 0.05, repetition_penalty: 1.1,
    presence_penalty: 0.5, frequency_penalty: 0.5, logit_bias: { 0: -100 }, user: 'conformance', unknown_extra: 1 },
  'completion extensions + unknown field');
  await completion({ model: mid, prompt: 'for i in range(', max_tokens: 0, echo: true, logprobs: 1 }, 'completion echo max_tokens 0');

  /* stop strings: nothing after a stop, streamed == non-streamed at temperature 0 */
  const greedy = { model: mid, prompt: 'import os\n', max_tokens: 24, temperature: 0 };
  const full = await completion(greedy, 'completion greedy');
  let stop = [' ', '\n'];
  if (full && full.choices && full.choices[0].text.length > 3) stop = [full.choices[0].text.slice(2, 4)];
  const withStop = await completion({ ...greedy, stop }, 'completion with stop');
  const s1 = await streamed({ ...greedy, stream: true }, 'stream greedy');
  if (full && s1) expect(s1.texts.get(0) === full.choices[0].text, 'stream greedy',
    `streamed ${JSON.stringify(s1.texts.get(0))} != non-streamed ${JSON.stringify(full.choices[0].text)}`);
  const s2 = await streamed({ ...greedy, stop, stream: true, stream_options: { include_usage: true } }, 'stream with stop');
  if (withStop && s2) expect(s2.texts.get(0) === withStop.choices[0].text, 'stream with stop',
    `streamed ${JSON.stringify(s2.texts.get(0))} != non-streamed ${JSON.stringify(withStop.choices[0].text)}`);
  await streamed({ model: mid, prompt: ['p', 'q'], n: 2, max_tokens: 5, seed: 3, logprobs: 1, stream: true,
    stream_options: { include_usage: true } }, 'stream n=2 two prompts logprobs');

  /* fill in the middle */
  const fim = { model: mid, prompt: 'def f(x):\n    return ', suffix: '\n\nprint(f(2))\n', max_tokens: 6, temperature: 0 };
  if (model.fim === false) await expectError('POST', '/v1/completions', { body: fim }, 400, 'suffix', undefined, 'fim unsupported');
  else await completion(fim, 'completion fim');

  /* chat completions: answered when the model has a chat template, else refused by name */
  if (model.chat) await chat(mid, 'chat');
  else await expectError('POST', '/v1/chat/completions', { body: { messages: [{ role: 'user', content: 'hi' }] } }, 400,
    'messages', 'model_not_chat_capable', 'chat without a template');

  /* the other dialects */
  await ollama(model);
  await llamacpp(model);

  /* request errors */
  const P = '/v1/completions';
  await expectError('POST', P, { raw: '{"prompt": ' }, 400, null, undefined, 'error invalid JSON');
  await expectError('POST', P, { body: [1, 2] }, 400, null, undefined, 'error body not an object');
  await expectError('POST', P, { body: { prompt: 'a', temperature: 'abc' } }, 400, 'temperature', undefined, 'error type');
  await expectError('POST', P, { body: { prompt: 'a', temperature: 3 } }, 400, 'temperature', undefined, 'error range');
  await expectError('POST', P, { body: { prompt: 'a', top_p: 0 } }, 400, 'top_p', undefined, 'error top_p');
  await expectError('POST', P, { body: { prompt: 'a', n: 0 } }, 400, 'n', undefined, 'error n');
  await expectError('POST', P, { body: { prompt: 'a', best_of: 3 } }, 400, 'best_of', undefined, 'error best_of');
  await expectError('POST', P, { body: { prompt: 'a', logprobs: 99 } }, 400, 'logprobs', undefined, 'error logprobs');
  const stops33 = Array.from({ length: 33 }, (_, i) => 'stop' + i);
  await expectError('POST', P, { body: { prompt: 'a', stop: stops33 } }, 400, 'stop', undefined, 'error stop');
  await completion({ model: mid, prompt: 'a', max_tokens: 2, stop: stops33.slice(0, 32) }, 'completion 32 stops');
  await expectError('POST', P, { body: { max_tokens: 2 } }, 400, 'prompt', undefined, 'error no prompt');
  await expectError('POST', P, { body: { prompt: 'a', max_tokens: 2, n_predict: 2 } }, 400, 'n_predict', undefined,
    'error n_predict with max_tokens');
  await expectError('POST', P, { body: { prompt: 'a', stream_options: { include_usage: true } } }, 400, 'stream_options',
    undefined, 'error stream_options');
  await expectError('POST', P, { body: { prompt: 'a', logit_bias: { abc: 1 } } }, 400, 'logit_bias', undefined, 'error logit_bias');
  await expectError('POST', P, { body: { prompt: 5 } }, 400, 'prompt', undefined, 'error prompt type');
  await expectError('POST', P, { body: { prompt: [-1] } }, 400, 'prompt', undefined, 'error token id');
  await expectError('POST', P, { body: { prompt: 'a', routing: 'everything' } }, 400, 'routing', undefined, 'error routing enum');
  /* one model served: any name is it (the server runs without --strict-model here) */
  await completion({ model: 'gpt-3.5-turbo-instruct', prompt: 'a', max_tokens: 2 }, 'completion any model name');
  const ctx = model.context_length || 4096;
  /* more than the context leaves: clamped (no --strict-context here); a prompt alone over it: 400 */
  const clampReq = { prompt: 'a', max_tokens: ctx + 1, temperature: 0 };
  validate(requestRef, clampReq, 'completion clamped (request vs. spec)');
  const cr = await call('POST', P, { body: clampReq });
  const cj = conform('POST', P, cr, 'completion clamped');
  expect(cr.status === 200 && cj && cj.usage.prompt_tokens + cj.usage.completion_tokens <= ctx, 'completion clamped',
    `status ${cr.status}: ${cr.text.slice(0, 200)}`);
  await expectError('POST', P, { body: { prompt: 'word '.repeat(ctx + 8), max_tokens: 1 } }, 400, 'prompt',
    'context_length_exceeded', 'error prompt alone over the context');
  await tooLarge(P);

  /* other clients' routes */
  if (model.fim !== false) {
    const F = '/v1/fim/completions';
    const fimReq = { model: 'codestral-latest', prompt: 'def f(x):\n    return ', suffix: '\n', max_tokens: 6, temperature: 0 };
    validate({ $ref: '#/components/schemas/FimCompletionRequest' }, fimReq, 'fim request vs. spec');
    const fr = await call('POST', F, { body: fimReq });
    const fj = conform('POST', F, fr, 'fim completion');
    expect(fr.status === 200 && fj && fj.choices[0].message.content !== undefined, 'fim completion', fr.text.slice(0, 300));
    const fs = await call('POST', F, { body: { ...fimReq, stream: true } });
    conform('POST', F, fs, 'fim stream');
    let streamedText = '';
    for (const ev of sseEvents(fs.text, 'fim stream')) {
      if (ev === '[DONE]') continue;
      const j = parseJSON(ev, 'fim stream');
      if (j) validate({ $ref: '#/components/schemas/FimCompletionChunk' }, j, 'fim stream event');
      if (j && j.choices && j.choices[0]) streamedText += j.choices[0].delta.content;
    }
    if (fj && fj.choices) expect(streamedText === fj.choices[0].message.content, 'fim stream',
      `streamed ${JSON.stringify(streamedText)} != ${JSON.stringify(fj.choices[0].message.content)}`);
    await expectError('POST', F, { body: { suffix: 'x' } }, 400, 'prompt', undefined, 'fim error no prompt');
    await expectError('POST', F, { body: { prompt: 'a', echo: true } }, 400, 'echo', undefined, 'fim error echo');
    /* Tabby's request on /v1/completions */
    await completion({ language: 'python', segments: { prefix: 'def f(x):\n    return ', suffix: '\n' }, max_tokens: 4 },
      'completion tabby segments');
  }
  const th = await call('GET', '/v1/health');
  conform('GET', '/v1/health', th, 'tabby health');
  const evReq = { type: 'select', completion_id: 'cmpl-x', choice_index: 0, view_id: 'v', elapsed: 100 };
  validate({ $ref: '#/components/schemas/TabbyEvent' }, evReq, 'tabby event vs. spec');
  const ev = await call('POST', '/v1/events?select_kind=line', { body: evReq });
  conform('POST', '/v1/events', ev, 'tabby event');
  expect(ev.status === 200 && ev.text === '', 'tabby event', `${ev.status} ${ev.text.slice(0, 200)}`);
  await expectError('POST', '/v1/events', { body: { ...evReq, type: 'click' } }, 400, 'type', undefined, 'tabby event error');
  const tk = await call('POST', '/tokenize', { body: { content: 'def f(x):', with_pieces: true } });
  const tj = conform('POST', '/tokenize', tk, 'tokenize');
  const tk2 = await call('POST', '/tokenize', { body: { content: 'def f(x):' } });
  const tj2 = conform('POST', '/tokenize', tk2, 'tokenize ids');
  if (tj && tj2) expect(JSON.stringify(tj.tokens.map((t) => t.id)) === JSON.stringify(tj2.tokens), 'tokenize', 'pieces change ids');
  if (tj2 && tj2.tokens) {
    const dk = await call('POST', '/detokenize', { body: { tokens: tj2.tokens } });
    const dj = conform('POST', '/detokenize', dk, 'detokenize');
    expect(dj && dj.content === 'def f(x):', 'detokenize', `round trip gave ${JSON.stringify(dj)}`);
  }
  await expectError('POST', '/tokenize', { body: { content: 5 } }, 400, 'content', undefined, 'tokenize error');
  await expectError('POST', '/detokenize', { body: { tokens: [-1] } }, 400, 'tokens', undefined, 'detokenize error');
  conform('GET', '/v1/status', await call('GET', '/v1/status'), 'status');
  const pr = await call('GET', '/props');
  const pj = conform('GET', '/props', pr, 'props');
  expect(pj && pj.default_generation_settings.n_ctx === ctx, 'props', `n_ctx ${pj && pj.default_generation_settings.n_ctx} != ${ctx}`);

  /* routes and methods */
  await expectError('GET', '/v1/nope', {}, 404, undefined, undefined, 'error unknown URL');
  await expectError('GET', P, {}, 405, undefined, undefined, 'error wrong method');
  await expectError('GET', '/v1/completions/cmpl-doesnotexist/routing', {}, 404, undefined, undefined, 'error routing unknown id');
  const pre = await call('OPTIONS', P, { auth: false, headers: { Origin: 'http://localhost', 'Access-Control-Request-Method': 'POST' } });
  conform('OPTIONS', P, pre, 'OPTIONS preflight');

  /* auth */
  if (apiKey) {
    const r1 = await expectError('POST', P, { body: { prompt: 'a' }, auth: false }, 401, undefined, undefined, 'auth missing key');
    if (r1.j && r1.j.error) expect(r1.j.error.type === 'authentication_error', 'auth missing key', `type ${r1.j.error.type}`);
    await expectError('POST', P, { body: { prompt: 'a' }, auth: false, headers: { Authorization: 'Bearer wrong-key' } }, 401,
      undefined, undefined, 'auth wrong key');
    await expectError('GET', '/v1/models', { auth: false }, 401, undefined, undefined, 'auth models');
    const h = await call('GET', '/health', { auth: false });
    expect(h.status === 200, 'auth health', '/health must not need a key');
  }
}

try {
  await main();
} catch (e) {
  fail('run', e.stack || String(e));
}
console.log(`openapi conformance: ${checks} checks, ${violations.length} violations`);
process.exit(violations.length ? 1 : 0);
