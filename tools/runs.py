"""runs.py - the lowres experiment's run plan as code (docs/training.md): what to train, in which order,
and what each finished run measured. Resumable across sittings: every finished run leaves a small JSON in
models/runs/<exp>/<run>.json (committed), so the runner skips it; an unfinished run resumes from its
$CM_TRAIN/<exp>/ckpt/<run>/latest.pt (tools/train.py).

    /usr/bin/python3 tools/runs.py plan                 # the plan, and which runs are done
    /usr/bin/python3 tools/runs.py run [--stop-at HH:MM] [--max-runs N] [--only RUN,...]
    /usr/bin/python3 tools/runs.py report [--out F.md] [--curves F.png] [--routing F.png]
    /usr/bin/python3 tools/runs.py selftest             # the plan and the claim rules (no data; test suite)

The plan, in order (tiers): 1. a short learning-rate sweep per method (seed 1, a quarter of the budget;
the chosen rate is the lowest mean held-out loss on the trained packages' held-out files), 2. three seeds
of every method at its chosen rate with the full post-pretraining budget, 3. options (mean pooling,
previous-window routing, no segment balancing), one seed. Methods: dense_cont, lora, mole, moe (MultiPL-MoE)
and its two main ablations moe_noseg (no segment level) and moe_noshared (no shared expert).

A run's JSON: its settings, trainable and total parameters, forward FLOPs per token, the step-0 check
(held-out loss of the upcycled model == the base's), the learning curve (held-out loss every 10% of the
budget), and at the end, per language: held-out bits per byte on the trained packages' held-out files
("heldout") and on packages never trained on ("heldout_ext"); for hybrids the segment branch's share of the
FFN output norm, the loss with the segment branch knocked out, the learned fusion weights and the segment
experts' token shares per language (the routing picture).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as tr  # noqa: E402  (experiment from $CM_EXP, default lowres)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

LANGS6 = tr.LANGS[:6]
METHODS = ["dense_cont", "lora", "mole", "moe", "moe_noseg", "moe_noshared"]
OPTIONS = ["moe_mean", "moe_prev", "moe_nobal"]
SWEEP = {"dense_cont": [2e-4, 5e-4, 1e-3], "lora": [5e-4, 1e-3, 2e-3], "mole": [5e-4, 1e-3, 2e-3],
         "moe": [2.5e-4, 5e-4, 1e-3], "moe_noseg": [2.5e-4, 5e-4, 1e-3], "moe_noshared": [2.5e-4, 5e-4, 1e-3]}
SEEDS = [1, 2, 3]
POST_TOKENS = int(os.environ.get("CM_POST_TOKENS", "500000"))
SWEEP_FRACTION = 0.25
EVAL_WINDOWS = 32  # held-out windows of ctx tokens per language and split, at the end of a run


def runs_dir():
    return os.path.join(tr.REPO, "models", "runs", tr.EXP)


def run_name(stage, seed, lr, tokens):
    return "%s-s%d-lr%g-t%dk" % (stage, seed, lr, tokens // 1000)


def result(run):
    p = os.path.join(runs_dir(), run + ".json")
    if not os.path.exists(p):
        return None
    with open(p) as fh:
        return json.load(fh)


def chosen_lr(stage, results=None):
    """The sweep's winner for a method (None until all its sweep runs are done): lowest mean held-out loss
    over the six languages on the trained packages' held-out files (heldout_ext stays for the report)."""
    best = None
    for lr in SWEEP[stage]:
        r = (results or {}).get(run_name(stage, 1, lr, int(POST_TOKENS * SWEEP_FRACTION))) if results is not None \
            else result(run_name(stage, 1, lr, int(POST_TOKENS * SWEEP_FRACTION)))
        if r is None:
            return None
        v = float(np.mean([r["final"]["heldout"]["loss"][l] for l in LANGS6]))
        if best is None or v < best[0]:
            best = (v, lr)
    return best[1]


def plan(results=None):
    """The runs in order; tier 2/3 runs need the sweep's chosen rate and appear once it is known (until then
    with lr None)."""
    out = []
    st = int(POST_TOKENS * SWEEP_FRACTION)
    for stage in METHODS:
        for lr in SWEEP[stage]:
            out.append({"tier": 1, "stage": stage, "seed": 1, "lr": lr, "tokens": st,
                        "run": run_name(stage, 1, lr, st)})
    for tier, stages, seeds in ((2, METHODS, SEEDS), (3, OPTIONS, SEEDS[:1])):
        for stage in stages:
            lr = chosen_lr("moe" if stage in OPTIONS else stage, results)
            for seed in seeds:
                out.append({"tier": tier, "stage": stage, "seed": seed, "lr": lr, "tokens": POST_TOKENS,
                            "run": run_name(stage, seed, lr, POST_TOKENS) if lr else None})
    return out


# ============================================================================ measures

def param_counts(model, stage):
    """(trainable, total). The shared token expert is frozen (its gradient is zeroed), so not trainable."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for layer in model.model.layers:
        moe = getattr(layer, "moe", None)
        if moe is not None and moe.hp["shared"] >= 0:
            train -= sum(getattr(moe, n)[moe.hp["shared"]].numel() for n in ("tok_gate", "tok_up", "tok_down"))
    return train, total


def flops_per_token(cfg, stage, hp, ctx):
    """Forward FLOPs (2 x multiply-adds) per token at the mean position of a ctx-token window, as trained
    (LoRA adapters unmerged; MoLE: the language's and the shared adapter)."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H, K, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    att = D * H * E * 2 + D * K * E * 2 + 2 * (ctx / 2) * H * E
    ffn = 3 * D * F
    if stage.startswith("moe"):
        n_tok = hp["k_used"]
        ffn = D * hp["n_tok"] + n_tok * 3 * D * F
        if hp["n_seg"]:
            ffn += D * hp["n_seg"] + 3 * D * F
    elif stage == "lora":
        r = 8
        att += r * ((D + H * E) * 2 + (D + K * E) * 2)
        ffn += r * 3 * (D + F)
    elif stage == "mole":
        ffn += (8 + 16) * 3 * (D + F)
    return 2 * (L * (att + ffn) + D * V)


@torch.no_grad()
def measure(model, stage, split, tb, n):
    """Per language: loss (nats/token), bits per byte, and for hybrids the segment branch's share of the FFN
    output norm, the loss with the segment branch knocked out, and the segment experts' token shares."""
    hb = tr.heldout_batches(LANGS6, model.train_ctx, n, split=split)
    out = {"loss": {}, "bpb": {}}
    hyb = [l.moe for l in model.model.layers if hasattr(l, "moe") and l.moe.hp["n_seg"]]
    if hyb:
        out.update(seg_share={}, knockout_loss={}, knockout_bpb={}, seg_routing={})
    for lang, (x, y) in hb.items():
        nb = float(tb[y.numpy()].sum())
        for ko in ((False, True) if hyb else (False,)):
            for m in hyb:
                m.knockout = ko
            tot, shares, counts = 0.0, [], [np.zeros(m.hp["n_seg"]) for m in hyb]
            for i in range(0, len(x), 8):
                if stage == "mole":
                    tr.set_mole_sets(model, [lang] * len(x[i:i + 8]), x.shape[1])
                lg = model(x[i:i + 8])
                tot += float(Fn.cross_entropy(lg.reshape(-1, lg.shape[-1]), y[i:i + 8].reshape(-1), reduction="sum"))
                if hyb and not ko:
                    shares.append([float(m.seg_share) if m.seg_share is not None else 0.0 for m in hyb])
                    for k, m in enumerate(hyb):
                        counts[k] += m.seg_counts
            loss = tot / y.numel()
            if ko:
                out["knockout_loss"][lang] = round(loss, 5)
                out["knockout_bpb"][lang] = round(tot / math.log(2) / nb, 5)
            else:
                out["loss"][lang] = round(loss, 5)
                out["bpb"][lang] = round(tot / math.log(2) / nb, 5)
                if hyb:
                    out["seg_share"][lang] = [round(v, 5) for v in np.mean(shares, axis=0)]
                    out["seg_routing"][lang] = [[round(float(v), 5) for v in c / max(1.0, c.sum())] for c in counts]
        for m in hyb:
            m.knockout = False
    return out


def curve(run):
    """The run's learning curve from its log: (step, held-out losses) every evaluation."""
    p = os.path.join(tr.EXP_ROOT, "logs", run + ".jsonl")
    pts = []
    if os.path.exists(p):
        with open(p) as fh:
            for line in fh:
                r = json.loads(line)
                if "heldout" in r:  # a resumed run logs the steps after its last checkpoint again: keep the last
                    pts = [p for p in pts if p["step"] != r["step"]]
                    pts.append({"step": r["step"], "heldout": r["heldout"], "heldout_ext": r.get("heldout_ext")})
    return pts


def evaluate_run(spec, tb):
    model, ck = tr.load_model(spec["run"])
    meta = ck["meta"]
    model.train_ctx = meta["ctx"]
    model.eval()
    trainable, total = param_counts(model, spec["stage"])
    res = dict(spec, exp=tr.EXP, step=ck["step"], params_trainable=trainable, params_total=total,
               flops_per_token=flops_per_token(model.cfg, spec["stage"], meta.get("moe"), meta["ctx"]),
               start=meta.get("start"), curve=curve(spec["run"]), hp=meta.get("moe"),
               final={s: measure(model, spec["stage"], s, tb, EVAL_WINDOWS) for s in tr.SPLITS_HELDOUT})
    if meta.get("moe", {}).get("fusion_learn"):
        res["fusion"] = [[round(float(v), 5) for v in l.moe.fusion] for l in model.model.layers]
    return res


# ============================================================================ commands

def cmd_plan(args):
    res = load_results()
    for s in plan(res):
        done = s["run"] in res if s["run"] else False
        print("tier %d  %-13s seed %d  lr %-8s %7d tokens  %s" % (
            s["tier"], s["stage"], s["seed"], s["lr"] if s["lr"] else "(sweep)", s["tokens"],
            ("done " if done else "todo ") + (s["run"] or "")))


def load_results():
    out = {}
    d = runs_dir()
    if os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            if f.endswith(".json"):
                with open(os.path.join(d, f)) as fh:
                    r = json.load(fh)
                out[r["run"]] = r
    return out


def untrained(tb):
    """The routing picture's untrained panel: moe upcycled from the base with seed 1's routers, measured
    before any step (its bits per byte are the base's: the step-0 check)."""
    torch.manual_seed(1)
    model, ck = tr.load_model("base")
    tr.build_variant(model, "moe", ck["meta"]["ctx"], None)
    model.train_ctx = ck["meta"]["ctx"]
    model.eval()
    return {"run": "moe-untrained", "stage": "moe", "seed": 1, "lr": 0.0, "tokens": 0, "tier": 0,
            "exp": tr.EXP, "final": {"heldout_ext": measure(model, "moe", "heldout_ext", tb, EVAL_WINDOWS)}}


SHIPPED = os.path.join(tr.REPO, "models", "codemoe-hybrid-16m.gguf")


def shipped(tb, path=SHIPPED):
    """Today's default model (the v1 run's moe stage, its Q8_0 weights as the engine reads them) measured on
    the same held-out windows as every run, for the default-model decision. Its fixed fusion (0.7 / 0.3),
    segment gate 1 / window and causal prefix routing are the v1 hybrid's (tools/train.py, exp v1); the file's
    keys are checked against them, so the measured model is the file."""
    ctx = 256
    model = tr.LM(tr.make_config(tr.DEFAULT_ARCH))
    hp = tr.moe_params("moe", ctx, "v1")
    tr.build_variant(model, "moe", ctx, None, hp)
    r, a, back = tr.gguf_state(path, model.cfg)
    want = {"segment.window": hp["window"], "segment.gate_scale": hp["gate_scale"], "fusion.token": hp["a_tok"],
            "fusion.segment": hp["a_seg"], "expert_count": hp["n_tok"], "segment.expert_count": hp["n_seg"],
            "segment.pooling": hp["pooling"], "embedding_length": model.cfg.hidden_size,
            "block_count": model.cfg.num_hidden_layers}
    for k, v in want.items():
        got = r.get(a + "." + k)
        if (abs(float(got) - float(v)) > 1e-6) if isinstance(v, float) else got != v:
            sys.exit("runs.py: %s: %s.%s is %r, the v1 hybrid has %r" % (path, a, k, got, v))
    model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in back.items()})
    model.train_ctx = ctx
    model.eval()
    return {"run": "shipped", "stage": "moe", "seed": 0, "lr": 0.0, "tokens": 0, "tier": 0, "exp": "v1",
            "file": os.path.relpath(path, tr.REPO), "params_total": sum(p.numel() for p in model.parameters()),
            "final": {sp: measure(model, "moe", sp, tb, EVAL_WINDOWS) for sp in tr.SPLITS_HELDOUT}}


def write_result(r):
    os.makedirs(runs_dir(), exist_ok=True)
    p = os.path.join(runs_dir(), r["run"] + ".json")
    with open(p + ".tmp", "w") as fh:
        json.dump(r, fh, indent=1)
    os.replace(p + ".tmp", p)


def cmd_run(args):
    base_final = os.path.join(tr.ckpt_dir("base"), "final.pt")
    if not os.path.exists(base_final):
        sys.exit("runs.py: the %s base is not finished (%s missing): tools/pipeline.sh base" % (tr.EXP, base_final))
    import results
    torch.set_num_threads(1)  # the measurements too: one core, like the training runs
    tb = results.token_bytes(results.encoder(args.tokenizer))
    if "moe-untrained" not in load_results():
        write_result(untrained(tb))
    if "shipped" not in load_results():
        write_result(shipped(tb))
    n = 0
    only = set(args.only.split(",")) if args.only else None
    while True:
        todo = [s for s in plan(load_results()) if s["run"] and s["run"] not in load_results()
                and (only is None or s["run"] in only)]
        if not todo or (args.max_runs and n >= args.max_runs):
            break
        if args.stop_at and time.strftime("%H:%M", time.gmtime()) >= args.stop_at:
            print("runs.py: %s UTC reached, no new run started" % args.stop_at, file=sys.stderr)
            break
        s = todo[0]
        print("== %s (%s UTC)" % (s["run"], time.strftime("%H:%M:%S", time.gmtime())), file=sys.stderr)
        train_run(s)
        write_result(evaluate_run(s, tb))
        n += 1
    if args.recurve:
        recurve(args, tb, only, n)


def train_run(s):
    cmd = ["nice", "-n", "19", "/usr/bin/python3", os.path.join(tr.REPO, "tools", "train.py"), "train",
           "--stage", s["stage"], "--run", s["run"], "--seed", str(s["seed"]), "--lr", str(s["lr"]),
           "--tokens", str(s["tokens"]), "--threads", "1", "--ckpt-min", "5"]
    if subprocess.run(cmd, env=dict(os.environ, CM_EXP=tr.EXP)).returncode:
        sys.exit("runs.py: %s failed" % s["run"])


def recurve(args, tb, only, n):
    """Runs finished before held-out loss was measured every 10% of the budget have 3 points on their curve.
    Re-train them from scratch (same seed, data order and rate) for the full curve; the run's final numbers
    must come out the same (training is deterministic on one thread), and the largest difference is recorded
    in the JSON ("rerun"). Resumable: a marker in the run's checkpoint directory says a re-run is under way."""
    import shutil
    while not (args.max_runs and n >= args.max_runs):
        res = load_results()
        todo = [s for s in plan(res) if s["run"] in res and s["tier"] >= 2 and (only is None or s["run"] in only)
                and len([p for p in res[s["run"]].get("curve", []) if p.get("heldout_ext")]) < 10]
        if not todo or (args.stop_at and time.strftime("%H:%M", time.gmtime()) >= args.stop_at):
            return
        s = todo[0]
        d = tr.ckpt_dir(s["run"])
        marker = os.path.join(d, "recurve")
        if not os.path.exists(marker):
            shutil.rmtree(d, ignore_errors=True)
            log = os.path.join(tr.EXP_ROOT, "logs", s["run"] + ".jsonl")
            if os.path.exists(log):
                os.remove(log)
            os.makedirs(d)
            open(marker, "w").close()
        print("== %s, again for its curve (%s UTC)" % (s["run"], time.strftime("%H:%M:%S", time.gmtime())),
              file=sys.stderr)
        train_run(s)
        r = evaluate_run(s, tb)
        old = res[s["run"]]["final"]
        r["rerun"] = {"max_final_bpb_diff": max(abs(r["final"][sp]["bpb"][l] - old[sp]["bpb"][l])
                                                for sp in tr.SPLITS_HELDOUT for l in LANGS6)}
        print("runs.py: %s re-run, final bits per byte differ by at most %.2e" % (
            s["run"], r["rerun"]["max_final_bpb_diff"]), file=sys.stderr)
        write_result(r)
        os.remove(marker)
        n += 1


def claim(diffs):
    """diffs: per seed, (method - comparison) in bits per byte (negative: the method is better).
    holds: every seed favours the method and the mean gain exceeds the seeds' spread (max - min);
    does not hold: every seed favours the comparison by more than the spread; otherwise: cannot be
    told apart at this scale."""
    d = np.asarray(diffs, dtype=np.float64)
    spread = float(d.max() - d.min()) if len(d) > 1 else float("inf")
    mean = float(d.mean())
    if len(d) >= 2 and (d < 0).all() and -mean > spread:
        v = "holds"
    elif len(d) >= 2 and (d > 0).all() and mean > spread:
        v = "does not hold"
    else:
        v = "cannot be told apart"
    return {"verdict": v, "mean": round(mean, 5), "spread": round(spread, 5), "per_seed": [round(x, 5) for x in d]}


CLAIMS = [("MultiPL-MoE beats dense continued training on the low-resource languages", "moe", "dense_cont", tr.LOW),
          ("MultiPL-MoE beats LoRA on the low-resource languages", "moe", "lora", tr.LOW),
          ("MultiPL-MoE beats MoLE on the low-resource languages", "moe", "mole", tr.LOW),
          ("the segment level helps the low-resource languages (moe vs moe_noseg)", "moe", "moe_noseg", tr.LOW),
          ("the shared expert keeps the high-resource languages (moe vs moe_noshared)", "moe", "moe_noshared",
           tr.HIGH)]


def seed_runs(res, stage):
    lr = chosen_lr(stage, res)
    return {s: res.get(run_name(stage, s, lr, POST_TOKENS)) for s in SEEDS} if lr else {}


REPORT_CMD = ("tools/runs.py report --out docs/experiment.md --curves docs/experiment-curves.png "
              "--routing docs/experiment-routing.png")


def group_bpb(r, split, langs, key="bpb"):
    return float(np.mean([r["final"][split][key][l] for l in langs]))


def spread_cell(vals, fmt="%.3f"):
    """mean [min, max] of a method's seeds (one seed: the value)."""
    if len(vals) == 1:
        return fmt % vals[0]
    return (fmt + " [" + fmt + ", " + fmt + "]") % (np.mean(vals), min(vals), max(vals))


def method_runs(res, stage):
    """The full-budget runs of a method (its seeds) or option (one seed)."""
    return sorted((r for r in res.values() if r["stage"] == stage and r["tier"] >= 2), key=lambda r: r["seed"])


def report_text(res):
    """docs/experiment.md from the committed run results alone (no data, no model): runs.py selftest checks
    that the committed file is this function's output."""
    lines = ["# The MultiPL-MoE experiment, re-run at small scale (lowres)", "",
             "Generated from `models/runs/lowres/*.json` by `%s`; the set-up (data, upcycling, routing, run plan, "
             "claim rules) is in [training.md](training.md), \"The lowres experiment\". Bits per byte (bpb) on "
             "held-out files: lower is better. \"Other packages\" are Debian packages no training split used "
             "(the claims are judged there); \"same packages\" are held-out files of the training packages." % REPORT_CMD,
             ""]
    full = [r for r in res.values() if r["tier"] >= 2]
    if not full:
        return "\n".join(lines + ["No full-budget run has finished yet.", ""])
    lines += ["## Claims", "",
              "Paired by seed: method minus comparison, `heldout_ext` bits per byte averaged over the claim's "
              "languages (negative: the method is better). **Holds** when every seed favours the method and the "
              "mean gain exceeds the seeds' spread (max - min); **does not hold** when every seed favours the "
              "comparison by more than the spread; otherwise **cannot be told apart at this scale**.", ""]
    for text, a, b, langs in CLAIMS:
        ra, rb = seed_runs(res, a), seed_runs(res, b)
        seeds = [s for s in SEEDS if ra.get(s) and rb.get(s)]
        if len(seeds) < 2:
            lines.append("- %s: not run yet (%d paired seeds)" % (text, len(seeds)))
            continue
        c = claim([np.mean([ra[s]["final"]["heldout_ext"]["bpb"][l] - rb[s]["final"]["heldout_ext"]["bpb"][l]
                            for l in langs]) for s in seeds])
        lines.append("- %s: **%s** (mean %+.4f bits/byte, seed spread %.4f, per seed %s)" % (
            text, c["verdict"], c["mean"], c["spread"], ", ".join("%+.4f" % v for v in c["per_seed"])))
    lines += ["", "## Per method (full budget: %dk tokens; mean [min, max] over seeds)" % (POST_TOKENS // 1000), "",
              "| method | lr | seeds | trainable / total params | FLOPs / token | other packages: Rust/Go/Ruby "
              "| other packages: Python/Java/C++ | same packages: Rust/Go/Ruby | same packages: Python/Java/C++ |",
              "|---|---|---|---|---|---|---|---|---|"]
    for st in METHODS + OPTIONS:
        rs = method_runs(res, st)
        if not rs:
            continue
        lines.append("| %s | %g | %s | %.2fM / %.2fM | %.2fM | %s | %s | %s | %s |" % (
            st, rs[0]["lr"], ",".join(str(r["seed"]) for r in rs), rs[0]["params_trainable"] / 1e6,
            rs[0]["params_total"] / 1e6, rs[0]["flops_per_token"] / 1e6,
            *[spread_cell([group_bpb(r, sp, g) for r in rs]) for sp in ("heldout_ext", "heldout")
              for g in (tr.LOW, tr.HIGH)]))
    sh = res.get("shipped")
    if sh:
        lines.append("| shipped default (v1 moe, Q8_0) | - | - | - / %.2fM | - | %s |" % (
            sh["params_total"] / 1e6, " | ".join("%.3f" % group_bpb(sh, sp, g) for sp in ("heldout_ext", "heldout")
                                                 for g in (tr.LOW, tr.HIGH))))
    lines += ["", "Per language, other packages (mean over seeds):", "",
              "| method | " + " | ".join(LANGS6) + " |", "|---|" + "---|" * len(LANGS6)]
    for st in METHODS + OPTIONS:
        rs = method_runs(res, st)
        if rs:
            lines.append("| %s | %s |" % (st, " | ".join(
                "%.3f" % np.mean([r["final"]["heldout_ext"]["bpb"][l] for r in rs]) for l in LANGS6)))
    if sh:
        lines.append("| shipped default | %s |" % " | ".join("%.3f" % sh["final"]["heldout_ext"]["bpb"][l]
                                                           for l in LANGS6))
    hyb = [st for st in METHODS + OPTIONS if any("seg_share" in r["final"]["heldout_ext"] for r in method_runs(res, st))]
    if hyb:
        lines += ["", "## The segment level", "",
                  "Share of the FFN output norm the segment branch carries (mean over layers and the "
                  "low-resource languages, other packages), and the change in bits per byte when the segment "
                  "branch is switched off at evaluation (knock-out; positive: the branch helped).", "",
                  "| method | segment share | knock-out: Rust/Go/Ruby | knock-out: Python/Java/C++ | learned fusion "
                  "(a_tok, a_seg) per layer, seed %d |" % SEEDS[0], "|---|---|---|---|---|"]
        for st in hyb:
            rs = [r for r in method_runs(res, st) if "seg_share" in r["final"]["heldout_ext"]]
            x = lambda r: r["final"]["heldout_ext"]  # noqa: E731
            fu = rs[0].get("fusion")
            lines.append("| %s | %s | %s | %s | %s |" % (
                st, spread_cell([float(np.mean([x(r)["seg_share"][l] for l in tr.LOW])) for r in rs], "%.4f"),
                spread_cell([group_bpb(r, "heldout_ext", tr.LOW, "knockout_bpb") - group_bpb(r, "heldout_ext", tr.LOW)
                             for r in rs], "%+.4f"),
                spread_cell([group_bpb(r, "heldout_ext", tr.HIGH, "knockout_bpb") - group_bpb(r, "heldout_ext", tr.HIGH)
                             for r in rs], "%+.4f"),
                " ".join("(%.2f, %.2f)" % tuple(f) for f in fu) if fu else "-"))
        lines += ["", "Per language, other packages (mean over seeds): the knock-out's change in bits per byte, "
                  "and in brackets the segment branch's share of the FFN output norm.", "",
                  "| method | %s |" % " | ".join(LANGS6), "|---|%s" % ("---|" * len(LANGS6))]
        for st in hyb:
            rs = [r["final"]["heldout_ext"] for r in method_runs(res, st) if "seg_share" in r["final"]["heldout_ext"]]
            lines.append("| %s | %s |" % (st, " | ".join(
                "%+.4f (%.3f)" % (np.mean([x["knockout_bpb"][l] - x["bpb"][l] for x in rs]),
                                  np.mean([x["seg_share"][l] for x in rs])) for l in LANGS6)))
    lines += ["", "## The default model", "",
              "The best full-budget run replaces the shipped default only if it beats it on the other packages "
              "(mean bits per byte over the six languages).", ""]
    lines += default_model(res)
    lines += ["", "## Learning curves", "",
              "Held-out loss on the other packages from the step-0 check on (every 10% of the budget).", "",
              "![learning curves](experiment-curves.png)", "",
              "## Routing", "",
              "Token shares of the segment experts per language, last layer: the untrained router and every "
              "full-budget hybrid at seed 1.", "", "![segment routing](experiment-routing.png)", "",
              "## Every run", "",
              "| run | trainable / total params | FLOPs/token | step-0 max diff | same packages bpb low / high "
              "| other packages bpb low / high | segment share, low | knock-out: bpb change, low / high |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(res.values(), key=lambda r: r["run"]):
        if r["tier"] == 0:
            continue
        f = r["final"]
        x = f["heldout_ext"]
        seg = "%.4f" % np.mean([x["seg_share"][l] for l in tr.LOW]) if "seg_share" in x else "-"
        ko = "%+.4f / %+.4f" % tuple(np.mean([x["knockout_bpb"][l] - x["bpb"][l] for l in g])
                                     for g in (tr.LOW, tr.HIGH)) if "knockout_bpb" in x else "-"
        lines.append("| %s | %.3fM / %.3fM | %.2fM | %s | %.3f / %.3f | %.3f / %.3f | %s | %s |" % (
            r["run"], r["params_trainable"] / 1e6, r["params_total"] / 1e6, r["flops_per_token"] / 1e6,
            "%.1e" % r["start"]["max_abs_diff"] if r.get("start") else "-",
            group_bpb(r, "heldout", tr.LOW), group_bpb(r, "heldout", tr.HIGH),
            group_bpb(r, "heldout_ext", tr.LOW), group_bpb(r, "heldout_ext", tr.HIGH), seg, ko))
    return "\n".join(lines) + "\n"


def cmd_report(args):
    res = load_results()
    text = report_text(res)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    if args.curves and res:
        plot_curves(res, args.curves)
    if args.routing and res:
        plot_routing(res, args.routing)


def mean_bpb(r, split):
    return float(np.mean([r["final"][split]["bpb"][l] for l in LANGS6]))


def default_model(res):
    """The default-model decision: the finished 500k-token run with the lowest mean heldout_ext bits per byte
    replaces the shipped model only if it beats it there (the packages no model trained on); heldout shown too."""
    cands = [r for r in res.values() if r["tier"] >= 2]
    sh = res.get("shipped")
    if not cands or sh is None:
        return ["- not decided yet (%d full runs, shipped model %s)" % (len(cands), "measured" if sh else "not measured")]
    best = min(cands, key=lambda r: mean_bpb(r, "heldout_ext"))
    out = ["- %s: %.4f on other packages (heldout_ext), %.4f on the training packages' held-out files" % (
        name, mean_bpb(r, "heldout_ext"), mean_bpb(r, "heldout")) for name, r in
        (("best run, " + best["run"], best), ("shipped, " + sh.get("file", "the default model"), sh))]
    d = mean_bpb(best, "heldout_ext") - mean_bpb(sh, "heldout_ext")
    out.append("- %s (%+.4f bits per byte)" % (
        "the best run replaces the shipped model" if d < 0 else "the shipped model stays the default", d))
    return out


def curve_points(r, langs):
    """A run's learning curve: (tokens in thousands, mean held-out loss of langs on other packages), from the
    step-0 check on."""
    pts = [p for p in r.get("curve", []) if p.get("heldout_ext")]
    if not pts:
        return [], []
    tok_per_step = r["tokens"] / max(p["step"] for p in pts)
    if (r.get("start") or {}).get("heldout_ext"):
        pts = [{"step": 0, "heldout_ext": r["start"]["heldout_ext"]}] + pts
    return ([p["step"] * tok_per_step / 1e3 for p in pts],
            [float(np.mean([p["heldout_ext"][l] for l in langs])) for p in pts])


def seed_band(curves):
    """The seeds' curves [(xs, ys), ...] on the points every seed has (a run whose curve was logged more
    coarsely contributes only where the others have a point too): (x, array seeds x points)."""
    common = set.intersection(*(set(round(v, 6) for v in c[0]) for c in curves))
    x = sorted(common)
    ys = np.array([[dict((round(a, 6), b) for a, b in zip(*c))[v] for v in x] for c in curves])
    return x, ys


def plot_curves(res, png):
    """Learning curves, held-out loss on packages never trained on against post-pretraining tokens. Top: the
    full-budget runs, one colour per method, the line the mean over its seeds and the band their min-max
    (options: one seed, dashed); left the low-resource languages, right the high-resource ones. Bottom: the
    learning-rate sweep (a quarter of the budget, seed 1), the line style the rate's rank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = METHODS + OPTIONS
    colour = {st: plt.get_cmap("tab10")(i) for i, st in enumerate(stages)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for col, (langs, what) in enumerate(((tr.LOW, "Rust/Go/Ruby (low-resource)"),
                                         (tr.HIGH, "Python/Java/C++ (high-resource)"))):
        ax = axes[0][col]
        for st in stages:
            runs = [r for r in res.values() if r["stage"] == st and r["tier"] >= 2]
            cs = [curve_points(r, langs) for r in runs]
            cs = [c for c in cs if c[0]]
            if not cs:
                continue
            x, ys = seed_band(cs)
            ax.plot(x, ys.mean(0), color=colour[st], lw=1.6, marker=".", ls="--" if st in OPTIONS else "-",
                    label="%s (%d seed%s)" % (st, len(cs), "s" if len(cs) > 1 else ""))
            if len(cs) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=colour[st], alpha=0.2, lw=0)
        ax.set_title("%s, full budget" % what, fontsize=11)
        ax.set_xlabel("post-pretraining tokens (thousands)")
        ax.set_ylabel("held-out loss, other packages (nats/token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        for st in METHODS:
            for k, lr in enumerate(SWEEP[st]):
                r = res.get(run_name(st, 1, lr, int(POST_TOKENS * SWEEP_FRACTION)))
                if r:
                    x, y = curve_points(r, langs)
                    ax.plot(x, y, color=colour[st], lw=1.2, ls=("-", "--", ":")[k], marker=".",
                            label="%s lr %g" % (st, lr))
        ax.set_title("%s, learning-rate sweep (seed 1)" % what, fontsize=11)
        ax.set_xlabel("post-pretraining tokens (thousands)")
        ax.set_ylabel("held-out loss, other packages (nats/token)")
        ax.legend(fontsize=6.5, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot_routing(res, png):
    """Segment experts' token shares per language (last layer): the untrained router (step 0), then every
    full-budget hybrid with a segment level at seed 1 (moe is balanced, moe_nobal is not), one colour scale
    for all panels and one colour bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(r["run"], r["final"]["heldout_ext"]["seg_routing"])
              for r in sorted(res.values(), key=lambda r: (r["tier"], r["run"]))
              if r["seed"] == 1 and r["tier"] in (0, 2, 3) and "seg_routing" in r["final"]["heldout_ext"]]
    if not panels:
        return
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol + 1.6, 4.1 * nrow), squeeze=False,
                             gridspec_kw={"wspace": 0.45, "hspace": 0.35})  # room for each panel's labels
    for ax, (name, rt) in zip(axes.flat, panels):
        m = np.array([rt[l][-1] for l in LANGS6])
        im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(name if name != "moe-untrained" else "untrained router (step 0)", fontsize=11)
        ax.set_yticks(range(len(LANGS6)), LANGS6, fontsize=10)
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("segment expert (last layer)", fontsize=10)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, "%.2f" % m[i, j], ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 else "white")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the language's tokens", shrink=0.8)
    fig.savefig(png, dpi=110)


def cmd_selftest(args):
    p = plan({})
    assert len([s for s in p if s["tier"] == 1]) == sum(len(v) for v in SWEEP.values())
    assert all(s["run"] is None for s in p if s["tier"] > 1)  # no rate chosen before the sweep
    assert len({s["run"] for s in p if s["run"]}) == len([s for s in p if s["run"]])
    assert claim([-0.05, -0.04, -0.06])["verdict"] == "holds"
    assert claim([0.05, 0.04, 0.06])["verdict"] == "does not hold"
    assert claim([-0.05, 0.01, -0.06])["verdict"] == "cannot be told apart"
    assert claim([-0.01, -0.05, -0.09])["verdict"] == "cannot be told apart"  # spread 0.08 > mean gain 0.05
    # the sweep picks the lowest mean held-out loss
    st = int(POST_TOKENS * SWEEP_FRACTION)
    fake = {run_name("moe", 1, lr, st): {"final": {"heldout": {"loss": {l: v for l in LANGS6}}}}
            for lr, v in zip(SWEEP["moe"], (3.0, 2.5, 2.7))}
    assert chosen_lr("moe", fake) == SWEEP["moe"][1]
    assert all(s["run"] for s in plan(fake) if s["stage"] in ("moe",) + tuple(OPTIONS))
    # the default model changes only for a run better on the other packages
    mk = lambda run, tier, ext, ho: {"run": run, "tier": tier, "final": {  # noqa: E731
        "heldout_ext": {"bpb": {l: ext for l in LANGS6}}, "heldout": {"bpb": {l: ho for l in LANGS6}}}}
    res = {"shipped": mk("shipped", 0, 2.0, 1.0), "a": mk("a", 2, 2.1, 0.5), "sweep": mk("sweep", 1, 1.0, 1.0)}
    assert default_model(res)[-1].startswith("- the shipped model stays")
    res["b"] = mk("b", 3, 1.9, 1.5)
    assert default_model(res)[-1].startswith("- the best run replaces") and "best run, b:" in default_model(res)[0]
    # seeds' curves logged at different points meet on the points they share
    x, ys = seed_band([([0, 50, 100, 150], [5, 4, 3, 2]), ([0, 100.0000001, 150], [6, 5, 4])])
    assert x == [0, 100, 150] and ys.tolist() == [[5, 3, 2], [6, 5, 4]], (x, ys)
    # the committed report is the committed results rendered (a hand edit or a stale file fails here)
    doc = os.path.join(tr.REPO, "docs", "experiment.md")
    with open(doc, encoding="utf-8") as fh:
        assert fh.read() == report_text(load_results()), "docs/experiment.md is stale: run " + REPORT_CMD
    print("runs selftest: plan of %d runs, claim rules, sweep choice and default-model rule ok; "
          "docs/experiment.md renders from models/runs/" % len(p))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("plan", "run", "report", "selftest"):
        p = sub.add_parser(name)
        p.add_argument("--tokenizer", default=os.path.join(tr.ROOT, "tokenizer"))
        if name == "run":
            p.add_argument("--stop-at", default=None, help="UTC HH:MM after which no new run starts")
            p.add_argument("--max-runs", type=int, default=0)
            p.add_argument("--only", default=None)
            p.add_argument("--recurve", action="store_true",
                           help="then re-train finished runs whose learning curve has fewer than 10 points")
        if name == "report":
            p.add_argument("--out", default=None)
            p.add_argument("--curves", default=None)
            p.add_argument("--routing", default=None)
    args = ap.parse_args()
    {"plan": cmd_plan, "run": cmd_run, "report": cmd_report, "selftest": cmd_selftest}[args.cmd](args)


if __name__ == "__main__":
    main()
