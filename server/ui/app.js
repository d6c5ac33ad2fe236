/*
 * app.js - the codemoe playground. Streams a completion (or a fill-in-the-middle) from
 * POST /v1/completions with "routing": "tokens", and draws the routing record the stream ends with
 * (openapi.yaml RoutingStats): the tokens coloured by their token-level expert in a chosen layer, a
 * layers x tokens heatmap, the segment windows with their experts, MoLE adapter sets, and the layer's
 * totals. Polls GET /v1/status for the live server view. No framework, no network beyond this server.
 */
'use strict';

const KEY_STORE = 'codemoe-api-key';
const $ = (id) => document.getElementById(id);

const state = {
  models: [],        // ids from /v1/models
  info: null,        // /v1/models/{id} of the selected model
  abort: null,       // AbortController of the running request
  record: null,      // the last routing record
  nTokens: 0,        // prompt + completion tokens of the last response
  statusTimer: 0,
  needKey: false,
};

/* ------------------------------------------------------------ HTTP */

function headers(json) {
  const h = {};
  if (json) h['Content-Type'] = 'application/json';
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = 'Bearer ' + key;
  return h;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/* The message of an error body (OpenAI's {"error": {"message"}}), else the status line. */
async function errorOf(res) {
  let msg = `HTTP ${res.status}`;
  try {
    const j = await res.json();
    if (j && j.error && j.error.message) msg = j.error.message;
  } catch (e) { /* not JSON */ }
  return new HttpError(res.status, msg);
}

async function getJson(path) {
  const res = await fetch(path, { headers: headers(false) });
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

/* ------------------------------------------------------------ API key */

function askKey(title) {
  state.needKey = true;
  $('key-title').textContent = title || 'This server needs an API key';
  $('key-form').hidden = false;
  $('key-input').focus();
}

function onKeySaved(ev) {
  ev.preventDefault();
  const v = $('key-input').value.trim();
  if (!v) return;
  sessionStorage.setItem(KEY_STORE, v);
  $('key-input').value = '';
  $('key-form').hidden = true;
  state.needKey = false;
  loadModels();
  pollStatus();
  $('prompt').focus();
}

function onKeyCleared() {
  sessionStorage.removeItem(KEY_STORE);
  $('key-input').value = '';
  $('key-input').focus();
}

/* Handles an error every call may get: 401 opens the key form. Returns true when handled so. */
function authFailed(e) {
  if (e instanceof HttpError && e.status === 401) {
    askKey(sessionStorage.getItem(KEY_STORE) ? 'The server refused this key: enter another' : undefined);
    return true;
  }
  return false;
}

/* ------------------------------------------------------------ models */

async function loadModels() {
  try {
    const list = await getJson('/v1/models');
    state.models = (list.data || []).map((m) => m.id);
    const sel = $('model');
    const keep = sel.value;
    sel.replaceChildren(...state.models.map((id) => new Option(id, id)));
    if (state.models.includes(keep)) sel.value = keep;
    $('model').disabled = state.models.length < 2;
    await loadModelInfo();
  } catch (e) {
    if (!authFailed(e)) showError('Could not list the models: ' + e.message);
  }
}

async function loadModelInfo() {
  const id = $('model').value;
  if (!id) return;
  try {
    state.info = await getJson('/v1/models/' + encodeURIComponent(id));
  } catch (e) {
    if (!authFailed(e)) showError('Could not read the model: ' + e.message);
    return;
  }
  const moe = state.info.moe || null;
  const langs = moe && moe.kind === 'mole' ? (moe.languages || []) : [];
  $('language').replaceChildren(new Option('Detect from the text', ''), ...langs.map((l) => new Option(l, l)));
  $('language-field').hidden = langs.length === 0;
  $('segment-field').hidden = !(moe && moe.kind === 'hybrid');
  const fim = $('mode').querySelector('option[value="fim"]');
  fim.disabled = state.info.fim === false;
  if (fim.disabled && $('mode').value === 'fim') $('mode').value = 'completion';
  updateHint();
}

function updateHint() {
  $('prompt-hint').textContent = $('mode').value === 'fim'
    ? '(the cursor splits the text into prefix and suffix; Ctrl+Enter runs)' : '(Ctrl+Enter runs)';
}

/* ------------------------------------------------------------ running a request */

function showError(msg) {
  const el = $('error');
  el.textContent = msg;
  el.hidden = !msg;
}

function setRunning(on) {
  $('run').disabled = on;
  $('cancel').disabled = !on;
}

function requestBody() {
  const ta = $('prompt');
  const text = ta.value;
  const body = {
    model: $('model').value,
    max_tokens: Number($('max-tokens').value),
    temperature: Number($('temperature').value),
    stream: true,
    stream_options: { include_usage: true },
    routing: 'tokens',
  };
  let prefix = text, suffix = '';
  if ($('mode').value === 'fim') {
    const at = ta.selectionStart ?? text.length;
    prefix = text.slice(0, at);
    suffix = text.slice(at);
    body.suffix = suffix;
  }
  body.prompt = prefix;
  if (!$('language-field').hidden && $('language').value) body.language = $('language').value;
  if (!$('segment-field').hidden) {
    body.segment_routing = $('segment').value;
    if (body.segment_routing === 'reference') body.max_tokens = 0;
  }
  return { body, prefix, suffix };
}

/* Reads an SSE body: calls onEvent(json) for every "data:" event until [DONE]. */
async function readSse(res, onEvent) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      onEvent(JSON.parse(data));
    }
  }
}

async function run(ev) {
  if (ev) ev.preventDefault();
  if (state.abort) return;
  showError('');
  const { body, prefix, suffix } = requestBody();
  const out = $('output');
  const gen = document.createElement('span');
  gen.className = 'gen';
  out.replaceChildren(document.createTextNode(prefix), gen, document.createTextNode(suffix));
  const ctl = new AbortController();
  state.abort = ctl;
  setRunning(true);
  $('run-state').textContent = 'Running…';
  let id = null, usage = null, record = null, failed = null;
  try {
    const res = await fetch('/v1/completions', { method: 'POST', headers: headers(true), body: JSON.stringify(body), signal: ctl.signal });
    if (!res.ok) throw await errorOf(res);
    await readSse(res, (j) => {
      if (j.error) { failed = j.error.message || 'the stream failed'; return; }
      if (j.id) id = j.id;
      const c = j.choices && j.choices[0];
      if (c && c.text) gen.textContent += c.text;
      if (j.usage) usage = j.usage;
      if (j.routing) record = j.routing;
    });
    if (failed) throw new Error(failed);
    if (!record && id) record = await getJson('/v1/completions/' + encodeURIComponent(id) + '/routing');
    $('run-state').textContent = usage ? `Done: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens.` : 'Done.';
    state.nTokens = usage ? usage.prompt_tokens + usage.completion_tokens : (record ? record.prompt_tokens + record.completion_tokens : 0);
    state.record = record;
    drawRouting();
  } catch (e) {
    if (e.name === 'AbortError') {
      $('run-state').textContent = 'Cancelled.';
    } else if (!authFailed(e)) {
      $('run-state').textContent = '';
      showError(e.message);
    } else {
      $('run-state').textContent = '';
    }
  } finally {
    state.abort = null;
    setRunning(false);
  }
}

function cancel() {
  if (state.abort) state.abort.abort();
}

/* ------------------------------------------------------------ colours */

/* n experts: few get well-separated hues (golden angle); many (sparse models, 128) a continuous scale
 * by id, so neighbouring ids look alike and the legend is a gradient. */
function expertColour(e, n) {
  if (e === undefined || e === null || e < 0) return '#d0d0d0';
  const hue = n <= 16 ? (e * 137.508) % 360 : (e / Math.max(1, n - 1)) * 300;
  return `hsl(${hue.toFixed(1)}, 70%, 72%)`;
}

/* ------------------------------------------------------------ the routing picture */

function tokenLabel(t) {
  if (!t || typeof t.text !== 'string') return '';
  /* part of a character: its bytes, as logprobs give them ("bytes:\xNN...") */
  return t.text.startsWith('bytes:') ? t.text.slice(6) : t.text;
}

/* What a token shows at layer l: {colour, title, key} (key: the expert or adapter set it is counted under). */
function tokenAt(rec, t, l, kind) {
  const n = rec.token_experts || 0;
  if (!t || t.id === null || t.id === undefined) return null;
  if (kind === 'mole') {
    const names = (rec.adapters || []).map((a) => a.name || String(a.adapter));
    const set = t.adapters || [];
    /* coloured by its language adapter (the one a request's "language" selects), else its first */
    const langs = (state.info && state.info.moe && state.info.moe.languages) || [];
    const lang = set.find((a) => langs.includes(names[a]));
    const key = lang === undefined ? (set.length ? set[0] : -1) : lang;
    return { colour: expertColour(key, names.length), key, title: 'adapters: ' + (set.map((a) => names[a] || a).join(', ') || 'none') };
  }
  const ex = (t.experts && t.experts[l]) || [];
  const gates = (t.gates && t.gates[l]) || [];
  const top = ex.find((e) => e !== rec.shared_expert);
  const parts = ex.map((e, i) => `${e === rec.shared_expert ? 'shared ' : ''}expert ${e} (gate ${Number(gates[i] || 0).toFixed(2)})`);
  const seg = t.segment_experts && t.segment_experts[l];
  if (seg && seg.length) parts.push('segment experts ' + seg.join(', '));
  return { colour: expertColour(top === undefined ? ex[0] : top, n), key: top === undefined ? ex[0] : top, title: parts.join('; ') };
}

function drawRouting() {
  const rec = state.record;
  const box = $('routing');
  const note = $('routing-note');
  const moe = state.info && state.info.moe;
  if (!rec || !moe || !Array.isArray(rec.tokens)) {
    box.hidden = true;
    note.textContent = moe ? 'No routing record for this request.' : 'This model is dense: every token runs the same feed-forward network, so there is no routing to draw.';
    return;
  }
  note.textContent = '';
  box.hidden = false;
  const kind = moe.kind;
  const layerSel = $('layer');
  const nLayers = kind === 'mole' ? 1 : (rec.n_layer || 0);
  if (layerSel.options.length !== nLayers) {
    layerSel.replaceChildren(...Array.from({ length: nLayers }, (_, l) => new Option(kind === 'mole' ? 'adapters (per token)' : `layer ${l}`, String(l))));
  }
  layerSel.disabled = kind === 'mole';
  const l = Number(layerSel.value || 0);
  const toks = rec.tokens;
  const n = Math.max(state.nTokens, toks.length);
  const sum = [`${n} tokens`, `${rec.prompt_tokens} in the prompt`];
  if (kind !== 'mole') sum.push(`${rec.token_experts} token experts, top ${moe.top_k}`);
  if (kind !== 'mole' && rec.shared_expert >= 0) sum.push(`shared expert ${rec.shared_expert} (runs for every token)`);
  if (rec.tokens_dropped) sum.push(`${rec.tokens_dropped} tokens past the detail cap`);
  if (n > toks.length) sum.push('the last sampled token is never fed back, so it has no routing');
  $('routing-summary').textContent = sum.join(' · ');

  $('tokens-title').textContent = kind === 'mole' ? 'Tokens, coloured by their language adapter'
    : 'Tokens, coloured by their expert in this layer';
  $('heat-title').textContent = kind === 'mole' ? 'Adapters × tokens' : 'Layers × tokens';
  /* tokens coloured by their expert at layer l */
  const tokBox = $('tokens');
  const frag = document.createDocumentFragment();
  for (let p = 0; p < n; p++) {
    const t = toks[p];
    const s = document.createElement('span');
    s.className = 'tok' + (p >= rec.prompt_tokens ? ' gen' : '');
    const at = tokenAt(rec, t, l, kind);
    if (at) { s.style.background = at.colour; s.title = `#${p} ${JSON.stringify(tokenLabel(t))}: ${at.title}`; }
    else { s.classList.add('none'); s.title = `#${p}: no routing`; }
    s.textContent = t ? tokenLabel(t) : '·';
    frag.appendChild(s);
  }
  tokBox.replaceChildren(frag);

  /* segment windows (hybrid): each window's experts at layer l, by how many of its tokens went there */
  const win = $('windows');
  win.replaceChildren();
  if (kind === 'hybrid' && rec.window > 0) {
    for (let w0 = 0; w0 < toks.length; w0 += rec.window) {
      const count = new Map();
      for (let p = w0; p < Math.min(w0 + rec.window, toks.length); p++)
        for (const e of (toks[p].segment_experts && toks[p].segment_experts[l]) || []) count.set(e, (count.get(e) || 0) + 1);
      const d = document.createElement('span');
      d.className = 'win';
      const list = [...count.entries()].sort((a, b) => b[1] - a[1]).map(([e, c]) => `S${e}×${c}`);
      d.textContent = `tokens ${w0}–${Math.min(w0 + rec.window, toks.length) - 1}: ${list.join(' ') || 'none'}`;
      d.title = 'segment window and the segment experts its tokens went to';
      win.appendChild(d);
    }
  }

  /* heatmap: one row per layer (MoLE: per adapter), one cell per token */
  const heat = $('heatmap');
  const hf = document.createDocumentFragment();
  const rows = kind === 'mole' ? (rec.adapters || []).length : rec.n_layer;
  for (let r = 0; r < rows; r++) {
    const row = document.createElement('div');
    row.className = 'hrow' + (kind !== 'mole' && r === l ? ' sel' : '');
    row.dataset.layer = String(r);
    const lab = document.createElement('span');
    lab.className = 'hlabel';
    lab.textContent = kind === 'mole' ? ((rec.adapters[r] && rec.adapters[r].name) || `adapter ${r}`) : `layer ${r}`;
    row.appendChild(lab);
    for (let p = 0; p < n; p++) {
      const t = toks[p];
      const c = document.createElement('span');
      c.className = 'cell';
      if (!t || t.id === null || t.id === undefined) {
        c.classList.add('none');
      } else if (kind === 'mole') {
        const on = (t.adapters || []).includes(r);
        if (on) c.style.background = expertColour(r, rows); else c.classList.add('off');
      } else {
        const at = tokenAt(rec, t, r, kind);
        c.style.background = at.colour;
        if ((t.experts[r] || []).includes(rec.shared_expert)) c.dataset.shared = '1';
      }
      row.appendChild(c);
    }
    hf.appendChild(row);
  }
  heat.replaceChildren(hf);
  heat.setAttribute('aria-label', `Heatmap: ${rows} ${kind === 'mole' ? 'adapters' : 'layers'} by ${n} tokens`);

  drawLegend(rec, kind);
  drawTotals(rec, kind, l);
}

function drawLegend(rec, kind) {
  const lg = $('legend');
  lg.replaceChildren();
  const item = (colour, text, cls) => {
    const s = document.createElement('span');
    const sw = document.createElement('span');
    sw.className = cls || 'sw';
    sw.style.background = colour;
    s.append(sw, text);
    lg.appendChild(s);
  };
  if (kind === 'mole') {
    (rec.adapters || []).forEach((a, i) => item(expertColour(i, rec.adapters.length), a.name || `adapter ${i}`));
  } else if (rec.token_experts <= 16) {
    for (let e = 0; e < rec.token_experts; e++) item(expertColour(e, rec.token_experts), e === rec.shared_expert ? `expert ${e} (shared)` : `expert ${e}`);
  } else {
    const stops = [0, 0.25, 0.5, 0.75, 1].map((f) => expertColour(Math.round(f * (rec.token_experts - 1)), rec.token_experts));
    item(`linear-gradient(to right, ${stops.join(', ')})`, `experts 0 … ${rec.token_experts - 1} (colour by id)`, 'scale');
  }
  item('repeating-linear-gradient(45deg, #ccc, #ccc 2px, #fff 2px, #fff 4px)', 'no routing');
  if (kind !== 'mole') {
    const s = document.createElement('span');
    s.textContent = 'Token colour: the top routed expert (the shared one is counted separately).';
    lg.appendChild(s);
  }
}

/* The layer's totals (MoLE: tokens per adapter) as a bar chart from the aggregate counts. */
function drawTotals(rec, kind, l) {
  const tot = $('totals');
  tot.replaceChildren();
  let rows;
  if (kind === 'mole') {
    rows = (rec.adapters || []).map((a, i) => ({ name: a.name || `adapter ${i}`, n: a.prompt_tokens + a.generated_tokens, colour: expertColour(i, rec.adapters.length) }));
  } else {
    const layer = (rec.layers || [])[l] || {};
    rows = (layer.token || []).map((c) => ({ name: `expert ${c.expert}${c.expert === rec.shared_expert ? ' (shared)' : ''}`, n: c.prompt_tokens + c.generated_tokens, colour: expertColour(c.expert, rec.token_experts), shared: c.expert === rec.shared_expert }));
    for (const c of layer.segment || []) rows.push({ name: `segment ${c.expert}`, n: c.prompt_tokens + c.generated_tokens, colour: '#9aa5b1' });
    if (rows.length > 24) rows = rows.filter((r) => r.n > 0).sort((a, b) => b.n - a.n).slice(0, 24);
  }
  const max = Math.max(1, ...rows.map((r) => r.n));
  for (const r of rows) {
    const name = document.createElement('span');
    name.textContent = r.name;
    const bar = document.createElement('span');
    bar.className = 'bar' + (r.shared ? ' shared-mark' : '');
    bar.style.width = `${(100 * r.n) / max}%`;
    bar.style.background = r.colour;
    const v = document.createElement('span');
    v.textContent = String(r.n);
    tot.append(name, bar, v);
  }
}

/* ------------------------------------------------------------ live server view */

async function pollStatus() {
  clearTimeout(state.statusTimer);
  if (state.needKey) return;
  try {
    const s = await getJson('/v1/status');
    const pc = s.prefix_cache || {};
    const rows = [
      ['Model', s.model], ['State', s.model_state], ['Queue', s.queue_length],
      ['Running requests', s.requests_running], ['Running sequences', s.sequences_running],
      ['KV blocks used', `${s.kv.blocks_used} / ${s.kv.blocks_total}`], ['KV blocks cached', s.kv.blocks_cached],
      ['Prefix-cache hits', pc.hit_ratio === null || pc.hit_ratio === undefined ? '–' : `${(100 * pc.hit_ratio).toFixed(1)} %`],
      ['Tokens generated', s.generated_tokens],
    ];
    const frag = document.createDocumentFragment();
    for (const [k, v] of rows) {
      const dt = document.createElement('dt'); dt.textContent = k;
      const dd = document.createElement('dd'); dd.textContent = String(v);
      frag.append(dt, dd);
    }
    $('status').replaceChildren(frag);
    $('status-note').textContent = 'Updated every 2 s.';
  } catch (e) {
    if (authFailed(e)) return;
    $('status-note').textContent = 'Status unavailable: ' + e.message;
  }
  state.statusTimer = setTimeout(pollStatus, 2000);
}

/* ------------------------------------------------------------ start */

function start() {
  $('run-form').addEventListener('submit', run);
  $('cancel').addEventListener('click', cancel);
  $('key-form').addEventListener('submit', onKeySaved);
  $('key-clear').addEventListener('click', onKeyCleared);
  $('key-button').addEventListener('click', () => askKey('API key'));
  $('model').addEventListener('change', loadModelInfo);
  $('mode').addEventListener('change', updateHint);
  $('layer').addEventListener('change', drawRouting);
  $('prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) run(ev);
  });
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && state.abort) cancel();
  });
  loadModels();
  pollStatus();
}

document.addEventListener('DOMContentLoaded', start);
