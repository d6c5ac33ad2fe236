/*
 * test_k8s_manifests.mjs - validates the Kubernetes manifests of deploy/k8s/ against the Kubernetes API
 * schemas client-side (the npm package kubernetes-models, pinned in tests/js/package.json: one class
 * per apiVersion/kind, with the OpenAPI schema of each resource), plus the few cross-references a schema
 * cannot see (selectors matching pod labels, probes on /health, ports by name).
 *
 *   node tests/deploy/test_k8s_manifests.mjs              the suite: deploy/k8s/*.yaml valid, broken
 *                                                         copies of them rejected
 *   node tests/deploy/test_k8s_manifests.mjs FILE.yaml... validate these files, exit 1 if any is invalid
 */
import fs from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { createRequire } from 'node:module';
import assert from 'node:assert/strict';
import { root, test, run } from '../integration/server_harness.mjs';

const modules = join(root, 'tests', 'js', 'node_modules');
const require = createRequire(join(root, 'tests', 'js', 'package.json'));
const YAML = require('yaml');
const K8S_DIR = join(root, 'deploy', 'k8s');

/* The kubernetes-models class of a resource: 'apps/v1' + 'Deployment' -> kubernetes-models/apps/v1/
 * Deployment.js ('v1' alone is the core group). The package is ESM-only, so it is imported by path. */
async function modelClass(apiVersion, kind) {
  if (typeof apiVersion !== 'string' || typeof kind !== 'string' || !/^[A-Za-z0-9.\/-]+$/.test(apiVersion) ||
      !/^[A-Za-z]+$/.test(kind))
    throw new Error(`apiVersion/kind missing or malformed: ${apiVersion} ${kind}`);
  const file = join(modules, 'kubernetes-models', ...apiVersion.split('/'), kind + '.js');
  if (!fs.existsSync(file)) throw new Error(`unknown apiVersion/kind ${apiVersion} ${kind}`);
  const mod = await import(pathToFileURL(file).href);
  return mod[kind];
}

/* Errors of one YAML text (several documents): [] when every document is a valid resource and the
 * cross-references hold. */
export async function validateText(text) {
  const errors = [];
  const docs = YAML.parseAllDocuments(text);
  const objs = [];
  for (const d of docs) {
    if (d.errors.length) { errors.push(`YAML: ${d.errors.map((e) => e.message).join('; ')}`); continue; }
    const o = d.toJSON();
    if (o === null) continue;
    objs.push(o);
  }
  if (!objs.length) errors.push('no resources');
  for (const o of objs) {
    const what = `${o.kind}/${o.metadata && o.metadata.name}`;
    try {
      const Cls = await modelClass(o.apiVersion, o.kind);
      new Cls(o).validate();
    } catch (e) {
      errors.push(`${what}: ${e.message}`);
    }
  }
  if (errors.length) return errors;
  errors.push(...crossCheck(objs));
  return errors;
}

const matches = (sel, labels) => sel && Object.keys(sel).length > 0 &&
  Object.entries(sel).every(([k, v]) => labels && labels[k] === v);

/* What the schemas leave open: a Deployment's selector selects its own pods, every Service and
 * PodDisruptionBudget selects some Deployment's pods, named ports exist, probes ask /health, claims and
 * volumes exist. */
function crossCheck(objs) {
  const errs = [];
  const deps = objs.filter((o) => o.kind === 'Deployment');
  const pvcs = new Set(objs.filter((o) => o.kind === 'PersistentVolumeClaim').map((o) => o.metadata.name));
  for (const d of deps) {
    const labels = d.spec.template.metadata && d.spec.template.metadata.labels;
    if (!matches(d.spec.selector.matchLabels, labels)) errs.push(`Deployment/${d.metadata.name}: selector does not match its pod labels`);
    const pod = d.spec.template.spec;
    const vols = new Map((pod.volumes || []).map((v) => [v.name, v]));
    for (const c of pod.containers) {
      const ports = new Set((c.ports || []).map((p) => p.name));
      for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
        const g = c[probe] && c[probe].httpGet;
        if (!g) { errs.push(`${c.name}: no ${probe} over HTTP`); continue; }
        if (g.path !== '/health') errs.push(`${c.name}: ${probe} asks ${g.path}, not /health`);
        if (typeof g.port === 'string' && !ports.has(g.port)) errs.push(`${c.name}: ${probe} port ${g.port} is not a container port`);
      }
      if (!c.resources || !c.resources.requests || !c.resources.requests.memory || !c.resources.requests.cpu)
        errs.push(`${c.name}: no cpu/memory requests`);
      for (const m of c.volumeMounts || []) if (!vols.has(m.name)) errs.push(`${c.name}: mount of unknown volume ${m.name}`);
    }
    for (const v of vols.values())
      if (v.persistentVolumeClaim && !pvcs.has(v.persistentVolumeClaim.claimName))
        errs.push(`volume ${v.name}: no PersistentVolumeClaim ${v.persistentVolumeClaim.claimName} in the manifests`);
  }
  for (const o of objs) {
    const sel = o.kind === 'Service' ? o.spec.selector : o.kind === 'PodDisruptionBudget' ? o.spec.selector.matchLabels : null;
    if (!sel) continue;
    const target = deps.find((d) => matches(sel, d.spec.template.metadata.labels));
    if (!target) { errs.push(`${o.kind}/${o.metadata.name}: selects no Deployment's pods`); continue; }
    if (o.kind === 'Service') {
      const names = new Set(target.spec.template.spec.containers.flatMap((c) => (c.ports || []).map((p) => p.name)));
      for (const p of o.spec.ports)
        if (typeof p.targetPort === 'string' && !names.has(p.targetPort)) errs.push(`Service/${o.metadata.name}: targetPort ${p.targetPort} is no container port`);
    }
  }
  return errs;
}

/* ------------------------------------------------------------ the suite */

const files = () => fs.readdirSync(K8S_DIR).filter((f) => /\.ya?ml$/.test(f)).sort().map((f) => join(K8S_DIR, f));

test('deploy/k8s manifests are valid', async () => {
  assert.ok(files().length > 0, 'no manifests in deploy/k8s');
  const kinds = new Set();
  for (const f of files()) {
    const text = fs.readFileSync(f, 'utf8');
    assert.deepEqual(await validateText(text), [], f);
    for (const d of YAML.parseAllDocuments(text)) if (d.toJSON()) kinds.add(d.toJSON().kind);
  }
  for (const k of ['Deployment', 'Service', 'PodDisruptionBudget', 'PersistentVolumeClaim'])
    assert.ok(kinds.has(k), `deploy/k8s has no ${k}`);
});

// each edit breaks one rule; the check must reject every one
const BREAKS = [
  ['replicas as a string', (o) => o.kind === 'Deployment' && (o.spec.replicas = 'three')],
  ['Deployment without selector', (o) => o.kind === 'Deployment' && delete o.spec.selector],
  ['container without name', (o) => o.kind === 'Deployment' && delete o.spec.template.spec.containers[0].name],
  ['probe port as an object', (o) => o.kind === 'Deployment' && (o.spec.template.spec.containers[0].readinessProbe.httpGet.port = { n: 8080 })],
  ['memory request as a boolean', (o) => o.kind === 'Deployment' && (o.spec.template.spec.containers[0].resources.requests.memory = true)],
  ['Service port as a string', (o) => o.kind === 'Service' && (o.spec.ports[0].port = 'http')],
  ['PodDisruptionBudget maxUnavailable as a list', (o) => o.kind === 'PodDisruptionBudget' && (o.spec.maxUnavailable = [1])],
  ['unknown kind', (o) => o.kind === 'PodDisruptionBudget' && (o.kind = 'PodDisruptionBudgetz')],
  ['wrong apiVersion', (o) => o.kind === 'Deployment' && (o.apiVersion = 'apps/v9')],
  ['selector not matching the pods', (o) => o.kind === 'Deployment' && (o.spec.selector.matchLabels = { app: 'other' })],
  ['readiness probe on another path', (o) => o.kind === 'Deployment' && (o.spec.template.spec.containers[0].readinessProbe.httpGet.path = '/')],
  ['Service selecting nothing', (o) => o.kind === 'Service' && (o.spec.selector = { app: 'nothing' })],
  ['no memory request', (o) => o.kind === 'Deployment' && delete o.spec.template.spec.containers[0].resources.requests.memory],
];

test('broken copies of the manifests are rejected', async () => {
  const text = files().map((f) => fs.readFileSync(f, 'utf8')).join('\n---\n');
  const objs = YAML.parseAllDocuments(text).map((d) => d.toJSON()).filter(Boolean);
  for (const [name, edit] of BREAKS) {
    const copy = structuredClone(objs);
    let edited = false;
    for (const o of copy) if (edit(o)) edited = true;
    assert.ok(edited, `${name}: the edit found nothing to break`);
    const errs = await validateText(copy.map((o) => YAML.stringify(o)).join('---\n'));
    assert.ok(errs.length > 0, `${name}: accepted`);
    if (process.env.CM_VERBOSE) console.error(`${name}: ${errs[0]}`);
  }
  // and a YAML syntax error
  assert.ok((await validateText(text.replace('kind: Deployment', 'kind: [Deployment'))).length > 0, 'broken YAML accepted');
});

const args = process.argv.slice(2);
if (args.length) {
  let bad = 0;
  for (const f of args) {
    const errs = await validateText(fs.readFileSync(f, 'utf8'));
    for (const e of errs) console.error(`${f}: ${e}`);
    if (errs.length) bad++;
    else console.error(`${f}: valid`);
  }
  process.exit(bad ? 1 : 0);
} else {
  await run();
}
