#!/usr/bin/env node
/*
 * with_server.mjs - runs a command against a freshly started `codemoe serve` (fixture model, free
 * loopback port), passing its address as CM_BASE_URL (and CM_PORT); the server is then stopped with
 * SIGTERM and must exit 0 with no sanitizer report. Exit status: the command's, or 1.
 *
 *   node with_server.mjs [--fixture NAME] [server flags...] -- command [args...]
 *
 * --fixture serves tests/fixtures/models/NAME.gguf instead of the default dense model.
 */
import { spawn } from 'node:child_process';
import { startServer, sanitizerReport } from './server_harness.mjs';

const argv = process.argv.slice(2);
const sep = argv.indexOf('--');
if (sep < 0 || sep === argv.length - 1) {
  console.error('usage: with_server.mjs [--fixture NAME] [server flags...] -- command [args...]');
  process.exit(2);
}
let serverArgs = argv.slice(0, sep);
let model;
if (serverArgs[0] === '--fixture' && serverArgs.length > 1) {
  model = serverArgs[1];
  serverArgs = serverArgs.slice(2);
}
const [cmd, ...cmdArgs] = argv.slice(sep + 1);
const srv = await startServer({ model, args: serverArgs });
const child = spawn(cmd, cmdArgs, { stdio: 'inherit', env: { ...process.env, CM_BASE_URL: srv.base, CM_PORT: String(srv.port) } });
const code = await new Promise((resolve) => child.on('exit', (c, s) => resolve(c ?? (s ? 1 : 0))));
const ex = await srv.stop();
let rc = code;
if (ex.code !== 0) { console.error(`server exited with ${JSON.stringify(ex)}`); rc = rc || 1; }
const rep = sanitizerReport(srv);
if (rep) { console.error('sanitizer report from the server:\n' + rep); rc = rc || 1; }
process.exit(rc);
