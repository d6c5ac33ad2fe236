"""make_fixtures.py - regenerate tests/fixtures/ bit for bit from fixed seeds.

    /usr/bin/python3 tools/make_fixtures.py [--out tests/fixtures] [--check]

Writes (see docs/reference.md for the contract and the tolerances):
  models/<name>.gguf          tiny random Qwen2/Qwen3/Llama/Qwen3-MoE models with a tiny byte-level BPE tokenizer
  golden/<name>.json + .f32   logits of the PyTorch reference at every position, greedy continuation
  hf/<name>/                  Hugging Face directories (config.json, safetensors, tokenizer.json)
  golden/tokenizer.json       text -> ids cases of the fixture tokenizer
  golden/quants.gguf          rows of every block type and what gguf.py dequantises them to
Every file is checked after writing by reading it back with an independent path (GGUF: gguf.py reader +
llama.cpp-convention forward; safetensors: a separate parser) and comparing the logits.
"""

import argparse
import hashlib
import json
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf  # noqa: E402
from gguf import GGMLType, GGUFWriter, GGUFReader, VT  # noqa: E402
import reference as ref  # noqa: E402
import reference_moe as moe  # noqa: E402

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
# the ~100-token case only for the first model)
SPECS = [
    dict(name="qwen2-gqa", arch="qwen2", H=4, K=2, tied=True, theta=1e6, eps=1e-6),
    dict(name="llama-mha", arch="llama", H=4, K=4, tied=False, theta=1e4, eps=1e-5, n_cases=2),
    dict(name="qwen2-mha", arch="qwen2", H=4, K=4, tied=False, theta=1e6, eps=1e-6, n_cases=2),
    dict(name="llama-gqa", arch="llama", H=4, K=2, tied=True, theta=1e4, eps=1e-5, key_length=True, n_cases=2),
    # rope scaling (HF rope_scaling as config.json has it; the GGUF keys follow as llama.cpp writes them):
    # DeepSeek-Coder's linear 4, and YaRN as Qwen2.5-Coder's long-context config but with an original length
    # of 32 so that the cases (~40 and ~100 tokens) run past it, and theta 100 so that the ramp between
    # interpolated and kept dims covers several pairs (0, 1/3, 2/3, 1) instead of one. D=32 and F=64 (two
    # heads of 16) keep the size budget: the rope is what they test.
    dict(name="llama-linear", arch="llama", H=2, K=2, tied=False, theta=1e4, eps=1e-5, n_cases=2, hf_dir=True,
         D=32, F=64, rope_scaling={"factor": 4.0, "type": "linear"}),
    dict(name="qwen2-yarn", arch="qwen2", H=2, K=1, tied=True, theta=100.0, eps=1e-6, n_cases=3, hf_dir=True,
         D=32, F=64, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32, "rope_type": "yarn"}),
    # Llama 3.1's scaling with an original length of 32: pair 0 kept, pair 1 blended (factor 3.3), the rest
    # divided by 8; in the GGUF as llama.cpp converts it, a rope_freqs.weight tensor and no scaling keys
    dict(name="llama-freqs", arch="llama", H=2, K=1, tied=True, theta=1e4, eps=1e-5, n_cases=2, hf_dir=True,
         D=32, F=64, rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 32, "rope_type": "llama3"}),
    # Qwen3: per-head q/k norms, head_dim 32 != D / H = 16 (so Q = 128 != D, written as key_length /
    # value_length as llama.cpp's converter does), no q/k/v bias; and its Q8_0 twin
    dict(name="qwen3-gqa", arch="qwen3", H=4, K=2, tied=True, theta=1e6, eps=1e-6, key_length=True, head_dim=32,
         n_cases=2, variants=[("q8_0", GGMLType.Q8_0, 1e-2)], hf_dir=True),
]
# type variants of the first model: (suffix, GGML type, tolerance)
VARIANTS = [("f16", GGMLType.F16, 2e-4), ("bf16", GGMLType.BF16, 2e-4), ("q8_0", GGMLType.Q8_0, 1e-2),
            ("q4_0", GGMLType.Q4_0, 1e-3)]
TOL_F32 = 1e-4
FILE_TYPE = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q8_0: 7, GGMLType.Q6_K: 18,
             GGMLType.BF16: 32}  # llama_ftype
TYPE_NAME = {GGMLType.F32: "f32", GGMLType.F16: "f16", GGMLType.Q8_0: "q8_0", GGMLType.BF16: "bf16"}


class Mix:
    """Per-tensor matrix types, as llama-quantize's presets choose them: fn(gguf tensor name) -> GGML type;
    file_type is the preset's llama_ftype. Anywhere a ttype is taken, a Mix may stand instead."""

    def __init__(self, file_type, fn):
        self.file_type, self.fn = file_type, fn


def tensor_type(ttype, gguf_name):
    return ttype.fn(gguf_name) if isinstance(ttype, Mix) else ttype


def file_type(ttype):
    return ttype.file_type if isinstance(ttype, Mix) else FILE_TYPE[ttype]


def q4_k_m_type(name):
    """Q4_K_M-style: Q6_K for the output and for attn_v / ffn_down of the first layer (llama-quantize gives
    those more bits), Q4_K elsewhere; plus the legacy fallbacks it uses where a row does not fit a
    256-value super-block (Q5_0 for Q4_K, Q8_0 for Q6_K), here on two tensors of layer 1 so that every
    kind of block meets in one forward pass."""
    if name == "output.weight" or name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight"):
        return GGMLType.Q6_K
    if name == "blk.1.ffn_up.weight":
        return GGMLType.Q5_0
    if name == "blk.1.attn_v.weight":
        return GGMLType.Q8_0
    return GGMLType.Q4_K


# K-quant models need rows that are multiples of 256: D = F = 256 (16 heads of 16, 4 kv heads), untied so
# that the embedding and the output carry different types. (name, ttype, tolerance)
KQUANT_SPEC = dict(name="qwen2-k", arch="qwen2", H=16, K=4, tied=False, theta=1e6, eps=1e-6, D=256, F=256)
KQUANT_VARIANTS = [("q4_k_m", Mix(15, q4_k_m_type), 1e-3), ("q6_k", GGMLType.Q6_K, 1e-3)]
# Qwen3 in the same types: head_dim 128 != D / H = 64, so Q = 512 rows of attn_output still fill super-blocks
QWEN3_K_SPEC = dict(name="qwen3-k", arch="qwen3", H=4, K=1, tied=False, theta=1e6, eps=1e-6, D=256, F=256,
                    key_length=True, head_dim=128)
KQUANT_MODELS = [(KQUANT_SPEC, SEED + 50), (QWEN3_K_SPEC, SEED + 60)]


# ============================================================================ weights

def make_config(spec, n_vocab):
    return ref.Config(spec["arch"], n_vocab, spec.get("D", D), spec.get("F", F), N_LAYER, spec["H"], spec["K"],
                      spec["eps"], spec["theta"],
                      spec["tied"], N_CTX, spec.get("head_dim", HEAD_DIM), rope_scaling=spec.get("rope_scaling"))


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
    return {k: (gguf.roundtrip(v, tensor_type(ttype, ref.hf_to_gguf_name(k))) if v.ndim == 2 else v)
            for k, v in weights.items()}


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


def gguf_tensors(cfg, weights, dense_ffn=True):
    """HF weights -> ordered GGUF (name, array), llama q/k permuted as llama.cpp's converter does."""
    out = []
    names = list(ref.hf_shapes(cfg, dense_ffn))
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


def add_base_kv(w, a, cfg, n_ff, ttype, name, key_length=False):
    """general.* and the <arch>.* hyper-parameters shared by every architecture here."""
    w.add_string("general.architecture", a)
    w.add_string("general.name", name)
    w.add_uint32("general.file_type", file_type(ttype))
    w.add_uint32(a + ".context_length", cfg.max_position_embeddings)
    w.add_uint32(a + ".embedding_length", cfg.hidden_size)
    w.add_uint32(a + ".block_count", cfg.num_hidden_layers)
    w.add_uint32(a + ".feed_forward_length", n_ff)
    w.add_uint32(a + ".attention.head_count", cfg.num_attention_heads)
    w.add_uint32(a + ".attention.head_count_kv", cfg.num_key_value_heads)
    w.add_float32(a + ".attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(a + ".rope.freq_base", cfg.rope_theta)
    w.add_uint32(a + ".rope.dimension_count", cfg.head_dim)
    if key_length:
        w.add_uint32(a + ".attention.key_length", cfg.head_dim)
        w.add_uint32(a + ".attention.value_length", cfg.head_dim)
    if cfg.model_type == "llama":
        w.add_uint32(a + ".vocab_size", cfg.vocab_size)
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type") != "llama3":  # as llama.cpp's converter (and codemoe convert) writes them
        w.add_string(a + ".rope.scaling.type", rs.get("rope_type", rs.get("type")))
        w.add_float32(a + ".rope.scaling.factor", rs["factor"])
        if "original_max_position_embeddings" in rs:
            w.add_uint32(a + ".rope.scaling.original_context_length", rs["original_max_position_embeddings"])


def gguf_rope(r, a):
    """The rope scaling keys of a GGUF as reference.gguf_rope_angles takes them (None: no scaling)."""
    kind = r.get(a + ".rope.scaling.type")
    if kind in (None, "none"):
        return None
    rope = {"type": kind, "factor": float(r.get(a + ".rope.scaling.factor")),
            "orig_ctx": r.get(a + ".rope.scaling.original_context_length") or r.get(a + ".context_length")}
    if r.get(a + ".rope.scaling.attn_factor") is not None:
        rope["attn_factor"] = float(r.get(a + ".rope.scaling.attn_factor"))
    return rope


def write_gguf(path, spec, cfg, weights, tok, ttype, name):
    w = GGUFWriter(path)
    add_base_kv(w, cfg.model_type, cfg, cfg.intermediate_size, ttype, name, spec.get("key_length", False))
    add_tokenizer_kv(w, tok)
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":  # llama.cpp: a tensor, no keys
        w.add_tensor("rope_freqs.weight", ref.llama3_rope_freqs(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                     GGMLType.F32)
    for n, v in gguf_tensors(cfg, weights):
        w.add_tensor(n, v, tensor_type(ttype, n) if v.ndim == 2 else GGMLType.F32)
    w.write()


def check_gguf(path, spec, tokens, want):
    """Read the file back, dequantise, run the llama.cpp-convention forward, compare with the golden."""
    r = GGUFReader(path)
    a = r.get("general.architecture")
    t = {n: x.dequantize() for n, x in r.tensors.items()}
    got = ref.gguf_forward(t, a, r.get(a + ".attention.head_count"), r.get(a + ".attention.head_count_kv"),
                           float(r.get(a + ".attention.layer_norm_rms_epsilon")),
                           float(r.get(a + ".rope.freq_base")), tokens, gguf_rope(r, a))
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


def hf_config(cfg, tok, dtype, extra=None):
    eot = tok.ids["<|endoftext|>"]
    c = {
        "architectures": [ref.HF_ARCH[cfg.model_type]], "attention_dropout": 0.0, "bos_token_id": eot,
        "eos_token_id": eot, "hidden_act": "silu", "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": cfg.model_type, "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_scaling": cfg.rope_scaling, "rope_theta": float(cfg.rope_theta),
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": dtype,
        "transformers_version": "4.46.3", "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    if cfg.model_type in ref.QK_NORM:
        c["transformers_version"] = "4.51.0"  # the first with Qwen3 and Qwen3-MoE
    if cfg.model_type == "qwen2":
        c.update({"max_window_layers": cfg.num_hidden_layers, "sliding_window": None,
                  "use_sliding_window": False})
    elif cfg.model_type in ref.QK_NORM:  # Qwen3Config / Qwen3MoeConfig
        c.update({"attention_bias": False, "head_dim": cfg.head_dim, "max_window_layers": cfg.num_hidden_layers,
                  "sliding_window": None, "use_sliding_window": False})
    else:
        c.update({"attention_bias": False, "head_dim": cfg.head_dim, "mlp_bias": False, "pretraining_tp": 1})
    c.update(extra or {})
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
         "tokenizer_class": "Qwen2Tokenizer" if arch in ("qwen2", "qwen3", "qwen3_moe") else "PreTrainedTokenizerFast",
         "unk_token": None}
    return json.dumps(c, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_hf(dirpath, cfg, weights, tok, dtype, n_shards, names=None, extra=None):
    """HF directory. dtype 'float32' or 'bfloat16'. Tied models omit lm_head.weight (as save_pretrained
    does). names: the state dict's tensors (default: the dense model's); extra: more config.json fields.
    Returns the weights as stored (float32 values)."""
    os.makedirs(dirpath, exist_ok=True)
    for f in os.listdir(dirpath):
        os.remove(os.path.join(dirpath, f))
    st = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    names = sorted(names or ref.hf_shapes(cfg))
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
    for fn, text in (("config.json", hf_config(cfg, tok, dtype, extra)), ("tokenizer.json", hf_tokenizer_json(tok)),
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
    if isinstance(obj, list) and any(isinstance(v, dict) or (isinstance(v, list) and any(
            isinstance(u, (dict, list)) for u in v)) for v in obj):
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


# ============================================================================ block formats

# f16 scale fields (byte offsets in a block) of each block type: random bytes there would be NaN or huge
QUANT_SCALE_OFFSETS = {GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
                       GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
                       GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}


def make_quant_golden(out):
    """golden/quants.gguf: for every block type T a tensor "T" of 4 rows x 512 values stored as T, and
    "T.f32" with gguf.py's dequantisation of it (the C dequantisers must give the same bits). Rows 0-1:
    random values through gguf.py's quantiser (magnitudes from 1e-3 to 1e3 block by block; row 1 starts
    with an all-zero block). Rows 2-3: random bytes, so every bit of the packed scales and quants is
    read, with finite f16 scales; row 3's first blocks have the largest f16 (65504) and a subnormal."""
    rng = np.random.default_rng(SEED + 7)
    w = GGUFWriter(os.path.join(out, "golden", "quants.gguf"))
    w.add_string("general.architecture", "quants")
    K = 512
    for t in gguf.BLOCK_TYPES:
        bs, bb = gguf.GGML_BLOCK[t]
        nb = K // bs
        x = rng.standard_normal((2, K)).astype(np.float32)
        x *= (10.0 ** rng.uniform(-3, 3, size=(2, nb, 1))).astype(np.float32).repeat(bs, axis=2).reshape(2, K)
        x[1, :bs] = 0
        q = gguf.quantize(x, t)
        r = rng.integers(0, 256, size=(2, nb, bb), dtype=np.uint8)
        for off in QUANT_SCALE_OFFSETS[t]:
            sc = (rng.standard_normal((2, nb)) * 0.01).astype("<f2")
            sc[1, 0], sc[1, 1] = np.float16(65504), np.float16(3e-7)
            r[:, :, off:off + 2] = sc.view(np.uint8).reshape(2, nb, 2)
        raw = np.concatenate([q, r.reshape(2, nb * bb)])
        name = gguf.GGML_TYPE_NAME[t]
        w.add_tensor(name, raw, t, shape=(4, K), raw=True)
        w.add_tensor(name + ".f32", gguf.dequantize(raw, t, (4, K)), GGMLType.F32)
    w.write()


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


# ============================================================================ chat fixture

CHAT_SPECIALS = ["<|repo_name|>", "<|file_sep|>", "<|im_start|>", "<|im_end|>"]  # <|im_end|> last
CHAT_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "template",
                             "qwen2.5.json")


def make_chat_fixture(out):
    """models/qwen2-chat.gguf: qwen2-gqa with Qwen2.5's real chat template (tokenizer.chat_template), the
    control tokens it writes (<|im_start|>, <|im_end|>) and Qwen2.5-Coder's repository-level FIM tokens
    (<|repo_name|>, <|file_sep|>) appended to the vocabulary; their embedding rows (tied output) copy
    <|endoftext|>'s, so the other tokens' logits are those of qwen2-gqa."""
    src = GGUFReader(os.path.join(out, "models", "qwen2-gqa.gguf"))
    tokens = list(src.get("tokenizer.ggml.tokens"))
    eot = tokens.index("<|endoftext|>")
    w = GGUFWriter(os.path.join(out, "models", "qwen2-chat.gguf"))
    for k, f in src.fields.items():
        v = f.value
        if k == "general.name":
            v = "qwen2-chat"
        elif k == "tokenizer.ggml.tokens":
            v = tokens + CHAT_SPECIALS
        elif k == "tokenizer.ggml.token_type":
            v = np.concatenate([v, np.full(len(CHAT_SPECIALS), 3, dtype=v.dtype)])
        w.add_kv(k, v, f.vtype, f.elem_type)
    with open(CHAT_TEMPLATE, encoding="utf-8") as fh:
        w.add_string("tokenizer.chat_template", json.load(fh)["template"])
    assert "output.weight" not in src.tensors, "qwen2-gqa is tied"
    for n, t in src.tensors.items():
        x = t.dequantize()
        if n == "token_embd.weight":
            x = np.concatenate([x, np.repeat(x[eot:eot + 1], len(CHAT_SPECIALS), axis=0)])
        w.add_tensor(n, np.ascontiguousarray(x), t.ttype)
    w.write()


# ============================================================================ MoE fixtures

# Hybrid (MultiPL-MoE) models: base Qwen2 (q/k/v bias, NeoX rope), D=32, 2 heads of 16, 1 kv head, tied.
# The two differ in every hyper-parameter the C code must read: pooling, window, shared index, k, number
# of segment experts, capacity (causal top-1 vs top-2), bucket (1 makes the greedy expert order matter),
# gate_scale (1/w as the reference code, and 1.0 so the segment path moves the logits a lot).
HYBRIDS = [
    dict(name="hybrid-max", seed=SEED + 100,
         hp=dict(n_tok=4, k_used=2, shared=3, f_exp=16, n_seg=4, window=4, pooling="max", capacity=1.0,
                 bucket=1, gate_scale=0.25, a_tok=0.7, a_seg=0.3)),
    dict(name="hybrid-mean", seed=SEED + 200,
         hp=dict(n_tok=4, k_used=3, shared=0, f_exp=16, n_seg=3, window=8, pooling="mean", capacity=2.0,
                 bucket=2, gate_scale=1.0, a_tok=0.7, a_seg=0.3)),
    # route "previous" (segment.route): window s >= 1 routed by the pool of window s-1, window 0 none. Both
    # poolings; the causal cases cross many windows (case 0: 10 of w=4, 5 of w=8), the greedy run decodes
    # across window ends, and a reference-mode case shows the route leaves that mode alone.
    dict(name="hybrid-prev-max", seed=SEED + 400, plan=[(0, "causal"), (2, "causal"), (0, "reference")],
         hp=dict(n_tok=4, k_used=2, shared=3, f_exp=16, n_seg=4, window=4, pooling="max", capacity=1.0,
                 bucket=1, gate_scale=1.0, a_tok=0.7, a_seg=0.3, route="previous")),
    dict(name="hybrid-prev-mean", seed=SEED + 500, plan=[(0, "causal"), (2, "causal"), (0, "reference")],
         hp=dict(n_tok=4, k_used=3, shared=0, f_exp=16, n_seg=3, window=8, pooling="mean", capacity=2.0,
                 bucket=2, gate_scale=1.0, a_tok=0.7, a_seg=0.3, route="previous")),
]
MOE_D, MOE_H, MOE_K, MOE_F = 32, 2, 1, 32
HYBRID_TEXTS = [
    "fn sum(v: &[u64]) -> u64 {\n    v.iter().sum()\n}\n",
    "x = 1\n",
    "def f(x):\n    return x + 1\n",
]
MOE_GREEDY_TEXTS = GREEDY_TEXTS
ROUTE_MARGIN = 1e-3  # every routing decision's log-probability gap; float32 router error is ~1e-6

MOLE_ADAPTERS = dict(names=["python", "rust", "shared", "other"], ranks=[4, 4, 8, 8], alphas=[4.0, 4.0, 6.0, 6.0],
                     shared=2, fallback=3)
MOLE_TEXTS = [
    "Sort:\n```python\nx.sort()\n```\nRust:\n```rs\nv.sort();\n```\n",
    "def f(x):\n    return x",
]
MOLE_GREEDY_TEXT = "```python\ndef fibonacci(n):\n    if n < 2:\n        return"

HYBRID_GGUF = {"tok_router": "ffn_gate_inp", "tok_gate": "ffn_gate_exps", "tok_up": "ffn_up_exps",
               "tok_down": "ffn_down_exps", "seg_router": "ffn_gate_inp_seg", "seg_gate": "ffn_gate_seg_exps",
               "seg_up": "ffn_up_seg_exps", "seg_down": "ffn_down_seg_exps"}


def moe_config(arch, n_vocab, n_kv, tied, theta, eps, n_ff):
    return ref.Config(arch, n_vocab, MOE_D, n_ff, N_LAYER, MOE_H, n_kv, eps, theta, tied, N_CTX, HEAD_DIM)


def moe_base_weights(cfg, rng, dense_ffn):
    """Like make_weights, scaled for D=32 (std 0.3 embeddings, 0.2 q/k, 0.12 others)."""
    out = {}
    for name, shape in ref.hf_shapes(cfg, dense_ffn).items():
        if "norm" in name:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name or "lm_head" in name:
            w = 0.3 * rng.standard_normal(shape)
        elif "q_proj" in name or "k_proj" in name:
            w = 0.2 * rng.standard_normal(shape)
        else:
            w = 0.12 * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


def greedy_traced(model, prompt, n, step):
    """Greedy decoding with step(tokens) -> (logits, route margin). Returns tokens, logit margin, route margin."""
    toks, out, lm, rm = list(prompt), [], float("inf"), float("inf")
    for _ in range(n):
        lg, r = step(toks)
        last = lg[-1]
        top2 = torch.topk(last, 2)
        lm = min(lm, float(top2.values[0] - top2.values[1]))
        rm = min(rm, r)
        nxt = int(torch.argmax(last))
        out.append(nxt)
        toks.append(nxt)
    return out, lm, rm


def routing_json(trace, mode):
    out = []
    for i, tr in enumerate(trace):
        r = {"layer": i, "token_experts": tr["token_experts"]}
        if mode == "reference":
            r["segment_choice"] = tr["segment_choice"]
        else:
            r["segment_experts"] = tr["segment_experts"]
        out.append(r)
    return out


def make_hybrid(out, tok, spec):
    hp = moe.HybridParams(**spec["hp"])
    cfg = moe_config("qwen2", len(tok.tokens), MOE_K, True, 1e6, 1e-6, hp.f_exp)
    name = spec["name"]
    cases_tok = [(t, tok.encode(t)) for t in HYBRID_TEXTS]
    # ~40 tokens causal; ~20 tokens reference (full windows + a ragged tail); 5 tokens reference (w=8: no
    # full window at all, so no segment output; w=4: one window and a tail)
    plan = spec.get("plan", [(0, "causal"), (2, "reference"), (1, "reference")])
    # Weights from the first seed whose every routing decision (all cases, the greedy run) has a gap of at
    # least ROUTE_MARGIN, so float32 rounding in C cannot flip one.
    for attempt in range(200):
        rng = np.random.default_rng(spec["seed"] + 1000 * attempt)
        w = moe_base_weights(cfg, rng, dense_ffn=False)
        for k, shp in moe.hybrid_shapes(cfg, hp).items():
            std = 0.5 if k.endswith("router") else 0.12 if not k.endswith("down") else 0.17
            w[k] = (std * rng.standard_normal(shp)).astype(np.float32)
        m = moe.HybridModel(cfg, hp, w)
        results = [m.forward_traced(cases_tok[ci][1], mode) for ci, mode in plan]
        if min(r[2] for r in results) < ROUTE_MARGIN:
            continue
        g = None
        for text in MOE_GREEDY_TEXTS:
            p = tok.encode(text)
            gout, lm, rm = greedy_traced(m, p, 16, lambda t: m.forward_traced(t, "causal")[0::2])
            if lm >= 5 * TOL_F32 and rm >= ROUTE_MARGIN and all(tok.tokens[t] not in tok.specials for t in gout):
                g = (text, p, gout, lm, rm)
                break
        if g is not None:
            break
    else:
        raise RuntimeError("%s: no seed with unambiguous routing" % name)
    path = os.path.join(out, "models", name + ".gguf")
    gw = GGUFWriter(path)
    a = "multipl_moe"
    add_base_kv(gw, a, cfg, hp.f_exp, GGMLType.F32, name)
    gw.add_uint32(a + ".expert_count", hp.n_tok)
    gw.add_uint32(a + ".expert_used_count", hp.k_used)
    gw.add_int32(a + ".expert_shared_index", hp.shared)
    gw.add_uint32(a + ".expert_feed_forward_length", hp.f_exp)
    gw.add_uint32(a + ".segment.expert_count", hp.n_seg)
    gw.add_uint32(a + ".segment.window", hp.window)
    gw.add_string(a + ".segment.pooling", hp.pooling)
    gw.add_float32(a + ".segment.capacity", hp.capacity)
    gw.add_uint32(a + ".segment.bucket", hp.bucket)
    gw.add_float32(a + ".segment.gate_scale", hp.gate_scale)
    gw.add_float32(a + ".fusion.token", hp.a_tok)
    gw.add_float32(a + ".fusion.segment", hp.a_seg)
    gw.add_string(a + ".segment.mode_default", hp.mode_default)
    if hp.route != "prefix":  # absent: "prefix" (the files made before the key keep their bytes)
        gw.add_string(a + ".segment.route", hp.route)
    add_tokenizer_kv(gw, tok)
    tensors = gguf_tensors(cfg, w, dense_ffn=False)
    for i in range(cfg.num_hidden_layers):
        for k, g_name in HYBRID_GGUF.items():
            tensors.append(("blk.%d.%s.weight" % (i, g_name), w["model.layers.%d.moe.%s" % (i, k)]))
    for n, v in tensors:
        gw.add_tensor(n, v, GGMLType.F32)
    gw.write()

    cases = []
    for ci, ((ti, mode), (lg, trace, rmargin)) in enumerate(zip(plan, results)):
        fn = "golden/%s.case%d.f32" % (name, ci)
        write_f32(os.path.join(out, fn), lg.numpy())
        text, toks = cases_tok[ti]
        cases.append({"text": text, "tokens": toks, "mode": mode, "logits": fn,
                      "max_abs_logit": round(float(lg.abs().max()), 3), "min_route_margin": round(rmargin, 6),
                      "routing": routing_json(trace, mode)})
    text, p, gout, lm, rm = g
    _, gtrace, _ = m.forward_traced(p + gout[:-1], "causal")
    j = {"model": "models/%s.gguf" % name, "arch": a, "type": "f32", "tolerance": {"max_abs": TOL_F32},
         "n_vocab": len(tok.tokens), "n_ctx": N_CTX, "special_tokens_parsed": True,
         "hybrid": dict(spec["hp"], mode_default=hp.mode_default), "cases": cases,
         "greedy": {"mode": "causal", "text": text, "prompt": p, "n_predict": 16, "tokens": gout,
                    "min_margin": round(lm, 6), "min_route_margin": round(rm, 6), "text_out": tok.decode(gout),
                    "routing": routing_json(gtrace, "causal")}}
    write_json(os.path.join(out, "golden", name + ".json"), j)

    # read back: GGUF names -> reference names, same logits
    r = GGUFReader(path)
    back = {ref.gguf_to_hf_name(n): t.dequantize() for n, t in r.tensors.items() if "_exps" not in n and "_inp" not in n}
    inv = {v: k for k, v in HYBRID_GGUF.items()}
    for n, t in r.tensors.items():
        parts = n.split(".")
        if parts[0] == "blk" and parts[2] in inv:
            back["model.layers.%s.moe.%s" % (parts[1], inv[parts[2]])] = t.dequantize()
    hp2 = moe.HybridParams(
        r.get(a + ".expert_count"), r.get(a + ".expert_used_count"), r.get(a + ".expert_shared_index"),
        r.get(a + ".expert_feed_forward_length"), r.get(a + ".segment.expert_count"), r.get(a + ".segment.window"),
        r.get(a + ".segment.pooling"), r.get(a + ".segment.capacity"), r.get(a + ".segment.bucket"),
        r.get(a + ".segment.gate_scale"), r.get(a + ".fusion.token"), r.get(a + ".fusion.segment"),
        r.get(a + ".segment.mode_default"), r.get(a + ".segment.route") or "prefix")
    m2 = moe.HybridModel(cfg, hp2, back)
    for (ti, mode), (lg, trace, _) in zip(plan, results):
        lg2, trace2, _ = m2.forward_traced(cases_tok[ti][1], mode)
        assert float((lg2 - lg).abs().max()) < 1e-5 and routing_json(trace2, mode) == routing_json(trace, mode), name
    print("%-16s max|logit| %s, route margin %.4f, seed attempt %d" % (
        name, [c["max_abs_logit"] for c in cases], min(c["min_route_margin"] for c in cases), attempt))


def make_mole(out, tok):
    name, a = "mole", "mole"
    mp = moe.MoLEParams(**MOLE_ADAPTERS)
    cfg = moe_config("llama", len(tok.tokens), MOE_H, False, 1e4, 1e-5, MOE_F)
    c0 = tok.encode(MOLE_TEXTS[0])
    c1 = tok.encode(MOLE_TEXTS[1])
    sets0 = moe.mole_sets_from_fences(tok, c0, mp)
    py = mp.names.index("python")
    sets1 = [[py, mp.shared]] * len(c1)  # as a request field would give them
    gp = tok.encode(MOLE_GREEDY_TEXT)
    gsets = moe.mole_sets_from_fences(tok, gp, mp)
    for attempt in range(50):  # first seed whose greedy run is unambiguous and has no special token
        rng = np.random.default_rng(SEED + 300 + 1000 * attempt)
        w = moe_base_weights(cfg, rng, dense_ffn=True)
        for k, shp in moe.mole_shapes(cfg, mp).items():
            w[k] = (0.15 * rng.standard_normal(shp)).astype(np.float32)
        m = moe.MoLEModel(cfg, mp, w)
        gout, lm = m.generate_sets(gp, gsets, [py, mp.shared], 16)
        if lm >= 5 * TOL_F32 and all(tok.tokens[t] not in tok.specials for t in gout):
            break
    else:
        raise RuntimeError("mole: no seed with an unambiguous greedy run")

    path = os.path.join(out, "models", name + ".gguf")
    gw = GGUFWriter(path)
    add_base_kv(gw, a, cfg, cfg.intermediate_size, GGMLType.F32, name)
    gw.add_array(a + ".adapter.names", mp.names, VT.STRING)
    gw.add_array(a + ".adapter.ranks", mp.ranks, VT.UINT32)
    gw.add_array(a + ".adapter.alphas", mp.alphas, VT.FLOAT32)
    gw.add_int32(a + ".adapter.shared", mp.shared)
    gw.add_int32(a + ".adapter.fallback", mp.fallback)
    add_tokenizer_kv(gw, tok)
    tensors = gguf_tensors(cfg, w)
    for i in range(cfg.num_hidden_layers):
        for proj in ("gate", "up", "down"):
            for an in mp.names:
                for ab in ("A", "B"):
                    tensors.append(("blk.%d.ffn_%s.lora_%s.%s" % (i, proj, ab.lower(), an),
                                    w["model.layers.%d.mlp.%s_proj.lora.%s.%s" % (i, proj, an, ab)]))
    for n, v in tensors:
        gw.add_tensor(n, v, GGMLType.F32)
    gw.write()

    cases = []
    for ci, (text, toks, sets, src) in enumerate(((MOLE_TEXTS[0], c0, sets0, "fences"),
                                                  (MOLE_TEXTS[1], c1, sets1, "request"))):
        lg = m.forward_sets(toks, sets)
        fn = "golden/%s.case%d.f32" % (name, ci)
        write_f32(os.path.join(out, fn), lg.numpy())
        cases.append({"text": text, "tokens": toks, "adapter_sets": sets, "adapter_source": src, "logits": fn,
                      "max_abs_logit": round(float(lg.abs().max()), 3)})
    j = {"model": "models/%s.gguf" % name, "arch": a, "type": "f32", "tolerance": {"max_abs": TOL_F32},
         "n_vocab": len(tok.tokens), "n_ctx": N_CTX, "special_tokens_parsed": True,
         "adapters": MOLE_ADAPTERS, "cases": cases,
         "greedy": {"text": MOLE_GREEDY_TEXT, "prompt": gp, "prompt_adapter_sets": gsets,
                    "generated_adapter_set": [py, mp.shared], "n_predict": 16, "tokens": gout,
                    "min_margin": round(lm, 6), "text_out": tok.decode(gout)}}
    write_json(os.path.join(out, "golden", name + ".json"), j)

    # read back: un-permute q/k, map LoRA names back, same logits
    r = GGUFReader(path)
    back = {}
    for n, t in r.tensors.items():
        v = t.dequantize()
        if ".lora_" in n:
            _, i, ffn, ab, an = n.split(".")
            back["model.layers.%s.mlp.%s_proj.lora.%s.%s" % (i, ffn[4:], an, ab[5:].upper())] = v
            continue
        hn = ref.gguf_to_hf_name(n)
        if hn.endswith("q_proj.weight"):
            v = ref.llama_unpermute(v, r.get(a + ".attention.head_count"))
        elif hn.endswith("k_proj.weight"):
            v = ref.llama_unpermute(v, r.get(a + ".attention.head_count_kv"))
        back[hn] = v
    mp2 = moe.MoLEParams(r.get(a + ".adapter.names"), [int(x) for x in r.get(a + ".adapter.ranks")],
                         [float(x) for x in r.get(a + ".adapter.alphas")], r.get(a + ".adapter.shared"),
                         r.get(a + ".adapter.fallback"))
    m2 = moe.MoLEModel(cfg, mp2, back)
    assert float((m2.forward_sets(c0, sets0) - m.forward_sets(c0, sets0)).abs().max()) < 1e-5
    print("%-16s max|logit| %s" % (name, [c["max_abs_logit"] for c in cases]))


def qwen3moe_q4_k_m_type(name):
    """Q4_K_M-style for the sparse K-quant fixture, as llama-quantize treats a Qwen3-MoE file: Q4_K, with
    Q6_K for the output and layer 0's attn_v; where a row does not fill a 256-value super-block its
    fallbacks (Q5_0 for Q4_K, Q8_0 for Q6_K): attn_output (rows of H*E = 128) and ffn_down_exps (rows of
    F = 32, the more-bits Q6_K -> Q8_0 in layer 0, Q4_K -> Q5_0 in layer 1), so the expert tensors of one
    layer have different types; routers stay F32 (llama-quantize never quantises ffn_gate_inp)."""
    if name == "output.weight" or name == "blk.0.attn_v.weight":
        return GGMLType.Q6_K
    if name.endswith("ffn_gate_inp.weight"):
        return GGMLType.F32
    if name.endswith("attn_output.weight"):
        return GGMLType.Q5_0
    if name == "blk.0.ffn_down_exps.weight":
        return GGMLType.Q8_0
    if name.endswith("ffn_down_exps.weight"):
        return GGMLType.Q5_0
    return GGMLType.Q4_K


def q8_0_router_f32(name):
    return GGMLType.F32 if name.endswith("ffn_gate_inp.weight") else GGMLType.Q8_0


# Sparse MoE (qwen3moe: Qwen3-Coder-30B-A3B's architecture): Qwen3 attention (per-head q/k norms, head_dim
# E != D / H), 8 experts top-2 with the top-k weights renormalised, no shared expert. The small model in F32
# and Q8_0 (routers F32); a D=256 one for the K-quant mix. (name suffix, per-tensor type, llama_ftype, tol)
SPARSES = [
    dict(name="qwen3moe", seed=SEED + 400, D=32, H=2, K=1, E=32, n_ff=64, tied=True, hf_dir=True,
         sp=dict(n_experts=8, k_used=2, f_exp=32),
         variants=[("", lambda n: GGMLType.F32, 0, TOL_F32), ("-q8_0", q8_0_router_f32, 7, 1e-2)]),
    dict(name="qwen3moe-k", seed=SEED + 500, D=256, H=2, K=1, E=64, n_ff=64, tied=False,
         sp=dict(n_experts=8, k_used=2, f_exp=32),
         variants=[("-q4_k_m", qwen3moe_q4_k_m_type, 15, 1e-3)]),
]
SPARSE_GGUF = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def sparse_gguf_tensors(cfg, sp, w):
    """HF-named Qwen3-MoE weights -> ordered GGUF (name, array): the base tensors, then per layer the router
    and the experts stacked (E, F, D) / (E, D, F) as llama.cpp's converter writes them."""
    out = gguf_tensors(cfg, w, dense_ffn=False)
    for i in range(cfg.num_hidden_layers):
        p = "model.layers.%d.mlp." % i
        out.append(("blk.%d.ffn_gate_inp.weight" % i, w[p + "gate.weight"]))
        for hf, gg in SPARSE_GGUF.items():
            out.append(("blk.%d.%s.weight" % (i, gg), np.ascontiguousarray(
                np.stack([w[p + "experts.%d.%s.weight" % (e, hf)] for e in range(sp.n_experts)]))))
    return out


def sparse_stored(cfg, sp, w, tfn):
    """The HF-named weights as the engine sees them after dequantising each GGUF tensor's type."""
    st = {k: v for k, v in w.items()}
    for n, v in gguf_tensors(cfg, w, dense_ffn=False):
        if v.ndim >= 2:
            st[ref.gguf_to_hf_name(n)] = gguf.roundtrip(v, tfn(n))
    for i in range(cfg.num_hidden_layers):
        p = "model.layers.%d.mlp." % i
        st[p + "gate.weight"] = gguf.roundtrip(w[p + "gate.weight"], tfn("blk.%d.ffn_gate_inp.weight" % i))
        for hf, gg in SPARSE_GGUF.items():
            stack = np.stack([w[p + "experts.%d.%s.weight" % (e, hf)] for e in range(sp.n_experts)])
            back = gguf.roundtrip(stack, tfn("blk.%d.%s.weight" % (i, gg)))
            for e in range(sp.n_experts):
                st[p + "experts.%d.%s.weight" % (e, hf)] = back[e]
    return st


def make_sparse(out, tok, spec):
    sp = moe.SparseParams(**spec["sp"])
    D = spec["D"]
    cfg = ref.Config("qwen3_moe", len(tok.tokens), D, spec["n_ff"], N_LAYER, spec["H"], spec["K"], 1e-6, 1e6,
                     spec["tied"], N_CTX, spec["E"])
    cases_tok = [(t, tok.encode(t)) for t in HYBRID_TEXTS[:2]]
    sc = math.sqrt(MOE_D / D)  # projections from D scaled so activations match the D=32 fixtures
    # the first seed whose every routing decision, in every type variant, has a gap of at least
    # ROUTE_MARGIN (float32 rounding in C cannot flip one), with an unambiguous greedy run
    for attempt in range(200):
        rng = np.random.default_rng(spec["seed"] + 1000 * attempt)
        w = moe_base_weights(cfg, rng, dense_ffn=False)
        for k in w:
            if any(p in k for p in ("q_proj", "k_proj", "v_proj")):
                w[k] = (w[k] * sc).astype(np.float32)
        for k, shp in moe.sparse_shapes(cfg, sp).items():
            std = 0.5 * sc if k.endswith("gate.weight") else 0.17 if "down_proj" in k else 0.12 * sc
            w[k] = (std * rng.standard_normal(shp)).astype(np.float32)
        runs = []
        for suf, tfn, ft, tol in spec["variants"]:
            m = moe.SparseModel(cfg, sp, sparse_stored(cfg, sp, w, tfn))
            res = [m.forward_traced(toks) for _, toks in cases_tok]
            if min(r[2] for r in res) < ROUTE_MARGIN:
                break
            g = None
            for text in MOE_GREEDY_TEXTS:
                p = tok.encode(text)
                gout, lm, rm = greedy_traced(m, p, 16, lambda t: m.forward_traced(t)[0::2])
                if lm >= 5 * tol and rm >= ROUTE_MARGIN and all(tok.tokens[t] not in tok.specials for t in gout):
                    g = (text, p, gout, lm, rm)
                    break
            if g is None:
                break
            runs.append((m, res, g))
        if len(runs) == len(spec["variants"]):
            break
    else:
        raise RuntimeError("%s: no seed with unambiguous routing" % spec["name"])

    a = "qwen3moe"
    for (suf, tfn, ft, tol), (m, res, g) in zip(spec["variants"], runs):
        name = spec["name"] + suf
        path = os.path.join(out, "models", name + ".gguf")
        gw = GGUFWriter(path)
        add_base_kv(gw, a, cfg, cfg.intermediate_size, Mix(ft, tfn), name, key_length=True)
        gw.add_uint32(a + ".expert_count", sp.n_experts)
        gw.add_uint32(a + ".expert_used_count", sp.k_used)
        gw.add_uint32(a + ".expert_feed_forward_length", sp.f_exp)
        add_tokenizer_kv(gw, tok)
        for n, v in sparse_gguf_tensors(cfg, sp, w):
            gw.add_tensor(n, v, tfn(n) if v.ndim >= 2 else GGMLType.F32)
        gw.write()

        cases = []
        for ci, ((text, toks), (lg, trace, rmargin)) in enumerate(zip(cases_tok, res)):
            fn = "golden/%s.case%d.f32" % (name, ci)
            write_f32(os.path.join(out, fn), lg.numpy())
            cases.append({"text": text, "tokens": toks, "logits": fn, "max_abs_logit": round(float(lg.abs().max()), 3),
                          "min_route_margin": round(rmargin, 6),
                          "routing": [{"layer": i, "token_experts": tr["token_experts"]} for i, tr in enumerate(trace)]})
        text, p, gout, lm, rm = g
        _, gtrace, _ = m.forward_traced(p + gout[:-1])
        tname = suf[1:] if suf else "f32"
        j = {"model": "models/%s.gguf" % name, "arch": a, "type": tname, "tolerance": {"max_abs": tol},
             "n_vocab": len(tok.tokens), "n_ctx": N_CTX, "special_tokens_parsed": True, "sparse": spec["sp"],
             "cases": cases,
             "greedy": {"text": text, "prompt": p, "n_predict": 16, "tokens": gout, "min_margin": round(lm, 6),
                        "min_route_margin": round(rm, 6), "text_out": tok.decode(gout),
                        "routing": [{"layer": i, "token_experts": tr["token_experts"]} for i, tr in enumerate(gtrace)]}}
        write_json(os.path.join(out, "golden", name + ".json"), j)

        # read back with the GGUF-side forward and the vectorised GGUF-layout FFN: the same logits
        r = GGUFReader(path)
        t = {n: x.dequantize() for n, x in r.tensors.items()}
        for text_toks, (lg, _, _) in zip(cases_tok, res):
            got = ref.gguf_forward(t, r.get("general.architecture"), r.get(a + ".attention.head_count"),
                                   r.get(a + ".attention.head_count_kv"),
                                   float(r.get(a + ".attention.layer_norm_rms_epsilon")),
                                   float(r.get(a + ".rope.freq_base")), text_toks[1],
                                   ffn=moe.gguf_sparse_ffn(t, r.get(a + ".expert_used_count")))
            assert float((got - lg).abs().max()) < 1e-5, name
        print("%-16s max|logit| %s, route margin %.4f, seed attempt %d" % (
            name, [c["max_abs_logit"] for c in cases], min(c["min_route_margin"] for c in cases), attempt))

        if spec.get("hf_dir") and not suf:  # the f32 weights as a Qwen3MoeForCausalLM directory
            hname = name + "-hf"
            extra = {"num_experts": sp.n_experts, "num_experts_per_tok": sp.k_used, "moe_intermediate_size": sp.f_exp,
                     "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                     "output_router_logits": False, "router_aux_loss_coef": 0.001}
            hdir = os.path.join(out, "hf", hname)
            write_hf(hdir, cfg, w, tok, "float32", 1, names=list(w), extra=extra)
            golden(out, hname, "hf_dir", "hf/" + hname, a, "f32", tol, m, tok, cases_tok, logits_from=name,
                   n_cases=len(cases_tok))
            # read back with the separate safetensors parser and the config as written
            st = {}
            for f in sorted(x for x in os.listdir(hdir) if x.endswith(".safetensors")):
                st.update(read_safetensors(os.path.join(hdir, f)))
            hc = json.load(open(os.path.join(hdir, "config.json")))
            sp2 = moe.SparseParams(hc["num_experts"], hc["num_experts_per_tok"], hc["moe_intermediate_size"],
                                   hc["norm_topk_prob"])
            got = moe.SparseModel(ref.Config.from_hf(hc), sp2, st).forward(cases_tok[0][1])
            assert float((got - res[0][0]).abs().max()) < 1e-6, hname


def make_moe_fixtures(out, tok):
    for spec in HYBRIDS:
        make_hybrid(out, tok, spec)
    make_mole(out, tok)
    for spec in SPARSES:
        make_sparse(out, tok, spec)


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
    make_quant_golden(out)

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

        # type variants: every type for the first model, those the spec names for the others
        for suf, tt, tol in VARIANTS if si == 0 else spec.get("variants", []):
            name = "%s-%s" % (spec["name"], suf)
            sw = stored_weights(w, tt)
            m = ref.Model(cfg, sw)
            p = os.path.join(out, "models", name + ".gguf")
            write_gguf(p, spec, cfg, w, tok, tt, name)
            golden(out, name, "model", "models/%s.gguf" % name, cfg.model_type, suf, tol, m, tok, cases_tok,
                   n_cases=2)
            check_gguf(p, spec, cases_tok[0][1], m.forward(cases_tok[0][1]))
        if si == 0:  # the f32 HF directory of the first model
            name = spec["name"] + "-hf"  # the same f32 weights, one model.safetensors, the same logits files
            write_hf(os.path.join(out, "hf", name), cfg, w, tok, "float32", 1)
            golden(out, name, "hf_dir", "hf/" + name, cfg.model_type, "f32", TOL_F32, model, tok, cases_tok,
                   logits_from=spec["name"])
            check_hf(os.path.join(out, "hf", name), cfg, cases_tok[0][1], model.forward(cases_tok[0][1]))
        if spec.get("hf_dir"):  # the same f32 weights as an HF directory (rope_scaling in config.json)
            name = spec["name"] + "-hf"
            write_hf(os.path.join(out, "hf", name), cfg, w, tok, "float32", 1)
            golden(out, name, "hf_dir", "hf/" + name, cfg.model_type, "f32", TOL_F32, model, tok, cases_tok,
                   logits_from=spec["name"], n_cases=spec.get("n_cases", 3))
            check_hf(os.path.join(out, "hf", name), cfg, cases_tok[0][1], model.forward(cases_tok[0][1]))
        if spec["name"] == "llama-mha":  # bf16, sharded HF directory
            name = spec["name"] + "-bf16-hf"
            sw = write_hf(os.path.join(out, "hf", name), cfg, w, tok, "bfloat16", 2)
            m = ref.Model(cfg, sw)
            golden(out, name, "hf_dir", "hf/" + name, cfg.model_type, "bf16", 2e-4, m, tok, cases_tok, n_cases=2)
            check_hf(os.path.join(out, "hf", name), cfg, cases_tok[0][1], m.forward(cases_tok[0][1]))

    make_chat_fixture(out)

    # K-quants: only the quantised files (their f32 twin would be 3 MB of fixture for nothing new)
    for spec, seed in KQUANT_MODELS:
        cfg = make_config(spec, V)
        w = make_weights(cfg, seed)
        for suf, tt, tol in KQUANT_VARIANTS:
            name = "%s-%s" % (spec["name"], suf)
            m = ref.Model(cfg, stored_weights(w, tt))
            p = os.path.join(out, "models", name + ".gguf")
            write_gguf(p, spec, cfg, w, tok, tt, name)
            golden(out, name, "model", "models/%s.gguf" % name, cfg.model_type, suf, tol, m, tok, cases_tok,
                   n_cases=2)
            check_gguf(p, spec, cases_tok[0][1], m.forward(cases_tok[0][1]))
            print("%-16s written" % name)

    if not args.only_dense:
        make_moe_fixtures(out, tok)

    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print("fixtures: %.2f MB in %s" % (total / 1e6, out))


if __name__ == "__main__":
    sys.exit(main())
