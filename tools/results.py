"""results.py - the numbers behind docs/results.md: the MultiPL-MoE experiment at small scale.

    results.py losses   --out E/losses.json       held-out bits per byte per language, every stage (PyTorch);
                                                  moe also in `reference` segment mode; HumanEval-X solutions
    results.py routing  --gguf moe.gguf --out E/routing.json --png docs/results-routing.png
                                                  token/segment expert frequencies per language, from the C
                                                  engine's own statistics (`codemoe complete --routing -n 0`)
    results.py complete --models base=F,moe=F,... --out E/complete.json
                                                  single-line completion (exact match, edit similarity),
                                                  greedy, by the C engine
    results.py samples  --gguf F --out E/samples.json   a few real completions of the shipped model
    results.py report   --eval E --out docs/results.md --card models/README.md
                                                  also writes the report's numbers, docs/results.json
    results.py render   --numbers docs/results.json --out docs/results.md --card models/README.md
                                                  rebuilds results.md and the card's block from the committed
                                                  numbers alone (no checkpoints, no corpus, no engine)
    results.py selftest                           the markdown <-> JSON round trip, and that the committed
                                                  docs/results.json renders to the committed results.md
    results.py selfcheck [--gguf F --stage S]     this file's scoring == train.py / reference_moe; the engine
                                                  == PyTorch on a GGUF (greedy, MoLE with its language)

Checkpoints are read from $CM_TRAIN/ckpt/<stage>/final.pt (latest.pt with --latest), through train.py's
load_model, so the stage definitions live in one place. Every JSON records its command and wall time;
`report` lays them out (tools/results.sh runs everything in order). Torch and the engine use 1 thread.

The raw evaluation outputs (per-window losses, routing counts) live in $CM_EVAL with the checkpoints, outside
the repository; what the repository keeps is docs/results.json, the report as data: every paragraph,
table (header, alignment, rows of cells as printed), code block and image of results.md, plus the table of
the model card. `report` writes it beside results.md through the same renderer `render` uses, so the two
cannot disagree, and `render` rebuilds the report after a change of wording or layout without re-running
the evaluation.
"""

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("CM_EXP", "v1")  # this report is the shipped run's (train.py's experiment v1)
import train as tr  # noqa: E402

REPO = tr.REPO
HIGH, LOW = tr.HIGH, tr.LOW
LANGS6 = HIGH + LOW
STAGES = ["base", "dense_cont", "lora", "mole", "moe", "moe_noseg", "moe_noshared", "moe_segbal"]
NAMES = {"base": "Base (dense, pre-trained)", "dense_cont": "Post-pretraining (dense)", "lora": "LoRA (r 8)",
         "mole": "MoLE (LoRA experts)", "moe": "MultiPL-MoE", "moe_ref": "MultiPL-MoE, reference mode",
         "moe_noseg": "MultiPL-MoE w/o segment level", "moe_noshared": "MultiPL-MoE w/o shared expert",
         "moe_noshared_ref": "MultiPL-MoE w/o shared expert, reference mode",
         "moe_segbal": "MultiPL-MoE, segment routers balanced too"}
LANG_TITLE = {"python": "Python", "java": "Java", "cpp": "C++", "rust": "Rust", "go": "Go", "ruby": "Ruby"}
LN2 = math.log(2.0)


def default_codemoe():
    return os.path.join(REPO, os.environ.get("CM_BUILD", "build-eval"), "server", "codemoe")


def encoder(tok_dir):
    import train_tokenizer as tt
    return tt.Encoder.load(os.path.join(tok_dir, "tokenizer.json"))


def token_bytes(enc):
    """Bytes of source text each token id stands for (special tokens: 0, they are not source bytes)."""
    n = len(enc.tok.tokens)
    out = np.zeros(n, dtype=np.int64)
    for i, t in enumerate(enc.tok.tokens):
        if t is not None and t not in enc.tok.specials:
            out[i] = len(enc.tok.decode_bytes([i]))
    return out


def ckpt_path(stage, latest):
    d = tr.ckpt_dir(stage)
    for name in (("final.pt", "latest.pt") if latest else ("final.pt",)):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    return None


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(path + ".tmp", path)


def param_counts(model, stage):
    """(total, active per token). Active: everything a token's forward multiplies by; hybrid: the k token
    experts used (shared included) and one segment expert (capacity 1) per layer; MoLE: the base plus the
    language's and the shared adapter. The tied embedding counts once."""
    total = sum(p.numel() for p in model.parameters())
    if stage.startswith("moe"):
        act = total
        for layer in model.model.layers:
            m, hp = layer.moe, layer.moe.hp
            per = m.tok_gate[0].numel() + m.tok_up[0].numel() + m.tok_down[0].numel()
            act -= per * (hp["n_tok"] - hp["k_used"])
            if hp["n_seg"]:
                act -= per * (hp["n_seg"] - max(1, int(hp["capacity"])))
        return total, act
    if stage == "mole":
        lora = sum(p.numel() for n, p in model.named_parameters() if ".lora." in n)
        used = sum(p.numel() for n, p in model.named_parameters() if ".lora.python." in n or ".lora.shared." in n)
        return total, total - lora + used
    if stage == "lora":  # merged at export: the dense model
        base = sum(p.numel() for n, p in model.named_parameters() if ".lora." not in n)
        return base, base
    return total, total


# ============================================================================ reference segment mode

def _segment_reference(self, x):
    """HybridMoE.forward with the segment level in `reference` mode (docs/model-format.md, reference_moe's
    segment_reference): per sequence, P = T // w windows pooled, experts in index order take their top
    K = floor(P c / N_seg) windows not yet taken by `bucket` experts; the ragged tail gets no segment
    expert. Batched over rows; checked against reference_moe by `selfcheck`."""
    hp = self.hp
    B, T, D = x.shape
    self.hp = dict(hp, n_seg=0)  # token level only (y = a_tok * y_tok), then the segment level below
    try:
        y = type(self).forward(self, x)
    finally:
        self.hp = hp
    w, S = hp["window"], hp["n_seg"]
    P = T // w
    if not S or not P:
        return y
    xs = x[:, :P * w].reshape(B, P, w, D)
    desc = xs.max(dim=2).values if hp["pooling"] == "max" else xs.mean(dim=2)
    q = torch.softmax(desc @ self.seg_router.T, dim=-1)  # (B, P, S)
    K = int(math.floor(P * hp["capacity"] / S))
    y_seg = torch.zeros_like(x)
    for b in range(B):
        taken = [0] * P
        for e in range(S):
            order = sorted(range(P), key=lambda s: (-float(q[b, s, e]), s))
            for s in [s for s in order if taken[s] < hp["bucket"]][:K]:
                taken[s] += 1
                seg = x[b, s * w:(s + 1) * w]
                y_seg[b, s * w:(s + 1) * w] += (q[b, s, e] * hp["gate_scale"]) * tr.swiglu(
                    seg, self.seg_gate[e], self.seg_up[e], self.seg_down[e])
    return y + hp["a_seg"] * y_seg


class segment_mode:
    """with segment_mode(model, "reference"): the hybrid layers score in reference mode."""

    def __init__(self, model, mode):
        self.model, self.mode = model, mode

    def __enter__(self):
        if self.mode == "reference":
            for layer in self.model.model.layers:
                layer.moe.forward = _segment_reference.__get__(layer.moe)
        return self.model

    def __exit__(self, *a):
        for layer in self.model.model.layers:
            if hasattr(layer, "moe") and "forward" in layer.moe.__dict__:
                del layer.moe.forward


# ============================================================================ losses (PyTorch)

@torch.no_grad()
def window_nll(model, stage, lang, x, y, bs):
    """Per-window summed NLL (nats) of the targets y given x; (n,) float64."""
    out = []
    for i in range(0, len(x), bs):
        xb, yb = x[i:i + bs], y[i:i + bs]
        if stage == "mole":
            tr.set_mole_sets(model, [lang] * len(xb), xb.shape[1])
        lg = model(xb)
        nll = Fn.cross_entropy(lg.reshape(-1, lg.shape[-1]), yb.reshape(-1), reduction="none")
        out.append(nll.reshape(yb.shape).double().sum(1))
    return torch.cat(out).numpy()


@torch.no_grad()
def hex_nll(model, stage, enc, tb, lang, ctx, n, bs):
    """HumanEval-X canonical solutions given their prompts (train.solution_nll's definition: the last
    ctx + 1 tokens of prompt + solution, loss on the solution's tokens), batched with right padding (a
    causal model's earlier positions do not see it). Per problem: (nll nats, tokens, bytes)."""
    seqs = []
    for ex in tr.humaneval_x(lang)[:n]:
        p, sol = enc.encode(ex["prompt"]), enc.encode(ex["canonical_solution"])
        seq = (p + sol)[-(ctx + 1):]
        seqs.append((seq, min(len(sol), len(seq) - 1)))
    res = []
    for i in range(0, len(seqs), bs):
        chunk = seqs[i:i + bs]
        L = max(len(s) for s, _ in chunk) - 1
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        for j, (s, _) in enumerate(chunk):
            x[j, :len(s) - 1] = torch.as_tensor(s[:-1])
        if stage == "mole":
            tr.set_mole_sets(model, [lang] * len(chunk), L)
        lp = torch.log_softmax(model(x), -1)
        for j, (s, k) in enumerate(chunk):
            tgt = torch.as_tensor(s[1:])
            nll = -lp[j, torch.arange(len(tgt)), tgt][-k:].double()
            res.append((float(nll.sum()), k, int(tb[np.asarray(s[-k:])].sum())))
    return res


def cmd_losses(args):
    t0 = time.time()
    torch.set_num_threads(args.threads)
    enc = encoder(args.tokenizer)
    tb = token_bytes(enc)
    out = {"command": " ".join(sys.argv), "windows_per_lang": args.windows, "hex_problems": args.hex,
           "stages": {}}
    for stage in args.stages.split(","):
        path = ckpt_path(stage, args.latest)
        if not path:
            print("losses: %s: no checkpoint, skipped" % stage, file=sys.stderr)
            continue
        ts = time.time()
        model, ck = tr.load_model(stage, path)
        model.eval()
        ctx = ck["meta"]["ctx"]
        hb = tr.heldout_batches(LANGS6, ctx, args.windows)
        total, active = param_counts(model, stage)
        modes = ["causal"] + (["reference"] if stage in ("moe", "moe_noshared") else [])
        for mode in modes:
            key = stage if mode == "causal" else stage + "_ref"
            r = {"stage": stage, "mode": mode, "ckpt": path, "step": ck["step"], "params": total,
                 "meta": {k: ck["meta"].get(k) for k in ("tokens", "lr", "batch", "ctx", "fim")},
                 "active_params": active, "heldout": {}, "hex": {}}
            with segment_mode(model, mode):
                for lang, (x, y) in hb.items():
                    nll = window_nll(model, stage, lang, x, y, args.batch)
                    nb = tb[y.numpy()].sum(1)
                    r["heldout"][lang] = {"nll": nll.tolist(), "bytes": nb.tolist(), "tokens": int(y.shape[1]),
                                          "bpb": float(nll.sum() / LN2 / nb.sum()),
                                          "nats_per_token": float(nll.sum() / y.numel())}
                if mode == "causal" and args.hex:
                    for lang in [l for l in LANGS6 if l in tr.HEX_LANGS]:
                        h = hex_nll(model, stage, enc, tb, lang, ctx, args.hex, args.batch)
                        r["hex"][lang] = {"bpb": sum(a for a, _, _ in h) / LN2 / sum(c for _, _, c in h),
                                          "nats_per_token": sum(a for a, _, _ in h) / sum(b for _, b, _ in h),
                                          "problems": len(h)}
            r["seconds"] = round(time.time() - ts, 1)
            out["stages"][key] = r
            print("losses: %-16s %s (%.0fs)" % (key, " ".join("%s %.3f" % (l, v["bpb"]) for l, v in
                                                              r["heldout"].items()), r["seconds"]), file=sys.stderr)
            ts = time.time()
    out["seconds"] = round(time.time() - t0, 1)
    write_json(args.out, out)


# ============================================================================ engine helpers

def run_engine(codemoe, gguf, prompt, n_predict, language=None, routing=False, timeout=120):
    cmd = [codemoe, "complete", "--model", gguf, "--file", "-", "--temperature", "0", "-n", str(n_predict),
           "--threads", "1"]
    if language:
        cmd += ["--language", language]
    if routing:
        cmd.append("--routing")
    r = subprocess.run(cmd, input=prompt.encode("utf-8"), capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("%s: rc %d: %s" % (" ".join(cmd[:4]), r.returncode, r.stderr.decode()[-300:]))
    return r.stdout.decode("utf-8", errors="replace"), r.stderr.decode("utf-8", errors="replace")


def gguf_arch(path):
    import gguf
    return gguf.GGUFReader(path).get("general.architecture")


def heldout_texts(corpus, lang):
    with open(os.path.join(corpus, lang, "heldout.jsonl"), encoding="utf-8") as fh:
        return [json.loads(l)["text"] for l in fh]


def cut_tokens(enc, text, n, tail):
    """The last (tail) or first n tokens of text as text, starting (tail) / ending at a line boundary."""
    ids = enc.encode(text)
    if len(ids) <= n:
        return text
    b = enc.tok.decode_bytes(ids[-n:] if tail else ids[:n])
    s = b.decode("utf-8", errors="ignore")
    if tail:
        k = s.find("\n")
        return s[k + 1:] if k >= 0 else s
    k = s.rfind("\n")
    return s[:k + 1] if k >= 0 else s


# ============================================================================ routing (engine)

ROUTE_TOK = re.compile(r"\be(\d+)(\(shared\))? (\d+)\+(\d+) g")
ROUTE_SEG = re.compile(r"\bs(\d+) (\d+)\+(\d+) g([0-9.]+)")


def parse_routing(err):
    """`codemoe complete --routing` (server/routing_print.c) -> {layer: {"tok": {e: n}, "seg": {e: n},
    "shared": e}}; prompt + generated tokens."""
    layers, cur = {}, None
    for line in err.splitlines():
        m = re.match(r"layer\s+(\d+)\s+token:", line)
        if m:
            cur = layers.setdefault(int(m.group(1)), {"tok": {}, "seg": {}, "shared": -1, "seg_gate": 0.0})
            for e, sh, a, b in ROUTE_TOK.findall(line):
                cur["tok"][int(e)] = int(a) + int(b)
                if sh:
                    cur["shared"] = int(e)
        elif cur is not None and line.strip().startswith("segment"):
            for e, a, b, g in ROUTE_SEG.findall(line):
                cur["seg"][int(e)] = int(a) + int(b)
                cur["seg_gate"] += (int(a) + int(b)) * float(g)  # mean gate x tokens = gate sum
    return layers


def mutual_info(freq):
    """I(language; expert) in bits with languages weighted equally; freq (L, E) rows sum to 1."""
    f = np.asarray(freq, dtype=np.float64)
    pe = f.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(f > 0, f * np.log2(f / pe[None, :]), 0.0)
    return float(t.sum() / f.shape[0])


def init_like(codemoe, gguf_path, dense, out):
    """A hybrid upcycled from the dense base with the trained file's hyper-parameters and routers drawn as
    train.py draws them before training (N(0, 0.02)): the routing a language would get with no training."""
    import gguf
    r = gguf.GGUFReader(gguf_path)
    a = "multipl_moe."
    cmd = [codemoe, "upcycle", dense, out, "--experts", str(r.get(a + "expert_count")),
           "--top-k", str(r.get(a + "expert_used_count")), "--shared", str(r.get(a + "expert_shared_index")),
           "--segment-experts", str(r.get(a + "segment.expert_count")), "--window", str(r.get(a + "segment.window")),
           "--pooling", r.get(a + "segment.pooling"), "--capacity", str(r.get(a + "segment.capacity")),
           "--bucket", str(r.get(a + "segment.bucket")), "--gate-scale", str(r.get(a + "segment.gate_scale")),
           "--fusion", "%s,%s" % (r.get(a + "fusion.token"), r.get(a + "fusion.segment")),
           "--router-init", "noise", "--router-std", "0.02", "--seed", "1234"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def routing_chunks(args, enc):
    """Per language, args.chunks held-out texts of at most args.tokens tokens (the start of random files,
    cut at a line end; seeded), and their token counts."""
    chunks, n_tokens = {}, {}
    for lang in args.langs.split(","):
        rng = random.Random("%d:%s" % (args.seed, lang))
        texts = heldout_texts(args.corpus, lang)
        order = list(range(len(texts)))
        rng.shuffle(order)
        chunks[lang], n_tokens[lang] = [], 0
        for fi in order:
            if len(chunks[lang]) == args.chunks:
                break
            t = cut_tokens(enc, texts[fi], args.tokens, tail=False)
            if len(t.strip()) >= 32:
                chunks[lang].append(t)
                n_tokens[lang] += len(enc.encode(t))
    return chunks, n_tokens


def routing_counts(codemoe, gguf_path, chunks, n_tokens):
    counts = {}  # lang -> layer -> kind -> expert -> n
    shared = -1
    gate = {}  # layer -> [segment gate sum, segment selections]
    for lang, texts in chunks.items():
        for t in texts:
            _, err = run_engine(codemoe, gguf_path, t, 0, routing=True)
            parsed = parse_routing(err)
            if not parsed or not any(d["tok"] for d in parsed.values()):
                raise RuntimeError("no token-expert counts in `codemoe complete --routing` output (has "
                                   "server/routing_print.c's format changed?):\n" + err[-500:])
            for l, d in parsed.items():
                shared = d["shared"]
                gs = gate.setdefault(l, [0.0, 0])
                gs[0] += d["seg_gate"]
                gs[1] += sum(d["seg"].values())
                for kind in ("tok", "seg"):
                    c = counts.setdefault(lang, {}).setdefault(l, {}).setdefault(kind, {})
                    for e, n in d[kind].items():
                        c[e] = c.get(e, 0) + n
    res = routing_freq(counts, n_tokens, shared)
    res["seg_gate_mean"] = {str(l): g / n for l, (g, n) in gate.items() if n}
    return res


def routing_freq(counts, n_tokens, shared):
    langs = list(counts)
    n_layer = 1 + max(max(counts[l]) for l in langs)
    pick = sorted(set([0, (n_layer - 1) // 2, n_layer - 1]))
    res = {"tokens": n_tokens, "n_layer": n_layer, "layers": pick,
           "shared": shared, "langs": langs, "token": {}, "segment": {}, "mi_token": {}, "mi_segment": {}}
    for l in range(n_layer):
        for kind, key in (("tok", "token"), ("seg", "segment")):
            es = sorted(set(e for lang in langs for e in counts[lang][l].get(kind, {})))
            if kind == "tok":
                es = [e for e in es if e != shared]  # the shared expert takes every token (paper: omitted)
            if not es:
                continue
            freq = []
            for lang in langs:
                c = counts[lang][l].get(kind, {})
                s = sum(c.get(e, 0) for e in es)
                freq.append([c.get(e, 0) / s if s else 0.0 for e in es])
            res[key][str(l)] = {"experts": es, "freq": freq}
            res["mi_" + key][str(l)] = mutual_info(freq)
    return res


def cmd_routing(args):
    t0 = time.time()
    enc = encoder(args.tokenizer)
    chunks, n_tokens = routing_chunks(args, enc)
    res = routing_counts(args.codemoe, args.gguf, chunks, n_tokens)
    import gguf
    rd = gguf.GGUFReader(args.gguf)
    res.update(command=" ".join(sys.argv), gguf=args.gguf, chunks_per_lang=args.chunks,
               max_tokens_per_chunk=args.tokens, fusion=[rd.get("multipl_moe.fusion.token"),
                                                         rd.get("multipl_moe.fusion.segment")])
    if args.init_from:
        g = init_like(args.codemoe, args.gguf, args.init_from, os.path.splitext(args.out)[0] + "-init.gguf")
        b = routing_counts(args.codemoe, g, chunks, n_tokens)
        res["init"] = {"gguf": g, "mi_token": b["mi_token"], "mi_segment": b["mi_segment"]}
        os.remove(g)
    res["seconds"] = round(time.time() - t0, 1)
    write_json(args.out, res)
    if args.png:
        plot_routing(res, args.png)
    print("routing: %d layers, %s tokens, %.0fs" % (res["n_layer"], res["tokens"], res["seconds"]), file=sys.stderr)


def plot_routing(res, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = [k for k in ("token", "segment") if res[k]]
    pick = res["layers"]
    fig, axes = plt.subplots(len(kinds), len(pick), figsize=(3.6 * len(pick), 3.0 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        for c, l in enumerate(pick):
            ax = axes[r][c]
            d = res[kind].get(str(l))
            if not d:
                ax.axis("off")
                continue
            f = np.asarray(d["freq"])
            ax.imshow(f, vmin=0, vmax=max(0.5, float(f.max())), cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(d["experts"])))
            ax.set_xticklabels(["%s%d" % ("e" if kind == "token" else "s", e) for e in d["experts"]], fontsize=8)
            ax.set_yticks(range(len(res["langs"])))
            ax.set_yticklabels([LANG_TITLE.get(x, x) for x in res["langs"]], fontsize=8)
            for i in range(f.shape[0]):
                for j in range(f.shape[1]):
                    ax.text(j, i, "%.2f" % f[i, j], ha="center", va="center", fontsize=6.5,
                            color="white" if f[i, j] < 0.3 else "black")
            ax.set_title("%s experts, layer %d (%s)\nI(lang; expert) = %.3f bit" % (
                kind, l + 1, "first" if l == pick[0] else "last" if l == pick[-1] else "middle",
                res["mi_" + kind][str(l)]), fontsize=8.5)
    fig.suptitle("Expert selection frequency per language (codemoe routing statistics; shared expert omitted)",
                 fontsize=9.5)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)


# ============================================================================ completion (engine)

def levenshtein(a, b):
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_sim(a, b):
    return 1.0 if not a and not b else 1.0 - levenshtein(a, b) / max(len(a), len(b))


def pick_lines(enc, corpus, lang, n, seed, prompt_tokens):
    """n (prompt, target) pairs from held-out files: a random file, a random line (not among the first 3,
    4..120 characters stripped); prompt = the text before the line, its last <= prompt_tokens tokens from a
    line start; target = the line. Deterministic for (seed, lang)."""
    rng = random.Random("%d:%s" % (seed, lang))
    texts = heldout_texts(corpus, lang)
    items, seen = [], set()
    while len(items) < n and len(seen) < 50 * n:
        fi = rng.randrange(len(texts))
        lines = texts[fi].split("\n")
        cand = [i for i in range(3, len(lines) - 1) if 4 <= len(lines[i].strip()) <= 120]
        if not cand:
            seen.add((fi, -1))
            continue
        li = rng.choice(cand)
        if (fi, li) in seen:
            continue
        seen.add((fi, li))
        prefix = "\n".join(lines[:li]) + "\n"
        items.append({"file": fi, "line": li, "prompt": cut_tokens(enc, prefix, prompt_tokens, tail=True),
                      "target": lines[li]})
    return items


def cmd_complete(args):
    t0 = time.time()
    enc = encoder(args.tokenizer)
    models = dict(kv.split("=", 1) for kv in args.models.split(","))
    langs = args.langs.split(",")
    items = {l: pick_lines(enc, args.corpus, l, args.n, args.seed, args.prompt_tokens) for l in langs}
    res = {"command": " ".join(sys.argv), "n_per_lang": args.n, "seed": args.seed,
           "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.n_predict, "models": {}}
    for name, g in models.items():
        ts = time.time()
        mole = gguf_arch(g) == "mole"
        r = {"gguf": g, "langs": {}}
        for lang in langs:
            em, es, outs = [], [], []
            for it in items[lang]:
                out, _ = run_engine(args.codemoe, g, it["prompt"], args.n_predict, language=lang if mole else None)
                line = out.split("\n", 1)[0]
                em.append(float(line.strip() == it["target"].strip()))
                es.append(edit_sim(line.strip(), it["target"].strip()))
                outs.append(line)
            r["langs"][lang] = {"em": float(np.mean(em)), "es": float(np.mean(es)), "n": len(em), "outputs": outs}
        r["seconds"] = round(time.time() - ts, 1)
        res["models"][name] = r
        print("complete: %-12s %s (%.0fs)" % (name, " ".join("%s %.2f/%.2f" % (l, v["em"], v["es"]) for l, v in
                                                          r["langs"].items()), r["seconds"]), file=sys.stderr)
    res["targets"] = {l: [it["target"] for it in items[l]] for l in langs}
    res["seconds"] = round(time.time() - t0, 1)
    write_json(args.out, res)


SAMPLE_HEADS = {"python": r"\s*def \w+\(.*:\s*$", "rust": r"\s*(pub )?fn \w+.*\{\s*$",
                "go": r"func .*\{\s*$", "java": r".*\)\s*\{\s*$", "cpp": r".*\)\s*\{\s*$", "ruby": r"\s*def \w+"}


def cmd_samples(args):
    """Real completions of the shipped model: per language a held-out function header (random, seeded) with
    the file before it as the prompt (<= prompt_tokens), greedy, up to n_predict tokens; plus HumanEval-X
    Python problem 0 (its prompt only)."""
    t0 = time.time()
    enc = encoder(args.tokenizer)
    mole = gguf_arch(args.gguf) == "mole"
    out = {"command": " ".join(sys.argv), "gguf": args.gguf, "samples": []}
    for lang in args.langs.split(","):
        rng = random.Random("%d:sample:%s" % (args.seed, lang))
        texts = heldout_texts(args.corpus, lang)
        for _ in range(1000):
            t = texts[rng.randrange(len(texts))]
            lines = t.split("\n")
            heads = [i for i in range(8, len(lines) - 8) if re.match(SAMPLE_HEADS[lang], lines[i])]
            if heads:
                break
        li = rng.choice(heads)
        prompt = cut_tokens(enc, "\n".join(lines[:li + 1]) + "\n", args.prompt_tokens, tail=True)
        gen, _ = run_engine(args.codemoe, args.gguf, prompt, args.n_predict, language=lang if mole else None)
        out["samples"].append({"lang": lang, "source": "held-out", "prompt": prompt, "output": gen,
                               "truth": "\n".join(lines[li + 1:li + 1 + max(3, gen.count("\n") + 1)])})
    ex = tr.humaneval_x("python")[0]
    gen, _ = run_engine(args.codemoe, args.gguf, ex["prompt"], args.n_predict, language="python" if mole else None)
    out["samples"].append({"lang": "python", "source": "HumanEval-X %s" % ex["task_id"], "prompt": ex["prompt"],
                           "output": gen, "truth": ex["canonical_solution"]})
    out["seconds"] = round(time.time() - t0, 1)
    write_json(args.out, out)


# ============================================================================ self-check

def cmd_selfcheck(args):
    """1. window_nll == train.evaluate; 2. reference mode == reference_moe.HybridModel (float64);
    3. with --gguf: the engine's greedy continuation == the PyTorch model's (MoLE: --language)."""
    torch.set_num_threads(args.threads)
    import reference_moe as rm
    bad = 0
    for stage in args.stages.split(","):
        path = ckpt_path(stage, True)
        if not path:
            continue
        model, ck = tr.load_model(stage, path)
        model.eval()
        hb = tr.heldout_batches(["python", "rust"], ck["meta"]["ctx"], 2)
        want = tr.evaluate(model, hb, stage)
        model.eval()
        for lang, (x, y) in hb.items():
            got = float(window_nll(model, stage, lang, x, y, 8).sum() / y.numel())
            ok = abs(got - want[lang]) < 1e-3
            bad += not ok
            print("%s nll %s %s: %.4f vs train.evaluate %.4f" % ("ok  " if ok else "DIFF", stage, lang, got, want[lang]))
        if stage.startswith("moe") and model.model.layers[0].moe.hp["n_seg"]:
            m64 = model.double()
            hpd = m64.model.layers[0].moe.hp
            hp = rm.HybridParams(hpd["n_tok"], hpd["k_used"], hpd["shared"], m64.cfg.intermediate_size,
                                 hpd["n_seg"], hpd["window"], hpd["pooling"], hpd["capacity"], hpd["bucket"],
                                 hpd["gate_scale"], hpd["a_tok"], hpd["a_seg"])
            hm = rm.HybridModel(m64.cfg, hp, {k: v.detach() for k, v in m64.state_dict().items()})
            x = hb["rust"][0][:, :100]  # 3 whole windows of 32 and a ragged tail
            with torch.no_grad(), segment_mode(m64, "reference"):
                got = m64(x)
            for b in range(len(x)):
                d = float((got[b] - hm.forward_traced(x[b].tolist(), "reference")[0]).abs().max())
                ok = d < 1e-9
                bad += not ok
                print("%s reference mode %s row %d: max|diff| %.2e" % ("ok  " if ok else "DIFF", stage, b, d))
            model.float()
    if args.gguf:
        enc = encoder(args.tokenizer)
        model, _ = tr.load_model(args.stage, ckpt_path(args.stage, True))
        model = model.double().eval()
        mole = gguf_arch(args.gguf) == "mole"
        eot = enc.tok.ids["<|endoftext|>"]
        for lang, prompt in (("python", "def fibonacci(n):\n    "), ("rust", "fn main() {\n    let "),
                             ("go", "func (s *Server) ")):
            toks = enc.encode(prompt)
            n0 = len(toks)
            with torch.no_grad():
                for _ in range(args.n_predict):
                    if mole:
                        tr.set_mole_sets(model, [lang], len(toks))
                    nxt = int(torch.argmax(model(torch.as_tensor([toks]))[0, -1]))
                    if nxt == eot:
                        break
                    toks.append(nxt)
            want = enc.decode(toks[n0:])
            got, _ = run_engine(args.codemoe, args.gguf, prompt, args.n_predict, language=lang if mole else None)
            ok = got == want
            bad += not ok
            print("%s engine %s %r\n     torch  %r\n     engine %r" % ("ok  " if ok else "DIFF", lang, prompt, want, got))
    sys.exit(1 if bad else 0)


# ============================================================================ report

def fmt(v, nd=3):
    return "–" if v is None else ("%.*f" % (nd, v))


def avg(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def pooled(r, langs, key="heldout"):
    """Language-averaged bits per byte (each language weighted equally, as the paper's averages)."""
    return avg([r[key][l]["bpb"] if l in r[key] else None for l in langs])


def paired(ra, rb, langs):
    """Mean over languages of bpb(a) - bpb(b), and its standard error from the per-window differences
    (the same windows for every model: a paired comparison)."""
    diffs, var = [], 0.0
    for l in langs:
        a, b = ra["heldout"][l], rb["heldout"][l]
        nb = np.asarray(a["bytes"], dtype=np.float64)
        d = (np.asarray(a["nll"]) - np.asarray(b["nll"])) / LN2  # bits per window
        diffs.append(d.sum() / nb.sum())
        # ratio estimator's variance over windows
        k = len(d)
        resid = d - nb * (d.sum() / nb.sum())
        var += (k / max(k - 1, 1)) * float((resid ** 2).sum()) / nb.sum() ** 2
    return float(np.mean(diffs)), math.sqrt(var) / len(langs)


def table1(st, rows, key, title, note):
    out = ["**%s** %s" % (title, note), "",
           "| Model | n act-params | n params | Python | Java | C++ | Rust | Go | Ruby | Avg high | Avg low | Avg |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for l in LANGS6 + ["high", "low", "all"]:
        vals = []
        for k in rows:
            r = st[k]
            v = pooled(r, HIGH if l == "high" else LOW if l == "low" else LANGS6, key) if l in ("high", "low", "all") \
                else (r[key][l]["bpb"] if l in r[key] else None)
            if v is not None:
                vals.append(v)
        best[l] = min(vals) if vals else None
    for k in rows:
        r = st[k]
        cells = []
        for l in LANGS6 + ["high", "low", "all"]:
            v = pooled(r, HIGH if l == "high" else LOW if l == "low" else LANGS6, key) if l in ("high", "low", "all") \
                else (r[key][l]["bpb"] if l in r[key] else None)
            s = fmt(v)
            cells.append("**%s**" % s if v is not None and best[l] is not None and abs(v - best[l]) < 5e-4 else s)
        out.append("| %s | %.2fM | %.2fM | %s |" % (NAMES.get(k, k), r["active_params"] / 1e6, r["params"] / 1e6,
                                                    " | ".join(cells)))
    return out


def claims(st, tol):
    """The paper's two claims, decided from the numbers (held-out bits per byte, causal mode)."""
    lines = []
    if "moe" not in st or "base" not in st:
        return ["The claims need the `base` and `moe` stages; missing: %s." % ", ".join(
            s for s in ("base", "moe") if s not in st)]
    moe = st["moe"]
    baselines = [k for k in ("dense_cont", "lora", "mole") if k in st]
    lo_moe = pooled(moe, LOW)
    # claim 1: low-resource languages gain vs the baselines (and the base)
    wins, parts = 0, []
    for k in ["base"] + baselines:
        d, se = paired(moe, st[k], LOW)
        parts.append("%s %+.3f ± %.3f" % (NAMES[k], d, se))
        wins += d < 0
    holds1 = wins == len(baselines) + 1
    lines.append("- **Claim 1, low-resource languages gain vs the baselines: %s.** MultiPL-MoE's mean bits per "
                 "byte over Rust/Go/Ruby is %.3f; its difference to each model (negative = MultiPL-MoE better; "
                 "± one standard error over the paired held-out windows): %s. It is better than %d of the %d." % (
                     "holds" if holds1 else "does not hold", lo_moe, "; ".join(parts), wins, len(baselines) + 1))
    # claim 2: high-resource languages barely lose (vs the base), and less than continued pre-training
    hi_base, hi_moe = pooled(st["base"], HIGH), pooled(moe, HIGH)
    rel = (hi_moe - hi_base) / hi_base
    d, se = paired(moe, st["base"], HIGH)
    extra = ""
    ok_vs_dense = True
    if "dense_cont" in st:
        hi_dc = pooled(st["dense_cont"], HIGH)
        rel_dc = (hi_dc - hi_base) / hi_base
        ok_vs_dense = rel <= rel_dc
        extra = "; continued dense pre-training moves it by %+.1f%%" % (100 * rel_dc)
    holds2 = rel <= tol and ok_vs_dense
    lines.append("- **Claim 2, high-resource languages barely lose: %s.** Python/Java/C++ mean bits per byte: "
                 "base %.3f, MultiPL-MoE %.3f (%+.1f%%, paired difference %+.3f ± %.3f)%s. Criterion: a rise of at "
                 "most %.0f%% over the base and no more than the dense post-pretraining baseline's." % (
                     "holds" if holds2 else "does not hold", hi_base, hi_moe, 100 * rel, d, se, extra, 100 * tol))
    # Table 2's ablations
    for k, langs, what in (("moe_noseg", LOW, "the segment level helps low-resource languages"),
                           ("moe_noshared", HIGH, "the shared expert protects high-resource languages"),
                           ("moe_segbal", LOW, "MultiPL-MoE without a balance loss on its segment routers "
                                               "does better on low-resource languages than with one")):
        if k in st:
            d, se = paired(st[k], moe, langs)
            lines.append("- Ablation, %s: %s. %s minus MultiPL-MoE on %s: %+.3f ± %.3f bits per byte." % (
                what, "yes" if d > 0 else "no", NAMES[k], "/".join(LANG_TITLE[l] for l in langs), d, se))
    if "moe_ref" in st:
        d, se = paired(st["moe_ref"], moe, LANGS6)
        lines.append("- Segment mode: scoring MultiPL-MoE in `reference` mode instead of the `causal` mode it was "
                     "trained and is served in changes the all-language mean by %+.3f ± %.3f bits per byte." % (d, se))
    return lines


def md_code(s, lang=""):
    s = s.replace("```", "` ` `")
    return ["```" + lang, s.rstrip("\n"), "```"]


def cmd_report(args):
    E = args.eval
    L = json.load(open(os.path.join(E, "losses.json")))
    st = L["stages"]
    rows = [k for k in ["base", "dense_cont", "lora", "mole", "moe_noseg", "moe_noshared", "moe_noshared_ref",
                        "moe_segbal", "moe", "moe_ref"] if k in st]
    opt = lambda n: json.load(open(os.path.join(E, n))) if os.path.exists(os.path.join(E, n)) else None  # noqa
    R, C, S = opt("routing.json"), opt("complete.json"), opt("samples.json")
    T = []  # tools/results.sh: name <TAB> seconds <TAB> command
    if os.path.exists(os.path.join(E, "timings.tsv")):
        with open(os.path.join(E, "timings.tsv")) as fh:
            T = [l.rstrip("\n").split("\t", 2) for l in fh if l.count("\t") >= 2]
    o = ["# Results: the MultiPL-MoE experiment at small scale", "",
         "Generated by `tools/results.sh` (tools/results.py) from the stage checkpoints in `$CM_TRAIN/ckpt` "
         "and their q8_0 GGUF exports; do not edit by hand. Models, data and recipe: docs/training.md, "
         "models/README.md. Everything here runs on the CPU with one thread.", ""]
    steps = sorted(set(r["step"] for r in st.values()))
    o += ["Checkpoints: " + ", ".join("%s step %d" % (k, st[k]["step"]) for k in rows if not k.endswith("_ref")) +
          "." + (" **Some are not final (latest.pt): numbers are provisional.**" if any(
              not st[k]["ckpt"].endswith("final.pt") for k in rows) else ""), ""]
    o += ["## 1. Held-out perplexity (Table 1 and 2 of the paper, in bits per byte)", "",
          "The paper reports pass@1; a 3M-parameter model solves ~nothing, so the per-language number here is "
          "the model's cross-entropy on code it never saw, in bits per UTF-8 byte of source (the tokenizer's "
          "compression differs by language; bits per byte makes languages and models comparable). Held-out "
          "text: %d windows of %d tokens per language, evenly spaced over each language's held-out token file "
          "(the same windows for every model), bits = summed next-token NLL / ln 2, bytes = the bytes of the "
          "predicted tokens. Lower is better; **bold** = best in the column. n act-params: parameters a token's "
          "forward uses (hybrid: 1 routed + shared token expert and 1 segment expert per layer; MoLE: the base "
          "plus its language's and the shared adapter)." % (
              L["windows_per_lang"], st[rows[0]]["heldout"]["python"]["tokens"]), ""]
    o += table1(st, rows, "heldout", "Table 1a.", "Held-out code, bits per byte.")
    o.append("")
    if any(st[k]["hex"] for k in rows):
        o += table1(st, [k for k in rows if st[k]["hex"]], "hex", "Table 1b.",
                    "HumanEval-X canonical solutions given their prompts (first %d problems per language; no Ruby "
                    "in HumanEval-X, so Avg low = Rust/Go), bits per byte of the solution." % L["hex_problems"])
        o.append("")
    o += ["**Table 2.** Ablations: mean held-out bits per byte over the high-resource (\"original\": Python, "
          "Java, C++) and low-resource (\"expanded\": Rust, Go, Ruby) languages; change vs the base.", "",
          "| Model | Original (high) | Expanded (low) | Δ high vs base | Δ low vs base |", "|---|---|---|---|---|"]
    hb, lb = pooled(st["base"], HIGH), pooled(st["base"], LOW)
    for k in [k for k in ["base", "moe_noseg", "moe_noshared", "moe_noshared_ref", "moe_segbal", "moe", "moe_ref"]
              if k in st]:
        h, l = pooled(st[k], HIGH), pooled(st[k], LOW)
        o.append("| %s | %.3f | %.3f | %+.3f | %+.3f |" % (NAMES[k], h, l, h - hb, l - lb))
    o += ["", "(The paper's dual ablation, no segment level and no shared expert, was not trained here.)", "",
          "### Do the paper's claims hold here?", ""] + claims(st, args.tol) + [""]
    if R:
        o += ["## 2. Expert specialisation (Figure 3 of the paper), from codemoe's routing statistics", "",
              "`codemoe complete --routing -n 0` (the C engine's per-sequence `cm_routing` counts, prompt tokens, "
              "causal segment mode) on %d held-out chunks of at most %d tokens per language (%s tokens in all) of "
              "`%s`. Frequency = share of a language's routed token-expert selections (the shared expert e%d, "
              "which every token uses, omitted as in the paper) or of its segment-expert selections, in the "
              "first, middle and last layer. I(lang; expert): mutual information between language (uniform) "
              "and expert, in bits (0 = no specialisation; log2 6 = 2.58 would be one expert per language)." % (
                  R["chunks_per_lang"], R["max_tokens_per_chunk"], sum(R["tokens"].values()),
                  os.path.basename(R["gguf"]), R["shared"]), "", "![expert selection](results-routing.png)", ""]
        for kind in ("token", "segment"):
            for l in R["layers"]:
                d = R[kind].get(str(l))
                if not d:
                    continue
                p = "e" if kind == "token" else "s"
                o += ["**%s experts, layer %d** (I = %.3f bit)" % (kind.capitalize(), l + 1, R["mi_" + kind][str(l)]), "",
                      "| Language | " + " | ".join("%s%d" % (p, e) for e in d["experts"]) + " |",
                      "|---|" + "---|" * len(d["experts"])]
                for lang, f in zip(R["langs"], d["freq"]):
                    top = max(f)
                    o.append("| %s | %s |" % (LANG_TITLE.get(lang, lang), " | ".join(
                        ("**%.2f**" if v == top else "%.2f") % v for v in f)))
                o.append("")
        o += ["**Specialisation per layer**, I(lang; expert) in bits: the trained file against the same hybrid "
              "upcycled from the base with untrained routers (N(0, 0.02), as training starts; `codemoe upcycle`)"
              " on the same chunks. Random routers already split languages somewhat, because the base's hidden "
              "states differ by language; specialisation learnt in training is the difference.", "",
              "| Layer | token, trained | token, untrained | segment, trained | segment, untrained |",
              "|---|---|---|---|---|"]
        ini = R.get("init", {})
        for l in range(R["n_layer"]):
            k = str(l)
            o.append("| %d | %s | %s | %s | %s |" % (l + 1, fmt(R["mi_token"].get(k)), fmt(ini.get("mi_token", {}).get(k)),
                                                     fmt(R["mi_segment"].get(k)), fmt(ini.get("mi_segment", {}).get(k))))
        o.append("")
        for kind in ("token", "segment"):
            tr_ = [R["mi_" + kind][k] for k in sorted(R["mi_" + kind])]
            if not tr_:
                continue
            txt = "%s level: the largest I is %.3f bit (layer %d)" % (
                kind.capitalize(), max(tr_), 1 + int(max(R["mi_" + kind], key=R["mi_" + kind].get)))
            if ini.get("mi_" + kind):
                up = sum(R["mi_" + kind][k] > ini["mi_" + kind].get(k, 0) for k in R["mi_" + kind])
                txt += "; training raised it over the untrained routing in %d of %d layers (mean %.3f vs %.3f bit)" % (
                    up, len(tr_), np.mean(tr_), np.mean(list(ini["mi_" + kind].values())))
            o.append("- " + txt + ".")
        top = {int(k): max(np.mean(d["freq"], axis=0)) for k, d in R["segment"].items()}
        if top:
            lo_, hi_ = min(top.values()), max(top.values())
            rng_ = "%.0f%%" % (100 * lo_) if round(100 * lo_) == round(100 * hi_) else "%.0f-%.0f%%" % (100 * lo_, 100 * hi_)
            o.append("- Segment level: the most used segment expert takes %s of all segment selections in each "
                     "layer (a uniform router: %.0f%%)%s." % (
                         rng_, 100.0 / len(R["segment"][str(min(top))]["experts"]),
                         "; the segment routers have collapsed onto one expert per layer (training's "
                         "load-balancing loss covers only the routed token experts)" if lo_ > 0.8 else ""))
        if R.get("seg_gate_mean") and R.get("fusion"):
            g = np.mean(list(R["seg_gate_mean"].values()))
            o.append("- The segment level's weight in the FFN output: mean segment gate (q x gate_scale) %.4f, "
                     "times a_seg %.2f = %.4f, against a_tok %.2f for the token level (whose gates sum to 1): "
                     "the segment experts contribute ~%.1f%% of the layer's expert output." % (
                         g, R["fusion"][1], g * R["fusion"][1], R["fusion"][0],
                         100 * g * R["fusion"][1] / (g * R["fusion"][1] + R["fusion"][0])))
        o.append("")
    if C:
        names = list(C["models"])
        langs = list(C["targets"])
        o += ["## 3. Single-line completion (the C engine, greedy)", "",
              "%d held-out lines per language (seed %d: random file, random line after the first 3 with 4-120 "
              "characters), prompt = the text before the line, its last <= %d tokens from a line start; the "
              "model (q8_0 GGUF, `codemoe complete --temperature 0 -n %d`, MoLE with `--language`) completes "
              "and its output is cut at the first newline. EM = exact match, ES = edit similarity "
              "1 - Levenshtein / max length, both on the lines with surrounding whitespace stripped. With %d "
              "lines one line is %.3f of a language's EM: differences between models here are mostly noise." % (
                  C["n_per_lang"], C["seed"], C["prompt_tokens"], C["max_new_tokens"], C["n_per_lang"],
                  1.0 / C["n_per_lang"]), "",
              "| Model | " + " | ".join("%s EM / ES" % LANG_TITLE.get(l, l) for l in langs) +
              " | Avg EM | Avg ES |", "|---|" + "---|" * (len(langs) + 2)]
        for n in names:
            m = C["models"][n]["langs"]
            o.append("| %s | %s | %.2f | %.2f |" % (NAMES.get(n, n), " | ".join(
                "%.2f / %.2f" % (m[l]["em"], m[l]["es"]) for l in langs), np.mean([m[l]["em"] for l in langs]),
                np.mean([m[l]["es"] for l in langs])))
        o.append("")
    if S:
        o += ["### Samples from the shipped model (`%s`, greedy)" % os.path.basename(S["gguf"]), ""]
        for s in S["samples"]:
            tail = "\n".join(s["prompt"].rstrip("\n").split("\n")[-8:]) + "\n"
            o += ["**%s, %s.** Prompt (last lines):" % (LANG_TITLE.get(s["lang"], s["lang"]), s["source"]), ""]
            o += md_code(tail, s["lang"]) + ["", "Model output:", ""] + md_code(s["output"] or "(nothing)", s["lang"])
            o += ["", "The original continuation:", ""] + md_code(s["truth"], s["lang"]) + [""]
    o += ["## Reproduce", "",
          "    tools/results.sh     # env: CM_TRAIN (training directory), CM_EVAL ($CM_TRAIN/eval), CM_BUILD (build-eval),",
          "                         #      CM_SHIP (moe: the model the samples come from), CM_LATEST=1 (use latest.pt)",
          "    tools/results.sh --render-only   # rebuild this file and the model card's table from docs/results.json",
          "",
          "It exports every stage to q8_0 GGUF where `$CM_TRAIN/gguf/<stage>.gguf` is missing or older than the "
          "checkpoint (into `$CM_EVAL/gguf`), then runs the steps below; tools/results.py's docstring lists "
          "the subcommands. `tools/results.py selfcheck` checks the scoring code against train.py and "
          "reference_moe (and, with `--gguf`, the engine against PyTorch).", ""]
    if T:
        o += ["Steps and their running times (2 shared cores; torch and codemoe on 1 thread):", "", "| step | seconds | command |", "|---|---|---|"]
        for name, sec, cmd in T:
            o.append("| %s | %s | `%s` |" % (name, sec, cmd.replace("|", "\\|")))
        o += ["| **total** | **%d** | |" % sum(int(float(t[1])) for t in T), ""]
    doc = {"report": md_parse("\n".join(o)), "card": md_parse("\n".join(card_table(st, C, rows)))[0]}
    write_doc(doc, args.out, args.numbers or os.path.splitext(args.out)[0] + ".json", args.card)


def card_table(st, C, rows):
    """The model card's headline table (markdown lines)."""
    o = ["| Model | n params | tokens trained (this stage) | held-out bits/byte, Python/Java/C++ | Rust/Go/Ruby | all |"
         + (" line EM / ES |" if C else ""), "|---|---|---|---|---|---|" + ("---|" if C else "")]
    for k in [k for k in rows if not k.endswith("_ref")]:
        r = st[k]
        cm = C["models"].get(k) if C else None
        ce = ""
        if C:
            ce = " %.2f / %.2f |" % (np.mean([v["em"] for v in cm["langs"].values()]),
                                     np.mean([v["es"] for v in cm["langs"].values()])) if cm else " – |"
        m = r.get("meta", {})
        ntok = "%.2fM" % (r["step"] * m["batch"] * m["ctx"] / 1e6) if m.get("batch") and m.get("ctx") else "?"
        o.append("| %s | %.2fM | %s | %.3f | %.3f | %.3f |%s" % (NAMES.get(k, k), r["params"] / 1e6, ntok,
                                                                 pooled(r, HIGH), pooled(r, LOW), pooled(r, LANGS6), ce))
    return o


# ============================================================================ the report as data
#
# A report document is {"report": [block, ...], "card": table block}. Blocks, in the order they appear:
#   {"text": "..."}                       a paragraph or heading (its lines joined by newlines)
#   {"table": {"header": [...], "align": [...], "rows": [[...], ...]}}   cells as printed
#   {"code": "...", "lang": "python"}     a fenced code block
# Blocks are separated by one blank line. md_parse and md_render are each other's inverse on the
# markdown report writes (selftest holds them so).

CARD_BEGIN, CARD_END = "<!-- results:begin (tools/results.py report) -->", "<!-- results:end -->"
CELL_SPLIT = re.compile(r"(?<!\\)\|")


def md_cells(line):
    """Cells of a markdown table row; an escaped pipe (\\|) stays inside its cell."""
    return [c.strip() for c in CELL_SPLIT.split(line.strip())[1:-1]]


def md_parse(text):
    """Markdown (as report writes it) -> blocks."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            j = i + 1
            while j < len(lines) and lines[j] != "```":
                j += 1
            if j == len(lines):
                raise ValueError("line %d: code block without its closing fence" % (i + 1))
            blocks.append({"code": "\n".join(lines[i + 1:j]), "lang": line[3:]})
            i = j + 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            if j - i < 2:
                raise ValueError("line %d: a table needs a header and an alignment row" % (i + 1))
            blocks.append({"table": {"header": md_cells(lines[i]), "align": md_cells(lines[i + 1]),
                                     "rows": [md_cells(l) for l in lines[i + 2:j]]}})
            i = j
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not lines[j].startswith(("|", "```")):
                j += 1
            blocks.append({"text": "\n".join(lines[i:j])})
            i = j
    return blocks


def md_render(blocks):
    """Blocks -> markdown; the inverse of md_parse."""
    out = []
    for b in blocks:
        if "text" in b:
            out.append(b["text"])
        elif "code" in b:
            out.append("```%s\n%s\n```" % (b.get("lang", ""), b["code"]))
        else:
            t = b["table"]
            row = lambda cells: "|" + "|".join(" %s " % c if c else " " for c in cells) + "|"  # noqa: E731
            out.append("\n".join([row(t["header"]), "|" + "|".join(t["align"]) + "|"] + [row(r) for r in t["rows"]]))
    return "\n\n".join(out) + "\n"


def card_block(table):
    """The model card's generated block, markers included."""
    return "\n".join([CARD_BEGIN, "", md_render([table]).rstrip("\n"), "",
                      "Full tables, expert specialisation and samples: [docs/results.md](../docs/results.md).", "",
                      CARD_END])


def write_doc(doc, out, numbers, card):
    """Write the report (markdown), its numbers (JSON, when given) and the model card's block (when the
    card has the markers)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(md_render(doc["report"]))
    if numbers:
        with open(numbers, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
    if card and os.path.exists(card):
        text = open(card, encoding="utf-8").read()
        if CARD_BEGIN in text and CARD_END in text:
            text = text[:text.index(CARD_BEGIN)] + card_block(doc["card"]) + text[text.index(CARD_END) + len(CARD_END):]
            with open(card, "w", encoding="utf-8") as fh:
                fh.write(text)


def cmd_render(args):
    """results.md (and the card's block) from the committed numbers alone."""
    with open(args.numbers, encoding="utf-8") as fh:
        doc = json.load(fh)
    write_doc(doc, args.out, None, args.card)


def cmd_selftest(args):
    """1. md_parse/md_render round trip on every block kind; 2. the committed numbers render to the
    committed results.md and the card's block (a hand edit of either, or a stale JSON, fails here)."""
    bad = 0
    sample = "\n".join(["# Title", "", "A paragraph", "on two lines.", "", "| a | b \\| c |", "|---|---:|",
                        "| **1.000** | `x \\| y` |", "| | 2 |", "", "```python", "def f():", "", "", "    return 1", "```", "",
                        "    indented code", "    block", "", "![img](x.png)", ""])
    blocks = md_parse(sample)
    kinds = [next(iter(b)) for b in blocks]
    for what, ok in (("round trip", md_render(blocks) == sample),
                     ("block kinds", kinds == ["text", "text", "table", "code", "text", "text"]),
                     ("escaped pipe stays in its cell", blocks[2]["table"]["rows"] == [["**1.000**", "`x \\| y`"], ["", "2"]]),
                     ("code keeps blank lines", blocks[3]["code"] == "def f():\n\n\n    return 1"),
                     ("unclosed fence refused", _raises(lambda: md_parse("```\nx")))):
        bad += not ok
        print("%s %s" % ("ok  " if ok else "FAIL", what))
    numbers = os.path.join(REPO, "docs", "results.json")
    with open(numbers, encoding="utf-8") as fh:
        doc = json.load(fh)
    with open(os.path.join(REPO, "docs", "results.md"), encoding="utf-8") as fh:
        ok = md_render(doc["report"]) == fh.read()
    bad += not ok
    print("%s docs/results.json renders to docs/results.md (else: tools/results.sh --render-only)" % (
        "ok  " if ok else "FAIL"))
    with open(os.path.join(REPO, "models", "README.md"), encoding="utf-8") as fh:
        ok = card_block(doc["card"]) in fh.read()
    bad += not ok
    print("%s docs/results.json's card table is models/README.md's results block" % ("ok  " if ok else "FAIL"))
    sys.exit(1 if bad else 0)


def _raises(f):
    try:
        f()
    except ValueError:
        return True
    return False


# ============================================================================ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    root = tr.ROOT
    for name in ("losses", "routing", "complete", "samples", "report", "render", "selfcheck", "selftest"):
        p = sub.add_parser(name)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--tokenizer", default=os.path.join(root, "tokenizer"))
        p.add_argument("--corpus", default=os.path.join(root, "corpus"))
        p.add_argument("--codemoe", default=default_codemoe())
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--langs", default=",".join(LANGS6))
        p.add_argument("--out", default=None)
        p.add_argument("--latest", action="store_true", help="use latest.pt where there is no final.pt")
        if name in ("losses", "selfcheck"):
            p.add_argument("--stages", default=",".join(STAGES))
        if name == "losses":
            p.add_argument("--windows", type=int, default=40, help="held-out windows of ctx tokens per language")
            p.add_argument("--hex", type=int, default=32, help="HumanEval-X problems per language (0: none)")
            p.add_argument("--batch", type=int, default=8)
        if name == "routing":
            p.add_argument("--gguf", required=True)
            p.add_argument("--png", default=None)
            p.add_argument("--chunks", type=int, default=40)
            p.add_argument("--tokens", type=int, default=256)
            p.add_argument("--init-from", default=None, help="dense base GGUF: also measure the routing of "
                           "the same hybrid upcycled with untrained routers (codemoe upcycle), for comparison")
        if name == "complete":
            p.add_argument("--models", required=True, help="name=path.gguf,...")
            p.add_argument("--n", type=int, default=40)
            p.add_argument("--prompt-tokens", type=int, default=200)
            p.add_argument("--n-predict", type=int, default=48)
        if name == "samples":
            p.add_argument("--gguf", required=True)
            p.add_argument("--prompt-tokens", type=int, default=200)
            p.add_argument("--n-predict", type=int, default=64)
        if name == "report":
            p.add_argument("--eval", required=True)
            p.add_argument("--numbers", default=None, help="the report's JSON (default: --out with .json)")
        if name == "render":
            p.add_argument("--numbers", default=os.path.join(REPO, "docs", "results.json"))
        if name in ("report", "render"):
            p.add_argument("--card", default=None)
        if name == "report":
            p.add_argument("--tol", type=float, default=0.02, help="claim 2: largest relative rise that is "
                           "'barely' losing")
        if name == "selfcheck":
            p.add_argument("--gguf", default=None)
            p.add_argument("--stage", default="base")
            p.add_argument("--n-predict", type=int, default=16)
    args = ap.parse_args()
    if args.cmd in ("losses", "routing", "complete", "samples", "report", "render") and not args.out:
        ap.error("--out is required")
    torch.set_num_threads(args.threads)
    {"losses": cmd_losses, "routing": cmd_routing, "complete": cmd_complete, "samples": cmd_samples,
     "report": cmd_report, "render": cmd_render, "selfcheck": cmd_selfcheck, "selftest": cmd_selftest}[args.cmd](args)


if __name__ == "__main__":
    main()
