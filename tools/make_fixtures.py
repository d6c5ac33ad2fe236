"""make_fixtures.py - regenerate tests/fixtures/ bit for bit from fixed seeds.

    /usr/bin/python3 tools/make_fixtures.py [--out tests/fixtures] [--check]

Writes (see docs/reference.md for the contract and the tolerances):
  models/<name>.gguf          tiny random Qwen2/Llama models with a tiny byte-level BPE tokenizer
  golden/<name>.json + .f32   logits of the PyTorch reference at every position, greedy continuation
  hf/<name>/                  Hugging Face directories (config.json, safetensors, tokenizer.json)
  golden/tokenizer.json       text -> ids cases of the fixture tokenizer
Every file is checked after writing by reading it back with an independent path (GGUF: gguf.py reader +
llama.cpp-convention forward; safetensors: a separate parser) and comparing the logits.
"""

import argparse
import hashlib
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf  # noqa: E402
from gguf import GGMLType, GGUFWriter, GGUFReader, VT  # noqa: E402
import reference as ref  # noqa: E402

SEED = 20261123
N_CTX = 256
D, F, N_LAYER, HEAD_DIM = 64, 128, 2, 16
N_MERGES = 40  # vocab = 256 bytes + 40 merges + 4 specials = 300
SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]

# Text the tokenizer's merges are trained on (fixed: changing it changes every fixture).
TRAIN_TEXT = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(i, fibonacci(i))

fn main() {
    let mut total: u64 = 0;
    for value in 0..100 {
        if value % 3 == 0 {
            total += value;
        }
    }
    println!("total = {}", total);
}

func handler(w http.ResponseWriter, r *http.Request) {
    name := r.URL.Query().Get("name")
    if name == "" {
        name = "world"
    }
    fmt.Fprintf(w, "hello, %s\\n", name)
}

The quick brown fox jumps over the lazy dog. A server returns the completion of the code
that the user is typing, and the model predicts the next token from the tokens before it.
We test the engine against a reference written in Python, and the reference against the paper.
'''

# Golden prompts: ~40 tokens with FIM special tokens, 1 token, ~100 tokens (code, prose, non-ASCII).
CASE_TEXTS = [
    "<|fim_prefix|>def add(a, b):\n    return <|fim_suffix|>\n\nx = add(1, 2)\nprint(x)<|fim_middle|>",
    "name",
    "fn main() {\n    let names = vec![\"Zoë\", \"José\"];\n    for n in names {\n"
    "        println!(\"hi {}\", n);\n    }\n}\n// The user's café — naïve ✓\n",
]
# Candidates for the greedy prompt; the first whose continuation is unambiguous is used.
GREEDY_TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return",
    "for value in range(10):\n    print(",
    "The quick brown fox",
    "fn main() {\n    let mut total",
    "func handler(w http.ResponseWriter",
]

# Tokenizer golden texts: exercise every pre-tokenizer alternative.
TOK_TEXTS = [
    "Hello world", "x  = 1", "a\n\n  b", "he's HE'LL we'd they've I'm don't", "123456 7.5e-3", "  \n x",
    "end   ", "(x) [y] {z}", "\tfoo\r\nbar", "naïve café 你好 😀", "def f():\n    return 1\n",
    "<|endoftext|>x<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>", "!!!\n\n\n", "   leading", "trailing\n",
]

# name, arch, n_head, n_head_kv, tied, rope theta, rms eps, extra GGUF keys, golden cases (size budget:
# the ~100-token case only for the first qwen2 and llama models)
SPECS = [
    dict(name="qwen2-gqa", arch="qwen2", H=4, K=2, tied=True, theta=1e6, eps=1e-6),
    dict(name="llama-mha", arch="llama", H=4, K=4, tied=False, theta=1e4, eps=1e-5),
    dict(name="qwen2-mha", arch="qwen2", H=4, K=4, tied=False, theta=1e6, eps=1e-6, n_cases=2),
    dict(name="llama-gqa", arch="llama", H=4, K=2, tied=True, theta=1e4, eps=1e-5, key_length=True, n_cases=2),
]
# type variants of the first model: (suffix, GGML type, tolerance)
VARIANTS = [("f16", GGMLType.F16, 2e-4), ("bf16", GGMLType.BF16, 2e-4), ("q8_0", GGMLType.Q8_0, 1e-2)]
TOL_F32 = 1e-4
FILE_TYPE = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q8_0: 7, GGMLType.BF16: 32}  # llama_ftype
TYPE_NAME = {GGMLType.F32: "f32", GGMLType.F16: "f16", GGMLType.Q8_0: "q8_0", GGMLType.BF16: "bf16"}


# ============================================================================ weights

def make_config(spec, n_vocab):
    return ref.Config(spec["arch"], n_vocab, D, F, N_LAYER, spec["H"], spec["K"], spec["eps"], spec["theta"],
                      spec["tied"], N_CTX, HEAD_DIM)


def make_weights(cfg, seed):
    """Random HF-named weights (float32). Scales are chosen so the residual stream, attention and FFN
    all matter and the logits spread over a few units (not flat): std 0.2 embeddings, 0.15 q/k (sharp
    enough attention that rope positions matter), 0.08 elsewhere, biases 0.1, norm weights 1 +- 0.1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in ref.hf_shapes(cfg).items():
        if "norm" in name:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name or "lm_head" in name:
            w = 0.2 * rng.standard_normal(shape)
        elif "q_proj" in name or "k_proj" in name:
            w = 0.15 * rng.standard_normal(shape)
        else:
            w = 0.08 * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


def stored_weights(weights, ttype):
    """What the engine will see after dequantising: matrices in ttype, 1-D tensors (norms, biases) kept
    F32 as llama.cpp does."""
    return {k: (gguf.roundtrip(v, ttype) if v.ndim == 2 else v) for k, v in weights.items()}


# ============================================================================ GGUF

def add_tokenizer_kv(w, tok):
    n = len(tok.tokens)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen2")
    w.add_array("tokenizer.ggml.tokens", tok.tokens, VT.STRING)
    w.add_array("tokenizer.ggml.token_type", [3 if t in tok.specials else 1 for t in tok.tokens], VT.INT32)
    w.add_array("tokenizer.ggml.merges", ["%s %s" % m for m in tok.merges], VT.STRING)
    eot = tok.ids["<|endoftext|>"]
    w.add_uint32("tokenizer.ggml.eos_token_id", eot)
    w.add_uint32("tokenizer.ggml.eot_token_id", eot)
    w.add_uint32("tokenizer.ggml.padding_token_id", eot)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_uint32("tokenizer.ggml.fim_pre_token_id", tok.ids["<|fim_prefix|>"])
    w.add_uint32("tokenizer.ggml.fim_suf_token_id", tok.ids["<|fim_suffix|>"])
    w.add_uint32("tokenizer.ggml.fim_mid_token_id", tok.ids["<|fim_middle|>"])
    assert n == len(set(tok.tokens))


def gguf_tensors(cfg, weights):
    """HF weights -> ordered GGUF (name, array), llama q/k permuted as llama.cpp's converter does."""
    out = []
    names = list(ref.hf_shapes(cfg))
    # llama.cpp order: embedding, layers, output norm, output
    order = [names[0]] + [n for n in names if n.startswith("model.layers.")] + \
        [n for n in names[1:] if not n.startswith("model.layers.")]
    for n in order:
        v = weights[n]
        if cfg.model_type == "llama" and n.endswith("q_proj.weight"):
            v = ref.llama_permute(v, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and n.endswith("k_proj.weight"):
            v = ref.llama_permute(v, cfg.num_key_value_heads)
        out.append((ref.hf_to_gguf_name(n), np.ascontiguousarray(v)))
    return out


def write_gguf(path, spec, cfg, weights, tok, ttype, name):
    a = cfg.model_type
    w = GGUFWriter(path)
    w.add_string("general.architecture", a)
    w.add_string("general.name", name)
    w.add_uint32("general.file_type", FILE_TYPE[ttype])
    w.add_uint32(a + ".context_length", N_CTX)
    w.add_uint32(a + ".embedding_length", D)
    w.add_uint32(a + ".block_count", N_LAYER)
    w.add_uint32(a + ".feed_forward_length", F)
    w.add_uint32(a + ".attention.head_count", cfg.num_attention_heads)
    w.add_uint32(a + ".attention.head_count_kv", cfg.num_key_value_heads)
    w.add_float32(a + ".attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(a + ".rope.freq_base", cfg.rope_theta)
    w.add_uint32(a + ".rope.dimension_count", HEAD_DIM)
    if spec.get("key_length"):
        w.add_uint32(a + ".attention.key_length", HEAD_DIM)
        w.add_uint32(a + ".attention.value_length", HEAD_DIM)
    if a == "llama":
        w.add_uint32(a + ".vocab_size", cfg.vocab_size)
    add_tokenizer_kv(w, tok)
    for n, v in gguf_tensors(cfg, weights):
        w.add_tensor(n, v, ttype if v.ndim == 2 else GGMLType.F32)
    w.write()


def check_gguf(path, spec, tokens, want):
    """Read the file back, dequantise, run the llama.cpp-convention forward, compare with the golden."""
    r = GGUFReader(path)
    a = r.get("general.architecture")
    t = {n: x.dequantize() for n, x in r.tensors.items()}
    got = ref.gguf_forward(t, a, r.get(a + ".attention.head_count"), r.get(a + ".attention.head_count_kv"),
                           float(r.get(a + ".attention.layer_norm_rms_epsilon")),
                           float(r.get(a + ".rope.freq_base")), tokens)
    err = float((got - torch.as_tensor(want, dtype=torch.float64)).abs().max())
    # eps and theta went through float32 in the file: allow that, nothing more
    assert err < 1e-5, "%s: read-back forward differs by %g" % (path, err)


# ============================================================================ safetensors / HF

ST_DTYPE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def write_safetensors(path, tensors):
    """tensors: ordered list of (name, dtype str, shape, raw ndarray). Header: u64 length, JSON (padded
    with spaces to a multiple of 8 so the data is aligned), then the tensors back to back."""
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape, raw in tensors:
        n = raw.nbytes
        hdr[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, _, raw in tensors:
            f.write(np.ascontiguousarray(raw).tobytes())
    return off


def read_safetensors(path):
    """Independent parser (for the self-check): name -> float32 array."""
    b = open(path, "rb").read()
    n = struct.unpack_from("<Q", b, 0)[0]
    hdr = json.loads(b[8:8 + n])
    base, out = 8 + n, {}
    for name, e in hdr.items():
        if name == "__metadata__":
            continue
        s, t = e["data_offsets"]
        raw = np.frombuffer(b[base + s:base + t], dtype=ST_DTYPE[e["dtype"]]).reshape(e["shape"])
        out[name] = gguf.bf16_to_f32(raw) if e["dtype"] == "BF16" else raw.astype(np.float32)
    return out


def hf_config(cfg, tok, dtype):
    eot = tok.ids["<|endoftext|>"]
    c = {
        "architectures": [ref.HF_ARCH[cfg.model_type]], "attention_dropout": 0.0, "bos_token_id": eot,
        "eos_token_id": eot, "hidden_act": "silu", "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": cfg.model_type, "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_scaling": None, "rope_theta": float(cfg.rope_theta),
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": dtype,
        "transformers_version": "4.46.3", "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    if cfg.model_type == "qwen2":
        c.update({"max_window_layers": cfg.num_hidden_layers, "sliding_window": None,
                  "use_sliding_window": False})
    else:
        c.update({"attention_bias": False, "head_dim": cfg.head_dim, "mlp_bias": False, "pretraining_tp": 1})
    return json.dumps(c, indent=2, sort_keys=True) + "\n"


def hf_tokenizer_json(tok):
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    n_plain = len(tok.tokens) - len(tok.specials)
    t = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": tok.ids[s], "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for s in tok.specials],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": ref.QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            bl]},
        "post_processor": dict(bl, trim_offsets=False),
        "decoder": bl,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tok.tokens[:n_plain])},
                  "merges": ["%s %s" % m for m in tok.merges]},
    }
    return json.dumps(t, indent=2, ensure_ascii=False) + "\n"


def hf_tokenizer_config(tok, arch):
    dec = {str(tok.ids[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for s in tok.specials}
    c = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
         "added_tokens_decoder": dec, "bos_token": None, "clean_up_tokenization_spaces": False,
         "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": N_CTX,
         "pad_token": "<|endoftext|>", "split_special_tokens": False,
         "tokenizer_class": "Qwen2Tokenizer" if arch == "qwen2" else "PreTrainedTokenizerFast",
         "unk_token": None}
    return json.dumps(c, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_hf(dirpath, cfg, weights, tok, dtype, n_shards):
    """HF directory. dtype 'float32' or 'bfloat16'. Tied models omit lm_head.weight (as save_pretrained
    does). Returns the weights as stored (float32 values)."""
    os.makedirs(dirpath, exist_ok=True)
    for f in os.listdir(dirpath):
        os.remove(os.path.join(dirpath, f))
    st = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    names = sorted(ref.hf_shapes(cfg))
    items, stored = [], {}
    for n in names:
        v = weights[n]
        raw = {"F32": lambda x: x.astype("<f4"), "F16": lambda x: x.astype("<f2"), "BF16": gguf.f32_to_bf16}[st](v)
        stored[n] = gguf.bf16_to_f32(raw) if st == "BF16" else raw.astype(np.float32)
        items.append((n, st, v.shape, raw))
    if n_shards == 1:
        write_safetensors(os.path.join(dirpath, "model.safetensors"), items)
    else:
        per = -(-len(items) // n_shards)
        wmap, total = {}, 0
        for s in range(n_shards):
            fn = "model-%05d-of-%05d.safetensors" % (s + 1, n_shards)
            part = items[s * per:(s + 1) * per]
            total += write_safetensors(os.path.join(dirpath, fn), part)
            for n, _, _, _ in part:
                wmap[n] = fn
        idx = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
        with open(os.path.join(dirpath, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps(idx, indent=2) + "\n")
    for fn, text in (("config.json", hf_config(cfg, tok, dtype)), ("tokenizer.json", hf_tokenizer_json(tok)),
                     ("tokenizer_config.json", hf_tokenizer_config(tok, cfg.model_type))):
        with open(os.path.join(dirpath, fn), "w", encoding="utf-8") as f:
            f.write(text)
    return stored


def check_hf(dirpath, cfg, tokens, want):
    files = sorted(f for f in os.listdir(dirpath) if f.endswith(".safetensors"))
    w = {}
    for f in files:
        w.update(read_safetensors(os.path.join(dirpath, f)))
    c = ref.Config.from_hf(json.load(open(os.path.join(dirpath, "config.json"))))
    got = ref.Model(c, w).forward(tokens)
    err = float((got - torch.as_tensor(want, dtype=torch.float64)).abs().max())
    assert err < 1e-6, "%s: read-back forward differs by %g" % (dirpath, err)


# ============================================================================ goldens

def dump_json(obj, indent=0):
    """JSON with one key per line but lists of numbers kept on one line (readable token lists)."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = ["%s%s: %s" % (pad1, json.dumps(k), dump_json(v, indent + 1)) for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad1 + dump_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(dump_json(obj) + "\n")


def write_f32(path, a):
    np.ascontiguousarray(a, dtype="<f4").tofile(path)


def pick_greedy(model, tok, min_margin):
    """First greedy prompt whose 16-token continuation has every top-1/top-2 logit gap >= min_margin and
    no special token (so an engine that stops at EOS still produces all 16)."""
    best = None
    for text in GREEDY_TEXTS:
        p = tok.encode(text)
        out, margin = model.generate(p, 16)
        ok = all(tok.tokens[t] not in tok.specials for t in out)
        if ok and margin >= min_margin:
            return text, p, out, margin
        if ok and (best is None or margin > best[3]):
            best = (text, p, out, margin)
    assert best is not None, "no greedy prompt without special tokens"
    return best


def golden(out, name, src_key, src, arch, tname, tol, model, tok, cases_tok, logits_from=None, n_cases=3):
    """Writes golden/<name>.json (+ .f32 unless logits_from names another golden's files)."""
    gdir = os.path.join(out, "golden")
    cases = []
    for ci, (text, toks) in enumerate(cases_tok[:n_cases]):
        fn = "golden/%s.case%d.f32" % (logits_from or name, ci)
        lg = model.forward(toks).numpy()
        if logits_from is None:
            write_f32(os.path.join(out, fn), lg)
        else:
            prev = np.fromfile(os.path.join(out, fn), dtype="<f4").reshape(lg.shape)
            assert np.array_equal(prev, lg.astype(np.float32)), "logits_from mismatch"
        cases.append({"text": text, "tokens": toks, "logits": fn,
                      "max_abs_logit": round(float(np.abs(lg).max()), 3)})
    gtext, gp, gout, margin = pick_greedy(model, tok, 5 * tol)
    j = {src_key: src, "arch": arch, "type": tname, "tolerance": {"max_abs": tol},
         "n_vocab": len(tok.tokens), "n_ctx": N_CTX, "special_tokens_parsed": True, "cases": cases,
         "greedy": {"text": gtext, "prompt": gp, "n_predict": 16, "tokens": gout,
                    "min_margin": round(margin, 6), "text_out": tok.decode(gout)}}
    write_json(os.path.join(gdir, name + ".json"), j)
    return cases


OWNED = ("models", "golden", "hf")  # tests/fixtures/ subdirectories this script writes


def _hash_tree(root):
    h = {}
    for d in OWNED:
        for r, _, files in os.walk(os.path.join(root, d)):
            for f in files:
                p = os.path.join(r, f)
                h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def check_reproducible(out, only_dense):
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--out", tmp] + (["--only-dense"] if only_dense else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        want, got = _hash_tree(tmp), _hash_tree(out)
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    for k in bad:
        print("fixture differs from a fresh regeneration: %s" % k)
    print("%d fixture files, %d differ" % (len(want), len(bad)))
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                   "fixtures"))
    ap.add_argument("--only-dense", action="store_true", help="skip the MoE fixtures")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary directory and compare with --out byte for byte")
    args = ap.parse_args()
    if args.check:
        return check_reproducible(os.path.normpath(args.out), args.only_dense)
    torch.set_num_threads(1)  # one summation order: same bytes on every run
    out = os.path.normpath(args.out)
    for d in ("models", "golden", "hf"):
        os.makedirs(os.path.join(out, d), exist_ok=True)

    tok = ref.Tokenizer.build(TRAIN_TEXT, N_MERGES, SPECIALS)
    V = len(tok.tokens)
    cases_tok = [(t, tok.encode(t)) for t in CASE_TEXTS]
    for t, ids in cases_tok:
        assert tok.decode(ids) == t, "tokenizer round trip failed on %r" % t
    print("tokenizer: %d tokens, case lengths %s" % (V, [len(c[1]) for c in cases_tok]))

    # text -> ids golden for the C tokenizer
    tcases = []
    for t in TOK_TEXTS:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        tcases.append({"text": t, "tokens": ids})
    write_json(os.path.join(out, "golden", "tokenizer.json"),
               {"model": "models/qwen2-gqa.gguf", "special_tokens_parsed": True, "cases": tcases})

    for si, spec in enumerate(SPECS):
        cfg = make_config(spec, V)
        w = make_weights(cfg, SEED + si)
        model = ref.Model(cfg, w)
        path = os.path.join(out, "models", spec["name"] + ".gguf")
        write_gguf(path, spec, cfg, w, tok, GGMLType.F32, spec["name"])
        cases = golden(out, spec["name"], "model", "models/%s.gguf" % spec["name"], cfg.model_type, "f32",
                       TOL_F32, model, tok, cases_tok, n_cases=spec.get("n_cases", 3))
        check_gguf(path, spec, cases_tok[0][1], model.forward(cases_tok[0][1]))
        print("%-16s max|logit| %s" % (spec["name"], [c["max_abs_logit"] for c in cases]))

        if si == 0:  # type variants and the f32 HF directory of the first model
            for suf, tt, tol in VARIANTS:
                name = "%s-%s" % (spec["name"], suf)
                sw = stored_weights(w, tt)
                m = ref.Model(cfg, sw)
                p = os.path.join(out, "models", name + ".gguf")
                write_gguf(p, spec, cfg, w, tok, tt, name)
                golden(out, name, "model", "models/%s.gguf" % name, cfg.model_type, suf, tol, m, tok, cases_tok,
                       n_cases=2)
                check_gguf(p, spec, cases_tok[0][1], m.forward(cases_tok[0][1]))
            name = spec["name"] + "-hf"
            write_hf(os.path.join(out, "hf", name), cfg, w, tok, "float32", 1)
            golden(out, name, "hf_dir", "hf/" + name, cfg.model_type, "f32", TOL_F32, model, tok, cases_tok,
                   logits_from=spec["name"])
            check_hf(os.path.join(out, "hf", name), cfg, cases_tok[0][1], model.forward(cases_tok[0][1]))
        if spec["name"] == "llama-mha":  # bf16, sharded HF directory
            name = spec["name"] + "-bf16-hf"
            sw = write_hf(os.path.join(out, "hf", name), cfg, w, tok, "bfloat16", 2)
            m = ref.Model(cfg, sw)
            golden(out, name, "hf_dir", "hf/" + name, cfg.model_type, "bf16", 2e-4, m, tok, cases_tok, n_cases=2)
            check_hf(os.path.join(out, "hf", name), cfg, cases_tok[0][1], m.forward(cases_tok[0][1]))

    if not args.only_dense:
        try:
            import make_fixtures_moe
        except ImportError:
            make_fixtures_moe = None
        if make_fixtures_moe is not None:
            make_fixtures_moe.main(out, tok, cases_tok)

    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print("fixtures: %.2f MB in %s" % (total / 1e6, out))


if __name__ == "__main__":
    sys.exit(main())
