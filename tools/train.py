"""train.py - train the codemoe models on CPU: dense Qwen2 base, then MultiPL-MoE upcycling and the
baselines of the paper's experiment, at small scale. PyTorch (Debian's python3-torch), 2 threads.

    /usr/bin/python3 tools/train.py tokenize              # corpus jsonl -> $CM_TRAIN/tokens/*.u16
    /usr/bin/python3 tools/train.py train --stage base    # resumes from $CM_TRAIN/ckpt/base/latest.pt
    /usr/bin/python3 tools/train.py export --stage base --out models/x.gguf
    /usr/bin/python3 tools/train.py eval --stage base     # held-out loss per language
    /usr/bin/python3 tools/train.py speed                 # tokens/s of a config (forward+backward+step)

Stages (see docs/training.md): every stage but `base` starts from base's final checkpoint and trains on the
same post-pretraining mix (9:1 low:high resource) for the same token budget:
    base          dense Qwen2, all weights, high-resource-dominated mix
    moe           MultiPL-MoE upcycled: token + segment experts, only experts and routers train
    moe_noseg     ablation: token level only (a_seg = 0, no segment experts)
    moe_noshared  ablation: no shared token expert (top-2 of the routed experts)
    moe_segbal    variant: moe with the load-balancing loss on the segment routers too (training only)
    dense_cont    baseline: continued pre-training of every weight
    lora          baseline: LoRA rank 8 on every linear layer (merged into a dense model at export)
    mole          baseline: MoLE, LoRA experts on the FFN per language + shared (+ other, unused here)

Model code mirrors tools/reference.py (HF Qwen2 semantics; the state-dict names ARE the HF names, so
reference.Model can run a checkpoint) and tools/reference_moe.py (the hybrid FFN in "causal" segment mode,
the mode codemoe generates in; names as reference_moe.hybrid_shapes / mole_shapes). Those files stay the
oracle: `train.py check` compares this module's logits with theirs.

Training objective: next-token cross-entropy; a fraction of the sequences (--fim, 0.5) are put in FIM
PSM order at token granularity: <|fim_prefix|> pre <|fim_suffix|> suf <|fim_middle|> mid. MoE stages add
alpha * N * sum_i f_i P_i over the routed (non-shared) token experts (alpha = 0.01).
Checkpoints: <ckpt>/<stage>/latest.pt every --ckpt-min minutes and at the end (atomic rename); a run
resumes from it automatically (model, optimiser, step, data RNG).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402
import reference as ref  # noqa: E402

ROOT = corpus.TRAIN_DIR
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGS = ["python", "java", "cpp", "rust", "go", "ruby", "c", "js"]
HIGH, LOW = ["python", "java", "cpp"], ["rust", "go", "ruby"]
# C and JS are left out of the experiment's mixes (they are in the corpus and the tokenizer).
# v1 (the shipped run, docs/results.md): a base that saw the low-resource languages at 20%
MIX_BASE_V1 = {"python": 0.28, "java": 0.26, "cpp": 0.26, "rust": 0.0667, "go": 0.0667, "ruby": 0.0666}
# lowres: a base that sees (almost) none of Rust/Go/Ruby (1% each), so they are low-resource for real
MIX_BASE_LOWRES = {"python": 0.324, "java": 0.323, "cpp": 0.323, "rust": 0.01, "go": 0.01, "ruby": 0.01}
# post-pretraining, both experiments: the paper's 9:1 low:high-resource ratio
MIX_POST = {"python": 0.0333, "java": 0.0333, "cpp": 0.0334, "rust": 0.3, "go": 0.3, "ruby": 0.3}
# An experiment fixes the base mix and where its checkpoints and logs ($CM_TRAIN/<dir>) and committed
# weights-only snapshots (models/checkpoints/<dir>) live; v1 keeps the shipped run's layout. $CM_EXP picks
# one (default lowres, docs/training.md); corpus, tokenizer and token files are shared.
EXPERIMENTS = {"v1": {"mix_base": MIX_BASE_V1, "dir": ""},
               "lowres": {"mix_base": MIX_BASE_LOWRES, "dir": "lowres"}}
EXP = os.environ.get("CM_EXP") or "lowres"
if EXP not in EXPERIMENTS:
    sys.exit("train.py: unknown CM_EXP %r (one of %s)" % (EXP, ", ".join(EXPERIMENTS)))
EXP_ROOT = os.path.join(ROOT, EXPERIMENTS[EXP]["dir"]) if EXPERIMENTS[EXP]["dir"] else ROOT
MIX_BASE = EXPERIMENTS[EXP]["mix_base"]
SPLITS_HELDOUT = ("heldout", "heldout_ext")  # same packages as training / packages never trained on
SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]

# sized for the measured CPU speed (docs/training.md): ~3.2M parameters, ~3.6M multiply-adds per token
DEFAULT_ARCH = dict(vocab_size=8192, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                    tie_word_embeddings=True, max_position_embeddings=2048)
DEFAULT_MOE = dict(n_tok=6, k_used=2, shared=5, n_seg=6, pooling="max", capacity=1.0, bucket=4,
                   a_tok=0.7, a_seg=0.3)  # window = ctx / 8, gate_scale = 1 / window (set from ctx)
# The lowres experiment's upcycle (docs/training.md): it starts exactly at the base. Fusion weights are
# learned per layer from (a_tok, a_seg) = (1, 0) ("fusion_learn"; folded into the experts' down
# projections at export, so the GGUF format is unchanged), the segment gate is the router probability itself
# (gate_scale 1, not 1/window), router z-loss, the load-balancing loss on the segment routers too.
# Options: pooling "mean"; route "previous" (window s is routed with the pooled descriptor of window s-1,
# so its expert is chosen before it is read; window 0 gets no segment expert).
LOWRES_MOE = dict(a_tok=1.0, a_seg=0.0, gate_scale=1.0, fusion_learn=1, seg_balance=1, z_loss=1e-3,
                  route="prefix")


# ============================================================================ model

class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return ref.rms_norm(x, self.weight, self.eps)


class LoRALinear(nn.Module):
    """y = W x (+ b) + sum over active adapters a of (alpha_a / sqrt(r_a)) * B_a (A_a x)  (rsLoRA, as
    MoLE). Adapters live in self.lora[name] with params A (r, in) and B (out, r); B starts at 0.
    `active` is set by the model before a forward: None (no adapter), a list of names for the whole batch,
    or a (B, T, n_adapters) float mask (per-token sets, MoLE)."""

    def __init__(self, din, dout, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dout, din))
        self.bias = nn.Parameter(torch.zeros(dout)) if bias else None
        self.lora = nn.ModuleDict()
        self.scales = {}
        self.active = None

    def add_adapter(self, name, r, alpha):
        m = nn.Module()
        m.A = nn.Parameter(torch.randn(r, self.weight.shape[1]) / math.sqrt(self.weight.shape[1]))
        m.B = nn.Parameter(torch.zeros(self.weight.shape[0], r))
        self.lora[name] = m
        self.scales[name] = alpha / math.sqrt(r)

    def forward(self, x):
        y = Fn.linear(x, self.weight, self.bias)
        if self.active is None:
            return y
        if isinstance(self.active, list):
            for n in self.active:
                y = y + self.scales[n] * ((x @ self.lora[n].A.T) @ self.lora[n].B.T)
            return y
        for k, n in enumerate(self.lora):  # per-token mask (B, T, n_adapters)
            m = self.active[..., k:k + 1]
            y = y + m * (self.scales[n] * ((x @ self.lora[n].A.T) @ self.lora[n].B.T))
        return y

    def merged(self, names):
        w = self.weight.detach().clone()
        for n in names:
            w += self.scales[n] * (self.lora[n].B @ self.lora[n].A).detach()
        return w


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        D, H, K, E = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.H, self.K, self.E = H, K, E
        self.q_proj = LoRALinear(D, H * E, bias=True)
        self.k_proj = LoRALinear(D, K * E, bias=True)
        self.v_proj = LoRALinear(D, K * E, bias=True)
        self.o_proj = LoRALinear(H * E, D)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.E).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x).view(B, T, self.K, self.E).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.K, self.E).transpose(1, 2)
        q, k = ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)
        k = k.repeat_interleave(self.H // self.K, dim=1)
        v = v.repeat_interleave(self.H // self.K, dim=1)
        # (torch 1.13 here has no scaled_dot_product_attention)
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.E))  # (B, H, T, T)
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        a = torch.softmax(s, dim=-1) @ v  # (B, H, T, E)
        return self.o_proj(a.transpose(1, 2).reshape(B, T, self.H * self.E))


class MLP(nn.Module):
    def __init__(self, D, F):
        super().__init__()
        self.gate_proj = LoRALinear(D, F)
        self.up_proj = LoRALinear(D, F)
        self.down_proj = LoRALinear(F, D)

    def forward(self, x):
        return self.down_proj(Fn.silu(self.gate_proj(x)) * self.up_proj(x))


def swiglu(x, g, u, d):
    return (Fn.silu(x @ g.T) * (x @ u.T)) @ d.T


class HybridMoE(nn.Module):
    """MultiPL-MoE FFN (reference_moe.HybridFFN semantics), segment level in causal mode, batched.
    Parameters named as reference_moe.hybrid_shapes: tok_router (N, D), tok_gate/up (N, F, D), tok_down
    (N, D, F), seg_* likewise. n_seg = 0 drops the segment level; shared = -1 drops the shared expert."""

    def __init__(self, D, F, hp):
        super().__init__()
        self.hp = hp
        N, S = hp["n_tok"], hp["n_seg"]
        if hp.get("fusion_learn"):  # (a_tok, a_seg) of this layer, learned (LOWRES_MOE)
            self.fusion = nn.Parameter(torch.tensor([float(hp["a_tok"]), float(hp["a_seg"])]))
        self.tok_router = nn.Parameter(torch.randn(N, D) * 0.02)
        self.tok_gate = nn.Parameter(torch.empty(N, F, D))
        self.tok_up = nn.Parameter(torch.empty(N, F, D))
        self.tok_down = nn.Parameter(torch.empty(N, D, F))
        if S:
            self.seg_router = nn.Parameter(torch.randn(S, D) * 0.02)
            self.seg_gate = nn.Parameter(torch.empty(S, F, D))
            self.seg_up = nn.Parameter(torch.empty(S, F, D))
            self.seg_down = nn.Parameter(torch.empty(S, D, F))
        self.aux = self.zloss = None

    def fusion_weights(self):
        """(a_tok, a_seg) as this layer applies them: learned parameters or the fixed hyper-parameters."""
        if self.hp.get("fusion_learn"):
            return self.fusion[0], self.fusion[1]
        return self.hp["a_tok"], self.hp["a_seg"]

    def segment_descriptors(self, x):
        """Per-token segment descriptors (B*T, D) and a (B*T,) mask of the tokens that get a segment expert.
        route "prefix" (the engine's causal mode): token t of window s pools x[s*w .. t]; every token.
        route "previous": every token of window s gets window s-1's pooled descriptor; window 0 none."""
        hp = self.hp
        B, T, D = x.shape
        w = hp["window"]
        Tp = -(-T // w) * w  # pad to whole windows: prefix pooling never sees the padding
        xs = Fn.pad(x, (0, 0, 0, Tp - T)).reshape(B, Tp // w, w, D)
        if hp.get("route", "prefix") == "previous":
            P = T // w  # whole windows; a window is complete before the next one starts
            full = xs[:, :P].amax(dim=2) if hp["pooling"] == "max" else xs[:, :P].mean(dim=2)  # (B, P, D)
            desc = torch.cat([x.new_zeros(B, 1, D), full], dim=1)[:, :Tp // w]  # window s <- s-1
            desc = desc[:, :, None].expand(B, Tp // w, w, D).reshape(B, Tp, D)[:, :T]
            mask = (torch.arange(T) >= w).repeat(B)
            return desc.reshape(B * T, D), mask
        if hp["pooling"] == "max":
            desc = xs.cummax(dim=2).values
        else:
            desc = xs.cumsum(dim=2) / torch.arange(1, w + 1, dtype=x.dtype)[:, None]
        return desc.reshape(B, Tp, D)[:, :T].reshape(B * T, D), torch.ones(B * T, dtype=torch.bool)

    def upcycle(self, mlp):
        with torch.no_grad():
            for kind in ("tok", "seg") if self.hp["n_seg"] else ("tok",):
                for p, src in (("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
                    getattr(self, "%s_%s" % (kind, p)).copy_(src.weight.detach().unsqueeze(0).expand_as(
                        getattr(self, "%s_%s" % (kind, p))))

    def experts(self, kind, x, idx, gate, out):
        """out[t] += gate[t] * E_idx[t](x[t]) for every expert; x (n, D), idx/gate (n,)."""
        g, u, d = getattr(self, kind + "_gate"), getattr(self, kind + "_up"), getattr(self, kind + "_down")
        for e in range(g.shape[0]):
            sel = (idx == e).nonzero(as_tuple=True)[0]
            if sel.numel():
                out.index_add_(0, sel, gate[sel, None] * swiglu(x[sel], g[e], u[e], d[e]))

    def forward(self, x):
        hp = self.hp
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        N, sh = hp["n_tok"], hp["shared"]
        lt = xf @ self.tok_router.T
        p = torch.softmax(lt, dim=-1)  # (BT, N)
        # router z-loss (ST-MoE): keeps the router logits small, so softmax stays in its sensitive range
        self.zloss = (torch.logsumexp(lt, dim=-1) ** 2).mean()
        routed = [e for e in range(N) if e != sh]
        n_pick = hp["k_used"] - 1 if sh >= 0 else hp["k_used"]
        pr = p[:, routed]
        top_p, top_i = pr.topk(n_pick, dim=-1)  # ties: torch.topk order; lower index in practice
        top_e = torch.as_tensor(routed)[top_i]
        denom = top_p.sum(-1) + (p[:, sh] if sh >= 0 else 0)
        y_tok = torch.zeros_like(xf)
        for j in range(n_pick):
            self.experts("tok", xf, top_e[:, j], top_p[:, j] / denom, y_tok)
        if sh >= 0:
            y_tok = y_tok + (p[:, sh] / denom)[:, None] * swiglu(xf, self.tok_gate[sh], self.tok_up[sh],
                                                                  self.tok_down[sh])
        # load balancing over the routed experts: f = share of top-k slots, P = mean routed probability
        f = torch.zeros(len(routed)).index_add_(0, top_i.reshape(-1), torch.ones(top_i.numel())) / top_i.numel()
        self.aux = len(routed) * (f.detach() * pr.mean(0)).sum()
        self.route_counts = f.detach()
        a_tok, a_seg = self.fusion_weights()
        y = a_tok * y_tok
        self.seg_share, self.seg_counts = None, np.zeros(hp["n_seg"], dtype=np.int64)
        if hp["n_seg"]:
            desc, mask = self.segment_descriptors(x)
        if hp["n_seg"] and mask.any():  # (route "previous": none before the second window)
            ls = desc[mask] @ self.seg_router.T
            q = torch.softmax(ls, dim=-1)  # (routed tokens, S)
            if hp.get("z_loss"):
                self.zloss = self.zloss + (torch.logsumexp(ls, dim=-1) ** 2).mean()
            qv, qi = q.max(dim=-1)  # capacity 1: top-1 expert per token
            self.seg_counts = np.bincount(qi.numpy(), minlength=hp["n_seg"])  # routing statistics (runs.py)
            if hp.get("seg_balance"):
                # the same Switch-style loss over the segment experts' top-1 choices: without it one
                # segment expert takes ~98% of the tokens (docs/results.md)
                S = hp["n_seg"]
                fs = torch.zeros(S).index_add_(0, qi, torch.ones(qi.numel())) / qi.numel()
                self.aux = self.aux + S * (fs.detach() * q.mean(0)).sum()
            sel = mask.nonzero(as_tuple=True)[0]
            y_sub = torch.zeros(sel.numel(), D, dtype=x.dtype)
            self.experts("seg", xf[sel], qi, qv * hp["gate_scale"], y_sub)
            y_seg = torch.zeros_like(xf).index_add(0, sel, a_seg * y_sub)
            # the segment branch's share of the FFN output norm (reported per run)
            self.seg_share = (y_seg.detach().norm(dim=-1).sum() /
                              (y.detach().norm(dim=-1).sum() + y_seg.detach().norm(dim=-1).sum()).clamp_min(1e-30))
            if getattr(self, "knockout", False):  # evaluation only: the segment branch switched off
                y_seg = torch.zeros_like(y_seg)
            y = y + y_seg
        return y.reshape(B, T, D)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        n = self.post_attention_layernorm(x)
        return x + (self.moe(n) if hasattr(self, "moe") else self.mlp(n))


class Body(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LM(nn.Module):
    """Qwen2 causal LM; state_dict keys are the HF names (plus .moe.* / .lora.* for the variants)."""

    def __init__(self, c):
        super().__init__()
        self.cfg = c
        self.model = Body(c)
        if not c.tie_word_embeddings:
            self.lm_head = LoRALinear(c.hidden_size, c.vocab_size)
        self._rope = {}
        self.init_weights()

    def init_weights(self):
        std = 0.02
        for n, p in self.named_parameters():
            if n.endswith("norm.weight"):
                nn.init.ones_(p)
            elif n.endswith(".bias"):
                nn.init.zeros_(p)
            elif ".lora." not in n and ".moe." not in n:
                # scaled init of the residual projections (GPT-2): std / sqrt(2 L)
                s = std / math.sqrt(2 * self.cfg.num_hidden_layers) if n.endswith(("o_proj.weight",
                                                                                    "down_proj.weight")) else std
                nn.init.normal_(p, 0.0, s)

    def rope(self, T, dtype):
        if (T, dtype) not in self._rope:
            self._rope[(T, dtype)] = ref.rope_cos_sin(T, self.cfg.head_dim, self.cfg.rope_theta, dtype)
        return self._rope[(T, dtype)]

    def linears(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def forward(self, tokens):
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(tokens.shape[1], x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        h = self.model.norm(x)
        w = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return h @ w.T

    def aux_loss(self):
        return sum(l.moe.aux for l in self.model.layers if hasattr(l, "moe"))

    def z_loss(self):
        return sum(l.moe.zloss for l in self.model.layers if hasattr(l, "moe"))


def make_config(d):
    return ref.Config("qwen2", d["vocab_size"], d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"],
                      d["num_attention_heads"], d["num_key_value_heads"], d["rms_norm_eps"], d["rope_theta"],
                      d["tie_word_embeddings"], d["max_position_embeddings"])


def n_params(m, trainable=False):
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


# ============================================================================ variants

def moe_params(stage, ctx, exp=None):
    """The hybrid's hyper-parameters of a moe* stage in experiment exp (default $CM_EXP)."""
    hp = dict(DEFAULT_MOE, window=ctx // 8)
    hp["gate_scale"] = 1.0 / hp["window"]
    if (exp or EXP) != "v1":
        hp.update(LOWRES_MOE)
        if stage == "moe_mean":
            hp.update(pooling="mean")
        if stage == "moe_prev":
            hp.update(route="previous")
        if stage == "moe_nobal":  # the routing picture's unbalanced panel
            hp.update(seg_balance=0)
    if stage == "moe_noseg":
        hp.update(n_seg=0, a_tok=1.0, a_seg=0.0)
    if stage == "moe_noshared":
        hp.update(shared=-1)
    if stage == "moe_segbal":  # training only: the segment routers get the load-balancing loss too
        hp.update(seg_balance=1)
    return hp


MOLE_NAMES = ["python", "java", "cpp", "rust", "go", "ruby", "shared", "other"]


def build_variant(model, stage, ctx, args, hp=None):
    """Turn a dense base model into the stage's model; set requires_grad. Returns meta for the ckpt.
    hp: the hybrid's hyper-parameters as a checkpoint recorded them (default moe_params)."""
    meta = {}
    for p in model.parameters():
        p.requires_grad = stage in ("base", "dense_cont")
    if stage.startswith("moe"):
        hp = dict(hp) if hp else moe_params(stage, ctx)
        meta["moe"] = hp
        for layer in model.model.layers:
            layer.moe = HybridMoE(model.cfg.hidden_size, model.cfg.intermediate_size, hp)
            layer.moe.upcycle(layer.mlp)
            del layer.mlp
            for n, p in layer.moe.named_parameters():
                # the shared expert is frozen (reference code); every other expert and the routers train
                p.requires_grad = True
    elif stage == "lora":
        meta["lora"] = {"rank": 8, "alpha": 8}
        for m in model.linears():
            m.add_adapter("all", 8, 8.0)
            m.active = ["all"]
    elif stage == "mole":
        ranks = [8] * 6 + [16, 16]
        meta["mole"] = {"names": MOLE_NAMES, "ranks": ranks, "alphas": [8.0] * 6 + [16.0, 16.0],
                        "shared": 6, "fallback": 7}
        for layer in model.model.layers:
            for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                for n, r, a in zip(MOLE_NAMES, ranks, meta["mole"]["alphas"]):
                    m.add_adapter(n, r, a)
    for m in model.linears():
        for ad in m.lora.values():
            for p in ad.parameters():
                p.requires_grad = True
    return meta


def freeze_shared_grad(model):
    """Zero the shared token expert's gradient (it stays the dense FFN copy)."""
    for layer in model.model.layers:
        sh = getattr(layer, "moe", None) and layer.moe.hp["shared"]
        if hasattr(layer, "moe") and sh is not None and sh >= 0:
            for n in ("tok_gate", "tok_up", "tok_down"):
                g = getattr(layer.moe, n).grad
                if g is not None:
                    g[sh] = 0


def set_mole_sets(model, langs_per_row, T):
    """Every token of a row in language L gets {L, shared} (our samples are whole files of one language)."""
    mask = torch.zeros(len(langs_per_row), T, len(MOLE_NAMES))
    for b, l in enumerate(langs_per_row):
        mask[b, :, MOLE_NAMES.index(l) if l in MOLE_NAMES else 7] = 1
        if l in MOLE_NAMES:
            mask[b, :, 6] = 1
    for layer in model.model.layers:
        for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            m.active = mask


# ============================================================================ data

def tok_path(lang, split):
    return os.path.join(ROOT, "tokens", "%s.%s.u16" % (lang, split))


def cmd_tokenize(args):
    import train_tokenizer as tt
    enc = tt.Encoder.load(os.path.join(args.tokenizer, "tokenizer.json"))
    eot = enc.tok.ids["<|endoftext|>"]
    os.makedirs(os.path.join(ROOT, "tokens"), exist_ok=True)
    info = {}
    for lang in LANGS:
        for split, mb in (("train", args.train_mb), ("heldout", args.heldout_mb), ("heldout_ext", args.heldout_mb)):
            src = os.path.join(args.corpus, lang, split + ".jsonl")
            dst = tok_path(lang, split)
            if not os.path.exists(src):
                continue
            if os.path.exists(dst) and not args.force:
                info["%s.%s" % (lang, split)] = os.path.getsize(dst) // 2
                continue
            ids, nb, t0 = [], 0, time.time()
            for text in tt.read_texts(src, int(mb * 2**20)):
                ids.extend(enc.encode(text))
                ids.append(eot)
                nb += len(text.encode())
            np.asarray(ids, dtype=np.uint16).tofile(dst + ".tmp")
            os.replace(dst + ".tmp", dst)
            info["%s.%s" % (lang, split)] = len(ids)
            print("tokenize %s %s: %.1f MB -> %d tokens (%.2f B/tok, %.0fs)" % (
                lang, split, nb / 1e6, len(ids), nb / max(1, len(ids)), time.time() - t0), file=sys.stderr)
    with open(os.path.join(ROOT, "tokens", "info.json"), "w") as fh:
        json.dump(info, fh, indent=1)


class Data:
    """Random windows of ctx+1 tokens from per-language token streams, languages drawn by the mix."""

    def __init__(self, mix, split, ctx, fim, seed, specials):
        self.mix = {l: w for l, w in mix.items() if w > 0}
        self.streams = {l: np.fromfile(tok_path(l, split), dtype=np.uint16) for l in self.mix}
        self.langs = list(self.mix)
        self.w = np.array([self.mix[l] for l in self.langs], dtype=np.float64)
        self.w /= self.w.sum()
        self.ctx, self.fim = ctx, fim
        self.rng = np.random.default_rng(seed)
        self.eot, self.pre, self.mid, self.suf = specials

    def sample(self, lang):
        s = self.streams[lang]
        i = int(self.rng.integers(0, len(s) - self.ctx - 1))
        seq = s[i:i + self.ctx + 1].astype(np.int64)
        if self.fim and self.rng.random() < self.fim:
            # PSM at token granularity, same length: 3 FIM tokens replace the window's last 3 tokens
            body = seq[:self.ctx + 1 - 3]
            a, b = sorted(self.rng.integers(0, len(body) + 1, 2))
            seq = np.concatenate([[self.pre], body[:a], [self.suf], body[b:], [self.mid], body[a:b]])
        return seq

    def batch(self, B):
        langs = [self.langs[k] for k in self.rng.choice(len(self.langs), B, p=self.w)]
        x = torch.as_tensor(np.stack([self.sample(l) for l in langs]))
        return x[:, :-1], x[:, 1:], langs


def heldout_batches(langs, ctx, n, seed=7, split="heldout"):
    """Fixed held-out windows per language (no FIM): n sequences of ctx+1 tokens, evenly spaced."""
    out = {}
    for l in langs:
        p = tok_path(l, split)
        if not os.path.exists(p):
            continue
        s = np.fromfile(p, dtype=np.uint16).astype(np.int64)
        k = min(n, max(1, (len(s) - 1) // (ctx + 1)))
        starts = np.linspace(0, len(s) - ctx - 2, k).astype(np.int64)
        x = torch.as_tensor(np.stack([s[i:i + ctx + 1] for i in starts]))
        out[l] = (x[:, :-1], x[:, 1:])
    return out


@torch.no_grad()
def evaluate(model, hb, stage, bs=8, digits=4):
    model.eval()
    res = {}
    for l, (x, y) in hb.items():
        tot, n = 0.0, 0
        for i in range(0, len(x), bs):
            if stage == "mole":
                set_mole_sets(model, [l] * len(x[i:i + bs]), x.shape[1])
            lg = model(x[i:i + bs])
            tot += float(Fn.cross_entropy(lg.reshape(-1, lg.shape[-1]), y[i:i + bs].reshape(-1), reduction="sum"))
            n += y[i:i + bs].numel()
        res[l] = round(tot / n, digits) if digits else tot / n
    model.train()
    return res


# ============================================================================ checkpoints

def ckpt_dir(stage):
    return os.path.join(EXP_ROOT, "ckpt", stage)


def snapshot_path(stage):
    """The committed weights-only snapshot of a stage in this experiment."""
    return os.path.join(REPO, "models", "checkpoints", EXPERIMENTS[EXP]["dir"], "%s.pt" % stage)


def save_ckpt(path, model, opt, step, data, meta, extra=None):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict() if opt else None, "step": step,
                "rng": data.rng.bit_generator.state if data else None, "meta": meta, "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_model(run, path=None):
    """Rebuild a run's model (a stage name, or a run name of tools/runs.py) from its checkpoint (final.pt
    or latest.pt); the stage and the hybrid's hyper-parameters come from the checkpoint's meta."""
    d = ckpt_dir(run)
    path = path or next(p for p in (os.path.join(d, "final.pt"), os.path.join(d, "latest.pt")) if os.path.exists(p))
    ck = torch.load(path)
    meta = ck["meta"]
    model = LM(make_config(meta["arch"]))
    stage = meta.get("stage", run)
    if stage != "base":
        build_variant(model, stage, meta["ctx"], None, meta.get("moe"))
    model.load_state_dict(ck["model"])
    return model, ck


def upcycle_start_loss(stage, ctx, hb, seed=0, arch=None):
    """(base loss, the stage's loss at step 0) on held-out batches hb, for a freshly upcycled stage (the
    check that every post stage starts exactly at the base). Without hb: a tiny random base and random
    tokens (the self-test)."""
    torch.manual_seed(seed)
    if arch is None:
        arch = dict(DEFAULT_ARCH, vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
        model = LM(make_config(arch))
        x = torch.randint(0, 300, (2, 2 * ctx + 1))
        hb = {"random": (x[:, :-1], x[:, 1:])}
    else:
        model, _ = load_model("base")
    base = evaluate(model, hb, "base", digits=None)
    build_variant(model, stage, ctx, None)
    return base, evaluate(model, hb, stage, digits=None)


# ============================================================================ training

def cmd_train(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    stage = args.stage
    run = args.run or stage  # checkpoints, logs and snapshots are per run (tools/runs.py: stage-seed-lr)
    d = ckpt_dir(run)
    os.makedirs(d, exist_ok=True)
    os.makedirs(os.path.join(EXP_ROOT, "logs"), exist_ok=True)
    latest, final = os.path.join(d, "latest.pt"), os.path.join(d, "final.pt")
    if os.path.exists(final):
        print("%s: %s exists, nothing to do" % (run, final), file=sys.stderr)
        return
    arch = dict(DEFAULT_ARCH)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size"):
        v = getattr(args, k, None)
        if v:
            arch[k] = v
    ctx = args.ctx
    snap = args.init or snapshot_path(run)
    prev = latest if os.path.exists(latest) else snap if os.path.exists(snap) else None
    if stage == "base" and prev:  # a resumed run keeps the architecture it started with
        pm = torch.load(prev)["meta"]
        arch, ctx = pm["arch"], pm["ctx"]
    if stage == "base":
        model = LM(make_config(arch))
        meta = {"stage": stage, "arch": arch, "ctx": ctx}
    else:
        base, bck = load_model("base")
        arch, ctx = bck["meta"]["arch"], bck["meta"]["ctx"]
        model = base
        meta = {"stage": stage, "arch": arch, "ctx": ctx}
        if not os.path.exists(latest):  # the step-0 loss of the base, before the upcycle
            hb0 = heldout_batches(LANGS[:6], ctx, args.eval_seqs)
            hbx0 = heldout_batches(LANGS[:6], ctx, args.eval_seqs, split="heldout_ext")
            start_base = evaluate(model, hb0, "base", digits=None)
        meta.update(build_variant(model, stage, ctx, args))
        if not os.path.exists(latest):
            # every upcycled stage starts exactly at the base (lowres); v1's fixed fusion did not
            start = evaluate(model, hb0, stage, digits=None)
            diff = max(abs(start[l] - start_base[l]) for l in start)
            meta["start"] = {"base": start_base, "stage": start, "max_abs_diff": diff,
                             "heldout_ext": evaluate(model, hbx0, stage)}  # the learning curves' first point
            print("%s: step-0 held-out loss %s, base %s, max |diff| %.2e" % (
                run, json.dumps({l: round(v, 5) for l, v in start.items()}),
                json.dumps({l: round(v, 5) for l, v in start_base.items()}), diff), file=sys.stderr)
            if EXP != "v1" and diff > 1e-4:
                sys.exit("%s: the upcycled model does not start at the base (max |diff| %.2e)" % (run, diff))
    mix = MIX_BASE if stage == "base" else MIX_POST
    meta.update(exp=EXP, run=run, seed=args.seed, mix=mix, fim=args.fim, batch=args.batch, tokens=args.tokens,
                lr=args.lr, fusion_lr_mult=args.fusion_lr_mult)
    with open(os.path.join(args.tokenizer, "tokenizer.json"), encoding="utf-8") as fh:
        added = {t["content"]: t["id"] for t in json.load(fh)["added_tokens"]}
    specials = [added[s] for s in ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")]
    data = Data(mix, "train", ctx, args.fim, args.seed, specials)
    hb = heldout_batches(LANGS[:6], ctx, args.eval_seqs)
    hbx = heldout_batches(LANGS[:6], ctx, args.eval_seqs, split="heldout_ext")
    params = [p for p in model.parameters() if p.requires_grad]
    fusion = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".moe.fusion")]
    decay = [p for p in params if p.dim() >= 2]
    nodecay = [p for p in params if p.dim() < 2 and not any(p is f for f in fusion)]
    # weight decay only in pre-training: the post-pretraining stages compare equal set-ups, and decay would
    # move the frozen shared expert (its gradient is zeroed, AdamW's decoupled decay is not).
    # The learned fusion weights get fusion_lr_mult x the learning rate: a_seg starts at 0 and has to reach
    # order 1 within a post stage's few hundred steps (AdamW moves a scalar by about lr per step).
    groups = [{"params": decay, "weight_decay": 0.1 if stage == "base" else 0.0, "lr_mult": 1.0},
              {"params": nodecay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if fusion:
        groups.append({"params": fusion, "weight_decay": 0.0, "lr_mult": args.fusion_lr_mult})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    total = max(1, args.tokens // (args.batch * ctx))
    step, rewarm = 0, None
    if not os.path.exists(latest) and os.path.exists(snap):
        # a committed snapshot (tools/train.py snapshot). With its optimiser moments (bfloat16, --with-opt)
        # the run continues as from latest.pt; without them the moments start fresh and the learning rate
        # is warmed up again over 50 steps
        ck = torch.load(snap)
        model.load_state_dict({k: v.float() for k, v in ck["model"].items()})
        step = ck["step"]
        if ck.get("opt"):
            opt.load_state_dict(ck["opt"])  # casts the moments back to the parameters' float32
        else:
            rewarm = step
        data.rng.bit_generator.state = ck["rng"]
        print("%s: started from snapshot %s at step %d%s" % (
            stage, snap, step, "" if ck.get("opt") else " (fresh optimiser moments)"), file=sys.stderr)
    if os.path.exists(latest):
        ck = torch.load(latest)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        data.rng.bit_generator.state = ck["rng"]
        print("%s: resumed from %s at step %d" % (stage, latest, step), file=sys.stderr)
    print("%s: %d params (%d trainable), ctx %d, batch %d, %d steps (%d tokens)" % (
        stage, n_params(model), n_params(model, True), ctx, args.batch, total, total * args.batch * ctx),
        file=sys.stderr)
    log = open(os.path.join(EXP_ROOT, "logs", "%s.jsonl" % run), "a")
    warm = max(1, min(200, total // 20))
    eval_every = args.eval_every or max(1, total // 10)  # default: held-out loss every 10% of the budget
    t_ck = t_log = time.time()
    toks_since, t_since = 0, time.time()
    while step < total:
        lr = args.lr * (step + 1) / warm if step < warm else \
            args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
        if rewarm is not None:
            lr *= min(1.0, (step - rewarm + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        x, y, langs = data.batch(args.batch)
        if stage == "mole":
            set_mole_sets(model, langs, ctx)
        lg = model(x)
        loss = Fn.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1))
        aux = model.aux_loss() if stage.startswith("moe") else torch.zeros(())
        zl = model.z_loss() if stage.startswith("moe") else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + args.alpha * aux + meta.get("moe", {}).get("z_loss", 0.0) * zl).backward()
        if stage.startswith("moe"):
            freeze_shared_grad(model)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        toks_since += x.numel()
        now = time.time()
        evaluate_now = step % eval_every == 0 or step == total  # not only on logged steps: every 10% exactly
        if step % args.log_every == 0 or evaluate_now:
            rec = {"step": step, "loss": round(float(loss), 4), "aux": round(float(aux), 4), "lr": lr,
                   "tok_s": round(toks_since / (now - t_since), 1), "time": int(now)}
            if stage.startswith("moe"):
                rec["z"] = round(float(zl), 4)
                rec["seg_share"] = [round(float(l.moe.seg_share), 4) for l in model.model.layers
                                    if getattr(l.moe, "seg_share", None) is not None]
                if fusion:
                    rec["fusion"] = [[round(float(v), 4) for v in l.moe.fusion] for l in model.model.layers]
            toks_since, t_since = 0, now
            if evaluate_now:
                rec["heldout"] = evaluate(model, hb, stage)
                rec["heldout_ext"] = evaluate(model, hbx, stage)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), file=sys.stderr)
        if now - t_ck > args.ckpt_min * 60 or step == total:
            save_ckpt(latest, model, opt, step, data, meta)
            t_ck = now
    save_ckpt(final, model, None, step, None, meta, {"heldout": evaluate(model, hb, stage),
                                                      "heldout_ext": evaluate(model, hbx, stage)})
    print("%s: done, %s" % (run, final), file=sys.stderr)


def cmd_speed(args):
    torch.set_num_threads(args.threads)
    arch = dict(DEFAULT_ARCH)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        if getattr(args, k):
            arch[k] = getattr(args, k)
    model = LM(make_config(arch))
    if args.stage != "base":
        build_variant(model, args.stage, args.ctx, args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, arch["vocab_size"], (args.batch, args.ctx + 1))
    ts = []
    for i in range(args.steps):
        t0 = time.time()
        if args.stage == "mole":
            set_mole_sets(model, ["python"] * args.batch, args.ctx)
        lg = model(x[:, :-1])
        loss = Fn.cross_entropy(lg.reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1))
        if args.stage.startswith("moe"):
            loss = loss + 0.01 * model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.time() - t0)
    t = float(np.median(ts[1:])) if len(ts) > 1 else ts[0]
    print(json.dumps({"stage": args.stage, "arch": arch, "params": n_params(model),
                      "trainable": n_params(model, True), "batch": args.batch, "ctx": args.ctx,
                      "s_per_step": round(t, 3), "tok_s": round(args.batch * args.ctx / t, 1)}))


# ============================================================================ check / eval / export

def cmd_snapshot(args):
    """latest.pt (model + optimiser, f32) -> a float16 weights file small enough to commit
    (models/checkpoints[/<exp>]/<stage>.pt); `train` starts from it when <ckpt>/<stage>/latest.pt is missing.
    --with-opt adds AdamW's moments in bfloat16 (float32's range: float16 would flush small second moments
    to 0), so an unfinished run resumes without re-warming (about 3x the size)."""
    d = ckpt_dir(args.stage)
    src = next(p for p in (os.path.join(d, "latest.pt"), os.path.join(d, "final.pt")) if os.path.exists(p))
    ck = torch.load(src)
    out = args.out or snapshot_path(args.stage)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    opt = None
    if args.with_opt and ck.get("opt"):
        opt = {"param_groups": ck["opt"]["param_groups"],
               "state": {i: {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and v.dim() else v
                             for k, v in st.items()} for i, st in ck["opt"]["state"].items()}}
    torch.save({"model": {k: v.half() for k, v in ck["model"].items()}, "opt": opt, "step": ck["step"],
                "rng": ck["rng"], "meta": ck["meta"]}, out + ".tmp")
    os.replace(out + ".tmp", out)
    print("snapshot %s: step %d -> %s (%.1f MB)" % (src, ck["step"], out, os.path.getsize(out) / 1e6))


def folded_state(model):
    """The model's state dict (detached) with learned per-layer fusion weights folded into the experts'
    down projections: a * down(silu(gate x) * up x) == (a down)(silu(gate x) * up x), so the hybrid then runs
    with global fusion weights 1 (file_hparams). Other models: the state dict as it is."""
    sd = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith(".moe.fusion")}
    for i, layer in enumerate(model.model.layers):
        moe = getattr(layer, "moe", None)
        if moe is not None and moe.hp.get("fusion_learn"):
            a_tok, a_seg = moe.fusion.detach()
            sd["model.layers.%d.moe.tok_down" % i] = sd["model.layers.%d.moe.tok_down" % i] * a_tok
            if moe.hp["n_seg"]:
                sd["model.layers.%d.moe.seg_down" % i] = sd["model.layers.%d.moe.seg_down" % i] * a_seg
    return sd


def file_hparams(model, mode_default="causal"):
    """reference_moe.HybridParams of a hybrid model as its export writes them (fusion folded: 1 / 1)."""
    import reference_moe as rm
    hpd = model.model.layers[0].moe.hp
    fl = hpd.get("fusion_learn")
    return rm.HybridParams(hpd["n_tok"], hpd["k_used"], hpd["shared"], model.cfg.intermediate_size, hpd["n_seg"],
                           hpd["window"], hpd["pooling"], hpd["capacity"], hpd["bucket"], hpd["gate_scale"],
                           1.0 if fl else hpd["a_tok"], (1.0 if hpd["n_seg"] else 0.0) if fl else hpd["a_seg"],
                           mode_default, hpd.get("route", "prefix"))


def cmd_check(args):
    """This module's forward == reference.Model / reference_moe.HybridModel (float64) on random weights."""
    import reference_moe as rm
    torch.manual_seed(0)
    arch = dict(DEFAULT_ARCH, vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    m = LM(make_config(arch)).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-trivial norms and biases
    toks = torch.randint(0, 300, (1, 30))  # not a multiple of the window (4): the padded last window
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    want = ref.Model(m.cfg, sd).forward(toks[0].tolist())
    got = m(toks)[0]
    e1 = float((got - want).abs().max())
    dense = {k: v.clone() for k, v in m.state_dict().items()}
    e2 = {}
    for exp, stage in (("v1", "moe"), ("lowres", "moe"), ("lowres", "moe_mean"), ("lowres", "moe_prev"),
                       ("lowres", "moe_noshared")):
        m = LM(make_config(arch)).double()
        m.load_state_dict(dense)
        build_variant(m, stage, 32, None, moe_params(stage, 32, exp))
        m.double()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".moe." in n:
                    p.add_(0.05 * torch.randn_like(p))  # learned fusion weights too: (1.05.., 0.05..)
        hm = rm.HybridModel(m.cfg, file_hparams(m), folded_state(m))
        want = hm.forward_traced(toks[0].tolist(), "causal")[0]
        e2["%s/%s" % (exp, stage)] = float((m(toks)[0] - want).abs().max())
    print("check: dense max|diff| %.2e, hybrid (causal) max|diff| %s" % (
        e1, ", ".join("%s %.2e" % kv for kv in e2.items())))
    assert e1 < 1e-12 and max(e2.values()) < 1e-12


POST_STAGES = ["dense_cont", "lora", "mole", "moe", "moe_noseg", "moe_noshared", "moe_mean", "moe_prev"]


def cmd_selftest(args):
    """The tools-side checks the test suite runs (cheap, no data): `check`, and that every post stage of the
    lowres experiment starts exactly at the base (held-out loss at step 0 == the base's) on a tiny model."""
    cmd_check(args)
    torch.set_num_threads(1)
    for stage in POST_STAGES:
        base, start = upcycle_start_loss(stage, 16, None)
        d = abs(base["random"] - start["random"])
        print("selftest: %-12s step-0 loss %.6f, base %.6f, |diff| %.1e" % (stage, start["random"], base["random"], d))
        assert d < 1e-5, stage
    # and that the v1 upcycle did not (the fixed 0.7 / 0.3 fusion): the check above can fail
    hp = moe_params("moe", 16, "v1")
    torch.manual_seed(0)
    arch = dict(DEFAULT_ARCH, vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    model = LM(make_config(arch))
    x = torch.randint(0, 300, (2, 33))
    hb = {"random": (x[:, :-1], x[:, 1:])}
    b = evaluate(model, hb, "base", digits=None)["random"]
    build_variant(model, "moe", 16, None, hp)
    v1 = evaluate(model, hb, "moe", digits=None)["random"]
    print("selftest: v1 moe step-0 loss %.6f vs base %.6f (not function-preserving, as documented)" % (v1, b))
    assert abs(v1 - b) > 1e-4


def cmd_eval(args):
    torch.set_num_threads(args.threads)
    model, ck = load_model(args.stage)
    hb = heldout_batches(LANGS, ck["meta"]["ctx"], args.eval_seqs)
    print(json.dumps({"stage": args.stage, "step": ck["step"], "heldout_loss": evaluate(model, hb, args.stage)}))


HEX_LANGS = ["python", "java", "cpp", "rust", "go", "js"]  # HumanEval-X has no Ruby


def humaneval_x(lang):
    import gzip
    with gzip.open(os.path.join(corpus.HUMANEVAL_X, "humaneval_%s.jsonl.gz" % lang), "rt", encoding="utf-8") as fh:
        return [json.loads(l) for l in fh]


@torch.no_grad()
def solution_nll(model, enc, stage, lang, ctx, n):
    """Mean NLL per token of HumanEval-X canonical solutions given their prompts (the last ctx tokens of
    prompt + solution; loss on the solution's tokens only). The paper's pass@1 at this scale would be ~0
    everywhere; this is the per-language number that still moves. Solutions are evaluation data only."""
    tot, cnt = 0.0, 0
    for ex in humaneval_x(lang)[:n]:
        p, sol = enc.encode(ex["prompt"]), enc.encode(ex["canonical_solution"])
        seq = (p + sol)[-(ctx + 1):]
        k = min(len(sol), len(seq) - 1)
        x = torch.as_tensor([seq[:-1]])
        if stage == "mole":
            set_mole_sets(model, [lang], x.shape[1])
        lp = torch.log_softmax(model(x)[0].double(), -1)
        tgt = torch.as_tensor(seq[1:])
        nll = -lp[torch.arange(len(tgt)), tgt]
        tot += float(nll[-k:].sum())
        cnt += k
    return round(tot / max(cnt, 1), 4)


@torch.no_grad()
def reference_mode_loss(model, hb, n):
    """Held-out loss with the segment level in `reference` mode (non-causal expert choice within one
    sequence, docs/model-format.md), run by reference_moe.HybridModel itself (float32): the gap to the causal
    loss on the same weights is the number worth publishing beside it. n sequences per language."""
    import reference_moe as rm
    hm = rm.HybridModel(model.cfg, file_hparams(model), {k: v.float() for k, v in folded_state(model).items()},
                        dtype=torch.float32)
    res = {}
    for l, (x, y) in hb.items():
        tot, cnt = 0.0, 0
        for i in range(min(n, len(x))):
            lg = hm.forward_traced(x[i].tolist(), "reference")[0]
            tot += float(Fn.cross_entropy(lg, y[i], reduction="sum"))
            cnt += y[i].numel()
        res[l] = round(tot / cnt, 4)
    return res


def cmd_results(args):
    """Per stage: held-out loss per language and HumanEval-X solution NLL per language, into
    <root>/results/<stage>.json and one table on stdout (markdown)."""
    import train_tokenizer as tt
    torch.set_num_threads(args.threads)
    enc = tt.Encoder.load(os.path.join(args.tokenizer, "tokenizer.json"))
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    rows = []
    for stage in args.stages.split(","):
        try:
            model, ck = load_model(stage)
        except StopIteration:
            continue
        model.eval()
        ctx = ck["meta"]["ctx"]
        hb = heldout_batches(LANGS[:6], ctx, args.eval_seqs)
        res = {"stage": stage, "step": ck["step"], "heldout": evaluate(model, hb, stage),
               "humaneval_x_nll": {l: solution_nll(model, enc, stage, l, ctx, args.n) for l in HEX_LANGS}}
        if stage in ("moe", "moe_noshared"):
            res["heldout_reference_mode"] = reference_mode_loss(model, hb, args.ref_seqs)
        with open(os.path.join(ROOT, "results", stage + ".json"), "w") as fh:
            json.dump(res, fh, indent=1)
        rows.append(res)
    print("| stage | step | " + " | ".join("held-out %s" % l for l in LANGS[:6]) + " | " +
          " | ".join("HEX %s" % l for l in HEX_LANGS) + " |")
    for r in rows:
        print("| %s | %d | " % (r["stage"], r["step"]) + " | ".join("%.3f" % r["heldout"][l] for l in LANGS[:6]) +
              " | " + " | ".join("%.3f" % r["humaneval_x_nll"][l] for l in HEX_LANGS) + " |")


def tokenizer_kv(w, tok_dir):
    """Tokenizer metadata as `codemoe convert` writes it (qwen2 pre-tokenizer, specials as control)."""
    import gguf
    with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as fh:
        j = json.load(fh)
    n = len(j["model"]["vocab"]) + len(j["added_tokens"])
    toks, types = [None] * n, [1] * n
    for t, i in j["model"]["vocab"].items():
        toks[i] = t
    for t in j["added_tokens"]:
        toks[t["id"]], types[t["id"]] = t["content"], 3
    ids = {t: i for i, t in enumerate(toks)}
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen2")
    w.add_array("tokenizer.ggml.tokens", toks, gguf.VT.STRING)
    w.add_array("tokenizer.ggml.token_type", types, gguf.VT.INT32)
    w.add_array("tokenizer.ggml.merges", j["model"]["merges"], gguf.VT.STRING)
    w.add_uint32("tokenizer.ggml.eos_token_id", ids["<|endoftext|>"])
    w.add_uint32("tokenizer.ggml.padding_token_id", ids["<|fim_pad|>"])
    w.add_uint32("tokenizer.ggml.fim_pre_token_id", ids["<|fim_prefix|>"])
    w.add_uint32("tokenizer.ggml.fim_suf_token_id", ids["<|fim_suffix|>"])
    w.add_uint32("tokenizer.ggml.fim_mid_token_id", ids["<|fim_middle|>"])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    return n


def cmd_export(args):
    """Checkpoint -> GGUF: qwen2 (dense, lora merged, dense_cont), multipl_moe or mole (docs/model-format.md;
    mole's base is llama, so q/k are permuted on the way out)."""
    import gguf
    model, ck = load_model(args.stage, args.ckpt)
    meta, c = ck["meta"], model.cfg
    stage = meta.get("stage", args.stage)  # --stage may name a run (tools/runs.py)
    arch = "multipl_moe" if stage.startswith("moe") else "mole" if stage == "mole" else "qwen2"
    ttype = {"f32": gguf.GGMLType.F32, "f16": gguf.GGMLType.F16, "q8_0": gguf.GGMLType.Q8_0}[args.type]
    w = gguf.GGUFWriter(args.out)
    w.add_string("general.architecture", arch)
    w.add_string("general.name", "codemoe-%s" % stage)
    w.add_uint32("general.file_type", {gguf.GGMLType.F32: 0, gguf.GGMLType.F16: 1, gguf.GGMLType.Q8_0: 7}[ttype])
    w.add_uint32(arch + ".context_length", meta["ctx"] * 8)
    w.add_uint32(arch + ".embedding_length", c.hidden_size)
    w.add_uint32(arch + ".block_count", c.num_hidden_layers)
    w.add_uint32(arch + ".feed_forward_length", c.intermediate_size)
    w.add_uint32(arch + ".attention.head_count", c.num_attention_heads)
    w.add_uint32(arch + ".attention.head_count_kv", c.num_key_value_heads)
    w.add_float32(arch + ".attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(arch + ".rope.freq_base", c.rope_theta)
    w.add_uint32(arch + ".rope.dimension_count", c.head_dim)
    if arch == "multipl_moe":
        hp = meta["moe"]
        route = hp.get("route", "prefix")
        if route not in ("prefix", "previous"):
            sys.exit("export: route %r is not in the GGUF format (segment.route: \"prefix\" or \"previous\")" % route)
        w.add_uint32(arch + ".expert_count", hp["n_tok"])
        w.add_uint32(arch + ".expert_used_count", hp["k_used"])
        w.add_int32(arch + ".expert_shared_index", hp["shared"])
        w.add_uint32(arch + ".expert_feed_forward_length", c.intermediate_size)
        w.add_uint32(arch + ".segment.expert_count", hp["n_seg"])
        w.add_uint32(arch + ".segment.window", hp["window"])
        w.add_string(arch + ".segment.pooling", hp["pooling"])
        w.add_float32(arch + ".segment.capacity", hp["capacity"])
        w.add_uint32(arch + ".segment.bucket", hp["bucket"])
        w.add_float32(arch + ".segment.gate_scale", hp["gate_scale"])
        # learned per-layer fusion weights are folded into the experts' down projections (below): the file's
        # global weights are then 1 (or 0 where a level is absent)
        fl = hp.get("fusion_learn")
        w.add_float32(arch + ".fusion.token", 1.0 if fl else hp["a_tok"])
        w.add_float32(arch + ".fusion.segment", (1.0 if hp["n_seg"] else 0.0) if fl else hp["a_seg"])
        w.add_string(arch + ".segment.mode_default", "causal")
        if route != "prefix":  # absent means "prefix": the files of the default route are unchanged
            w.add_string(arch + ".segment.route", route)
    if arch == "mole":
        mo = meta["mole"]
        w.add_uint32(arch + ".vocab_size", c.vocab_size)
        w.add_array(arch + ".adapter.names", mo["names"], gguf.VT.STRING)
        w.add_array(arch + ".adapter.ranks", mo["ranks"], gguf.VT.UINT32)
        w.add_array(arch + ".adapter.alphas", mo["alphas"], gguf.VT.FLOAT32)
        w.add_int32(arch + ".adapter.shared", mo["shared"])
        w.add_int32(arch + ".adapter.fallback", mo["fallback"])
    tokenizer_kv(w, args.tokenizer)
    sd = {k: v.float() for k, v in folded_state(model).items() if ".lora." not in k}
    lora = {}
    if arch == "mole":  # LoRA tensors (F32: rows of length r are not Q8_0 blocks), names per model-format.md
        for k, v in model.state_dict().items():
            if ".lora." in k:
                _, _, i, _, proj, _, name, ab = k.split(".")  # model.layers.i.mlp.gate_proj.lora.<name>.A
                lora["blk.%s.ffn_%s.lora_%s.%s" % (i, proj[:-5], ab.lower(), name)] = v.detach().float().numpy()
    if stage == "lora":
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear) and "all" in m.lora:
                sd[name + ".weight"] = m.merged(["all"]).float()
    for k in list(sd):
        v = sd[k].numpy()
        if ".moe." in k:
            i, what = k.split(".")[2], k.split(".")[-1]
            kind, proj = what.split("_")
            names = {("tok", "router"): "ffn_gate_inp", ("seg", "router"): "ffn_gate_inp_seg",
                     ("tok", "gate"): "ffn_gate_exps", ("tok", "up"): "ffn_up_exps", ("tok", "down"): "ffn_down_exps",
                     ("seg", "gate"): "ffn_gate_seg_exps", ("seg", "up"): "ffn_up_seg_exps",
                     ("seg", "down"): "ffn_down_seg_exps"}
            g = "blk.%s.%s.weight" % (i, names[(kind, proj)])
            tt = gguf.GGMLType.F32 if proj == "router" else ttype
        else:
            g = ref.hf_to_gguf_name(k)
            tt = gguf.GGMLType.F32 if v.ndim == 1 else ttype
            if arch == "mole" and (".q_proj." in k or ".k_proj." in k):
                # mole's base is llama: q/k rows (and biases) permuted as llama.cpp converts llama, so the
                # engine's adjacent-pair rope equals the NeoX rope this model was trained with
                v = ref.llama_permute(v, c.num_attention_heads if ".q_proj." in k else c.num_key_value_heads)
        if tt == gguf.GGMLType.Q8_0 and v.shape[-1] % 32:
            tt = gguf.GGMLType.F16
        w.add_tensor(g, np.ascontiguousarray(v, dtype=np.float32), tt)
    for g, v in lora.items():
        w.add_tensor(g, np.ascontiguousarray(v, dtype=np.float32), gguf.GGMLType.F32)
    w.write()
    print("wrote %s (%s, %s, %.1f MiB)" % (args.out, arch, args.type, os.path.getsize(args.out) / 2**20),
          file=sys.stderr)


def cmd_verify(args):
    """The exported GGUF, run by the engine (`codemoe complete`, greedy), continues a prompt exactly like
    this module's model in float64 (dense stages; multipl_moe when the engine has it)."""
    import subprocess
    import train_tokenizer as tt
    model, ck = load_model(args.stage)
    model = model.double().eval()
    enc = tt.Encoder.load(os.path.join(args.tokenizer, "tokenizer.json"))
    eot = enc.tok.ids["<|endoftext|>"]
    bad = 0
    for prompt in ("def fibonacci(n):\n    ", "fn main() {\n    let ", "public static void main(String[] args) {\n",
                   "func (s *Server) ", "#include <vector>\n\nint main() {\n"):
        toks = enc.encode(prompt)
        with torch.no_grad():
            for _ in range(args.n_predict):
                nxt = int(torch.argmax(model(torch.as_tensor([toks]))[0, -1]))
                if nxt == eot:
                    break
                toks.append(nxt)
        want = enc.decode(toks[len(enc.encode(prompt)):])
        r = subprocess.run([args.codemoe, "complete", "--model", args.gguf, "--prompt", prompt, "--temperature", "0",
                            "-n", str(args.n_predict), "--threads", "1"], capture_output=True, text=True)
        got = r.stdout
        ok = r.returncode == 0 and got == want
        bad += not ok
        print("%s %r\n   python %r\n   engine %r%s" % ("ok  " if ok else "DIFF", prompt, want, got,
              "" if r.returncode == 0 else " (rc %d: %s)" % (r.returncode, r.stderr.strip()[-200:])))
    sys.exit(1 if bad else 0)


def gguf_state(path, cfg):
    """An exported GGUF read back: (reader, architecture, state dict in this module's names, float64). The
    experts' tensors get the .moe.* names, LoRA's the .lora.* ones; mole's q/k are un-permuted."""
    import gguf
    r = gguf.GGUFReader(path)
    a = r.get("general.architecture")
    back = {}
    inv = {"ffn_gate_inp": ("tok", "router"), "ffn_gate_inp_seg": ("seg", "router"), "ffn_gate_exps": ("tok", "gate"),
           "ffn_up_exps": ("tok", "up"), "ffn_down_exps": ("tok", "down"), "ffn_gate_seg_exps": ("seg", "gate"),
           "ffn_up_seg_exps": ("seg", "up"), "ffn_down_seg_exps": ("seg", "down")}
    for n, t in r.tensors.items():
        v = t.dequantize().astype(np.float64)
        parts = n.split(".")
        if ".lora_" in n:
            _, i, ffn, ab, an = parts
            back["model.layers.%s.mlp.%s_proj.lora.%s.%s" % (i, ffn[4:], an, ab[5:].upper())] = v
        elif len(parts) == 4 and parts[2] in inv:
            kind, proj = inv[parts[2]]
            back["model.layers.%s.moe.%s_%s" % (parts[1], kind, proj)] = v
        else:
            hn = ref.gguf_to_hf_name(n)
            if a == "mole" and (".q_proj." in hn or ".k_proj." in hn):
                v = ref.llama_unpermute(v, cfg.num_attention_heads if ".q_proj." in hn else cfg.num_key_value_heads)
            back[hn] = v
    return r, a, back


def cmd_readback(args):
    """Read an exported GGUF back, map it to the references' names (undo the llama permutation for mole)
    and compare reference.Model / reference_moe.HybridModel (causal) / reference_moe.MoLEModel logits on
    held-out tokens with this module's model (float64). Checks the file layout without the engine."""
    import reference_moe as rm
    model, ck = load_model(args.stage)
    model = model.double().eval()
    c = model.cfg
    r, a, back = gguf_state(args.gguf, c)
    s = np.fromfile(tok_path("python", "heldout"), dtype=np.uint16)[:args.n_tokens].astype(np.int64).tolist()
    with torch.no_grad():
        if ck["meta"].get("stage", args.stage) == "mole":
            set_mole_sets(model, ["python"], len(s))
        want = model(torch.as_tensor([s]))[0]
    if a == "qwen2":
        got = ref.Model(c, back).forward(s)
    elif a == "multipl_moe":
        hp = rm.HybridParams(r.get(a + ".expert_count"), r.get(a + ".expert_used_count"),
                             r.get(a + ".expert_shared_index"), r.get(a + ".expert_feed_forward_length"),
                             r.get(a + ".segment.expert_count"), r.get(a + ".segment.window"),
                             r.get(a + ".segment.pooling"), r.get(a + ".segment.capacity"), r.get(a + ".segment.bucket"),
                             r.get(a + ".segment.gate_scale"), r.get(a + ".fusion.token"), r.get(a + ".fusion.segment"),
                             "causal", r.get(a + ".segment.route") or "prefix")
        got = rm.HybridModel(c, hp, back).forward_traced(s, "causal")[0]
    else:
        mp = rm.MoLEParams(r.get(a + ".adapter.names"), [int(x) for x in r.get(a + ".adapter.ranks")],
                           [float(x) for x in r.get(a + ".adapter.alphas")], r.get(a + ".adapter.shared"),
                           r.get(a + ".adapter.fallback"))
        lcfg = ref.Config("llama", c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                          c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps, c.rope_theta,
                          c.tie_word_embeddings, c.max_position_embeddings, attention_bias=True)
        py = mp.names.index("python")
        got = rm.MoLEModel(lcfg, mp, back).forward_sets(s, [[py, mp.shared]] * len(s))
    d = float((got - want).abs().max())
    print("readback %s (%s): max|logit diff| %.3g over %d tokens" % (args.gguf, a, d, len(s)))
    if d > args.tol:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("tokenize", "train", "export", "eval", "speed", "check", "verify", "snapshot", "readback",
                 "results", "selftest"):
        p = sub.add_parser(name)
        p.add_argument("--stage", default="base")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--tokenizer", default=os.path.join(ROOT, "tokenizer"))
        p.add_argument("--corpus", default=os.path.join(ROOT, "corpus"))
        p.add_argument("--ctx", type=int, default=256)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--eval-seqs", type=int, default=8)
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size"):
            p.add_argument("--" + k.replace("_", "-"), dest=k, type=int, default=None)
        if name == "tokenize":
            p.add_argument("--train-mb", type=float, default=8.0)
            p.add_argument("--heldout-mb", type=float, default=0.5)
            p.add_argument("--force", action="store_true")
        if name == "train":
            p.add_argument("--tokens", type=int, default=4_000_000)
            p.add_argument("--lr", type=float, default=1.5e-3)
            p.add_argument("--fim", type=float, default=0.5)
            p.add_argument("--alpha", type=float, default=0.01)
            p.add_argument("--seed", type=int, default=1234)
            p.add_argument("--ckpt-min", type=float, default=10.0)
            p.add_argument("--log-every", type=int, default=10)
            p.add_argument("--eval-every", type=int, default=0, help="steps; 0: every 10%% of the budget")
            p.add_argument("--run", default=None, help="run name (checkpoint/log folder); default the stage")
            p.add_argument("--fusion-lr-mult", type=float, default=20.0)
            p.add_argument("--init", default=None, help="weights-only snapshot to start from when there is "
                           "no latest.pt (default models/checkpoints/<stage>.pt if it exists)")
        if name == "export":
            p.add_argument("--out", required=True)
            p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"])
            p.add_argument("--ckpt", default=None)
        if name == "verify":
            p.add_argument("--gguf", required=True)
            p.add_argument("--n-predict", type=int, default=24)
            p.add_argument("--codemoe", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                             "build-data", "server", "codemoe"))
        if name == "readback":
            p.add_argument("--gguf", required=True)
            p.add_argument("--n-tokens", type=int, default=40)
            p.add_argument("--tol", type=float, default=1e-4, help="1e-4 for f32 files; ~0.5 for q8_0")
        if name == "results":
            p.add_argument("--stages", default="base,moe,moe_noseg,moe_noshared,dense_cont,lora,mole")
            p.add_argument("--n", type=int, default=164, help="HumanEval-X problems per language")
            p.add_argument("--ref-seqs", type=int, default=4, help="sequences per language, reference mode")
        if name == "snapshot":
            p.add_argument("--out", default=None)
            p.add_argument("--with-opt", action="store_true", help="keep AdamW's moments (bfloat16)")
        if name == "speed":
            p.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    {"tokenize": cmd_tokenize, "train": cmd_train, "export": cmd_export, "eval": cmd_eval,
     "speed": cmd_speed, "check": cmd_check, "verify": cmd_verify, "snapshot": cmd_snapshot,
     "readback": cmd_readback, "results": cmd_results, "selftest": cmd_selftest}[args.cmd](args)


if __name__ == "__main__":
    main()
