// tools/tokenizer_golden.mjs - expected token ids for tests/engine/test_tokenizer_golden.c, computed by
// implementations independent of codemoe:
//   qwen2, llama3: Hugging Face's JavaScript tokenizers (@huggingface/tokenizers) on the tokenizer.json
//                  files that tests/tokenizer/fetch.sh lays out;
//   gpt2:          the gpt-3-encoder package's own encode() (OpenAI's GPT-2 encoder ported to JS), with
//                  @huggingface/tokenizers on the generated tokenizer.json as a cross-check.
// Inputs: every file in tests/tokenizer/texts/ (one case per file) and each string of
// tests/tokenizer/texts/cases.json. Output: tests/tokenizer/golden/<name>.json, a list of
//   {"name", "text", "ids", "decoded", "ids_plain"?}
// ids:       special-token parsing ON (HF's default): added-token strings in the text become their ids;
//            no BOS/EOS added (add_special_tokens = false).
// decoded:   the library's decode(ids) with special tokens kept: the text after normalisation (NFC for
//            qwen2), which is what decode(encode(text)) must give back.
// ids_plain: only for texts containing an added-token string: special parsing OFF. HF's tokenizers
//            always split on added tokens, so these come from the same tokenizer.json with its
//            added_tokens list emptied (for gpt2: gpt-3-encoder, which knows no special tokens).
// Run: bash tests/tokenizer/fetch.sh && node tools/tokenizer_golden.mjs
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(path.join(root, "tests/js/package.json"));
const { Tokenizer } = require("@huggingface/tokenizers");
const gpt3 = require("gpt-3-encoder");

const textsDir = path.join(root, "tests/tokenizer/texts");
const buildDir = path.join(root, "tests/tokenizer/build");
const goldenDir = path.join(root, "tests/tokenizer/golden");

function loadCases() {
  const cases = [];
  for (const f of fs.readdirSync(textsDir).sort()) {
    if (f.startsWith(".") || f === "cases.json") continue;
    cases.push({ name: f, text: fs.readFileSync(path.join(textsDir, f), "utf8") });
  }
  JSON.parse(fs.readFileSync(path.join(textsDir, "cases.json"), "utf8"))
    .forEach((text, i) => cases.push({ name: `cases.json[${i}]`, text }));
  return cases;
}

function loadHF(name, { plain = false } = {}) {
  const tj = JSON.parse(fs.readFileSync(path.join(buildDir, name, "tokenizer.json"), "utf8"));
  const cfgPath = path.join(buildDir, name, "tokenizer_config.json");
  let cfg = fs.existsSync(cfgPath) ? JSON.parse(fs.readFileSync(cfgPath, "utf8")) : {};
  const added = tj.added_tokens.map((t) => t.content);
  if (plain) {
    tj.added_tokens = [];
    cfg = { ...cfg };
    delete cfg.added_tokens_decoder;
    delete cfg.additional_special_tokens;
    for (const k of ["bos_token", "eos_token", "pad_token", "unk_token"]) delete cfg[k];
  }
  return { tok: new Tokenizer(tj, cfg), added };
}

const enc = (t, text) => Array.from(t.encode(text, { add_special_tokens: false }).ids);
const dec = (t, ids) => ids.length === 0 ? "" : t.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

function goldenHF(name, cases) {
  const { tok, added } = loadHF(name);
  const { tok: plainTok } = loadHF(name, { plain: true });
  return cases.map(({ name: n, text }) => {
    const ids = enc(tok, text);
    const g = { name: n, text, ids, decoded: dec(tok, ids) };
    if (added.some((s) => text.includes(s))) g.ids_plain = enc(plainTok, text);
    return g;
  });
}

function goldenGPT2(cases) {
  const EOT = "<|endoftext|>";
  const { tok } = loadHF("gpt2");
  return cases.map(({ name: n, text }) => {
    // special parsing ON: split on <|endoftext|>, encode the pieces, put 50256 between them
    const ids = [];
    text.split(EOT).forEach((piece, i) => {
      if (i > 0) ids.push(50256);
      if (piece.length) ids.push(...gpt3.encode(piece));
    });
    const hf = enc(tok, text);
    if (!same(ids, hf)) throw new Error(`gpt2: gpt-3-encoder and @huggingface/tokenizers disagree on ${n}`);
    // decoded by HF: gpt3.decode's TextDecoder would drop a leading BOM
    const g = { name: n, text, ids, decoded: dec(tok, ids) };
    if (gpt3.decode(ids) !== g.decoded.replace(/^\ufeff/, "")) throw new Error(`gpt2: decoders disagree on ${n}`);
    if (text.includes(EOT)) g.ids_plain = gpt3.encode(text);
    return g;
  });
}

const cases = loadCases();
fs.mkdirSync(goldenDir, { recursive: true });
const outputs = { qwen2: goldenHF("qwen2", cases), llama3: goldenHF("llama3", cases), gpt2: goldenGPT2(cases) };
for (const [name, list] of Object.entries(outputs)) {
  const file = path.join(goldenDir, `${name}.json`);
  fs.writeFileSync(file, "[\n" + list.map((g) => JSON.stringify(g)).join(",\n") + "\n]\n");
  console.error(`wrote ${file}: ${list.length} cases, ${list.reduce((a, g) => a + g.ids.length, 0)} tokens`);
}
