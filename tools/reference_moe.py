"""reference_moe.py - PyTorch references of the three mixture-of-experts FFNs codemoe serves, plugged into
reference.Model in place of the dense SwiGLU FFN (the attention part is unchanged):

(a) MultiPL-MoE hybrid FFN (arch "multipl_moe", base Qwen2: NeoX rope, q/k/v bias), exactly as
    docs/model-format.md (multipl_moe) fixes it:
      y = a_tok * y_tok + a_seg * y_seg
    token level: p = softmax(W_tok x) over ALL N_tok experts; the top-(k-1) non-shared experts by p plus
      the shared one; gates p_i / sum(p over the selected); y_tok = sum g_i E_i(x).
    segment level, mode "reference" (one request, non-causal expert choice): windows of w tokens from
      position 0 (ragged tail < w dropped); descriptor = element-wise max or mean of the window's FFN
      inputs; q = softmax(W_seg desc) (P, N_seg); K = floor(P * capacity / N_seg); experts in index order
      each take, from the segments ranked by their q (highest first, ties: lower segment index), the first
      K segments that fewer than `bucket` experts have taken so far (fewer if none are left); every token
      of a taken segment gets gate q_e(seg) * gate_scale for expert e.
    segment level, mode "causal": token t in window s = t // w pools x[s*w .. t] (prefix max or mean);
      q_t = softmax(W_seg desc_t); top-c experts by q_t (c = max(1, floor(capacity)); ties: lower expert
      index) with gate q_e * gate_scale. Every token is routed (no tail rule: the future is unknown).
      route "previous" (tools/train.py's moe_prev; GGUF segment.route = "previous"): every token of window
      s >= 1 is routed as above but with the pool of the whole window s-1, so a window's experts are
      chosen before it is read; window 0 gets no segment expert.
    Each expert is a SwiGLU FFN: down(silu(gate x) * up x), its own (F_exp) width.
(b) MoLE (arch "mole", base Llama): LoRA experts on gate/up/down only:
      W' x = W x + sum over the token's adapter set a of (alpha_a / sqrt(r_a)) * B_a (A_a x)
    The per-token adapter sets are an input (a list of adapter indices per token).
(c) sparse MoE (arch "qwen3moe", HF Qwen3MoeForCausalLM as its modelling defines it; Qwen3 attention with
    per-head q/k norms): p = softmax(router x) over ALL experts; the top k by p (ties: lower index); with
    norm_topk_prob (every Qwen3-MoE config; llama.cpp's qwen3moe always) their weights p_i / sum(p over the
    k); y = sum w_i E_i(x), E_i a SwiGLU of width moe_intermediate_size. No shared expert, no segments.

The FFNs record their routing decisions per layer in `.trace` so the C engine can be compared exactly,
and the smallest decision margin (`.min_margin`, as a log-probability gap), so a fixture can be rejected
when float32 rounding in C could flip a decision.
"""

import math

import torch

import reference as ref

silu = torch.nn.functional.silu


def swiglu(x, g, u, d):
    # x (T, D); g, u (F, D); d (D, F)
    return (silu(x @ g.T) * (x @ u.T)) @ d.T


def stable_desc(v):
    """Indices of v (1-D) by value descending, ties by lower index (the order C must use too)."""
    return sorted(range(v.shape[0]), key=lambda i: (-float(v[i]), i))


# ============================================================================ hybrid (MultiPL-MoE)

class HybridParams:
    """The multipl_moe.* hyper-parameters (see docs/model-format.md)."""

    def __init__(self, n_tok, k_used, shared, f_exp, n_seg, window, pooling, capacity, bucket, gate_scale,
                 a_tok, a_seg, mode_default="causal", route="prefix"):
        assert pooling in ("max", "mean") and mode_default in ("causal", "reference")
        assert route in ("prefix", "previous")
        self.route = route
        assert -1 <= shared < n_tok and 1 <= k_used <= n_tok
        self.n_tok, self.k_used, self.shared, self.f_exp = n_tok, k_used, shared, f_exp
        self.n_seg, self.window, self.pooling, self.capacity = n_seg, window, pooling, capacity
        self.bucket, self.gate_scale, self.a_tok, self.a_seg = bucket, gate_scale, a_tok, a_seg
        self.mode_default = mode_default


def hybrid_shapes(cfg, hp):
    """Per-layer MoE weight names (reference naming) -> shapes."""
    D, Fe = cfg.hidden_size, hp.f_exp
    s = {}
    for i in range(cfg.num_hidden_layers):
        p = "model.layers.%d.moe." % i
        s[p + "tok_router"] = (hp.n_tok, D)
        s[p + "tok_gate"] = (hp.n_tok, Fe, D)
        s[p + "tok_up"] = (hp.n_tok, Fe, D)
        s[p + "tok_down"] = (hp.n_tok, D, Fe)
        s[p + "seg_router"] = (hp.n_seg, D)
        s[p + "seg_gate"] = (hp.n_seg, Fe, D)
        s[p + "seg_up"] = (hp.n_seg, Fe, D)
        s[p + "seg_down"] = (hp.n_seg, D, Fe)
    return s


class HybridFFN:
    """ffn(layer, x (T, D) normed FFN input of ONE request, tokens) -> (T, D)."""

    def __init__(self, hp, weights, dtype=torch.float64, mode=None):
        self.hp = hp
        self.mode = mode or hp.mode_default
        self.w = {k: torch.as_tensor(v).to(dtype) for k, v in weights.items()}
        self.reset()

    def reset(self):
        self.trace = {}  # layer -> {"token_experts", "token_gates", "segment_*"}
        self.min_margin = float("inf")

    def _margin(self, hi, lo):
        """Record a decision hi >= lo between two probabilities. Measured as log(hi) - log(lo): a relative
        gap, the same as the router-logit gap within one softmax, and what float32 rounding perturbs."""
        self.min_margin = min(self.min_margin, float(torch.log(hi) - torch.log(lo)))

    def token_level(self, i, x):
        hp = self.hp
        p = torch.softmax(x @ self.w["model.layers.%d.moe.tok_router" % i].T, dim=-1)  # (T, N_tok)
        y = torch.zeros_like(x)
        ids, gates = [], []
        n_pick = hp.k_used - 1 if hp.shared >= 0 else hp.k_used
        for t in range(x.shape[0]):
            order = [e for e in stable_desc(p[t]) if e != hp.shared]
            sel = order[:n_pick]
            if 0 < n_pick < len(order):
                self._margin(p[t, order[n_pick - 1]], p[t, order[n_pick]])
            if hp.shared >= 0:
                sel = sel + [hp.shared]
            g = p[t, sel] / p[t, sel].sum()
            for e, ge in zip(sel, g):
                y[t] += ge * self.expert(i, "tok", e, x[t:t + 1])[0]
            ids.append(sel)
            gates.append([float(v) for v in g])
        return y, ids, gates

    def expert(self, i, kind, e, x):
        p = "model.layers.%d.moe.%s_" % (i, kind)
        return swiglu(x, self.w[p + "gate"][e], self.w[p + "up"][e], self.w[p + "down"][e])

    def pool(self, x):
        return x.max(dim=0).values if self.hp.pooling == "max" else x.mean(dim=0)

    def segment_reference(self, i, x):
        hp = self.hp
        T, w = x.shape[0], hp.window
        P = T // w
        y = torch.zeros_like(x)
        choice = [[] for _ in range(hp.n_seg)]
        if P == 0:
            return y, choice, None
        desc = torch.stack([self.pool(x[s * w:(s + 1) * w]) for s in range(P)])  # (P, D)
        q = torch.softmax(desc @ self.w["model.layers.%d.moe.seg_router" % i].T, dim=-1)  # (P, N_seg)
        K = int(math.floor(P * hp.capacity / hp.n_seg))
        taken = [0] * P
        for e in range(hp.n_seg):
            avail = [s for s in stable_desc(q[:, e]) if taken[s] < hp.bucket]
            choice[e] = avail[:K]
            for s in choice[e]:
                taken[s] += 1
            if 0 < K < len(avail):
                self._margin(q[avail[K - 1], e], q[avail[K], e])
        for e in range(hp.n_seg):
            for s in choice[e]:
                xs = x[s * w:(s + 1) * w]
                y[s * w:(s + 1) * w] += (q[s, e] * hp.gate_scale) * self.expert(i, "seg", e, xs)
        return y, choice, q

    def segment_causal(self, i, x):
        hp = self.hp
        T, w = x.shape[0], hp.window
        c = max(1, int(math.floor(hp.capacity)))
        y = torch.zeros_like(x)
        ids = []
        W = self.w["model.layers.%d.moe.seg_router" % i]
        for t in range(T):
            s0 = (t // w) * w
            if self.hp.route == "previous":
                if s0 == 0:
                    ids.append([])
                    continue
                q = torch.softmax(self.pool(x[s0 - w:s0]) @ W.T, dim=-1)
            else:
                q = torch.softmax(self.pool(x[s0:t + 1]) @ W.T, dim=-1)  # (N_seg)
            order = stable_desc(q)
            sel = order[:c]
            if c < len(order):
                self._margin(q[order[c - 1]], q[order[c]])
            for e in sel:
                y[t] += (q[e] * hp.gate_scale) * self.expert(i, "seg", e, x[t:t + 1])[0]
            ids.append(sel)
        return y, ids

    def __call__(self, i, x, tokens=None):
        hp = self.hp
        y_tok, tok_ids, tok_gates = self.token_level(i, x)
        tr = {"token_experts": tok_ids, "token_gates": tok_gates}
        if self.mode == "reference":
            y_seg, choice, _ = self.segment_reference(i, x)
            tr["segment_choice"] = choice
        else:
            y_seg, seg_ids = self.segment_causal(i, x)
            tr["segment_experts"] = seg_ids
        self.trace[i] = tr
        return hp.a_tok * y_tok + hp.a_seg * y_seg


class HybridModel(ref.Model):
    """reference.Model with the hybrid FFN in every layer. state: HF-named base weights without mlp.*,
    plus the hybrid_shapes() weights."""

    def __init__(self, cfg, hp, state, dtype=torch.float64, mode=None):
        moe = {k: v for k, v in state.items() if ".moe." in k}
        base = {k: v for k, v in state.items() if ".moe." not in k}
        for k, shp in hybrid_shapes(cfg, hp).items():
            if tuple(moe[k].shape) != shp:
                raise ValueError("%s: shape %s, expected %s" % (k, tuple(moe[k].shape), shp))
        self.moe = HybridFFN(hp, moe, dtype, mode)
        super().__init__(cfg, base, dtype, ffn=self.moe)

    def forward_traced(self, tokens, mode):
        """(logits, routing per layer, min decision margin) for one request in `mode`."""
        self.moe.mode = mode
        self.moe.reset()
        lg = self.forward(tokens)
        return lg, [self.moe.trace[i] for i in range(self.cfg.num_hidden_layers)], self.moe.min_margin


# ============================================================================ sparse (Qwen3-MoE)

class SparseParams:
    """The qwen3moe.* hyper-parameters: expert_count, expert_used_count, expert_feed_forward_length."""

    def __init__(self, n_experts, k_used, f_exp, norm_topk_prob=True):
        assert 1 <= k_used <= n_experts
        self.n_experts, self.k_used, self.f_exp, self.norm_topk_prob = n_experts, k_used, f_exp, norm_topk_prob


def sparse_shapes(cfg, sp):
    """Per-layer MoE weights with HF's names (Qwen3MoeSparseMoeBlock: mlp.gate, mlp.experts.<e>.*) -> shapes."""
    D, Fe = cfg.hidden_size, sp.f_exp
    s = {}
    for i in range(cfg.num_hidden_layers):
        p = "model.layers.%d.mlp." % i
        s[p + "gate.weight"] = (sp.n_experts, D)
        for e in range(sp.n_experts):
            q = p + "experts.%d." % e
            s[q + "gate_proj.weight"] = (Fe, D)
            s[q + "up_proj.weight"] = (Fe, D)
            s[q + "down_proj.weight"] = (D, Fe)
    return s


class SparseFFN:
    """ffn(layer, x (T, D), tokens) -> (T, D); records token_experts per layer in .trace and the smallest
    top-k decision gap (log p_k - log p_k+1) in .min_margin."""

    def __init__(self, sp, weights, dtype=torch.float64):
        self.sp = sp
        self.w = {k: torch.as_tensor(v).to(dtype) for k, v in weights.items()}
        self.reset()

    def reset(self):
        self.trace = {}
        self.min_margin = float("inf")

    def __call__(self, i, x, tokens=None):
        sp = self.sp
        p = "model.layers.%d.mlp." % i
        probs = torch.softmax(x @ self.w[p + "gate.weight"].T, dim=-1)  # (T, E)
        y = torch.zeros_like(x)
        ids = []
        for t in range(x.shape[0]):
            order = stable_desc(probs[t])
            sel = order[:sp.k_used]
            if sp.k_used < len(order):
                hi, lo = probs[t, order[sp.k_used - 1]], probs[t, order[sp.k_used]]
                self.min_margin = min(self.min_margin, float(torch.log(hi) - torch.log(lo)))
            wts = probs[t, sel]
            if sp.norm_topk_prob:
                wts = wts / wts.sum()
            for e, we in zip(sel, wts):
                q = p + "experts.%d." % e
                y[t] += we * swiglu(x[t:t + 1], self.w[q + "gate_proj.weight"], self.w[q + "up_proj.weight"],
                                    self.w[q + "down_proj.weight"])[0]
            ids.append(sel)
        self.trace[i] = {"token_experts": ids}
        return y


class SparseModel(ref.Model):
    """reference.Model (model_type "qwen3_moe") with the sparse FFN in every layer. state: HF-named base
    weights without the dense mlp.*, plus the sparse_shapes() weights."""

    def __init__(self, cfg, sp, state, dtype=torch.float64):
        moe = {k: v for k, v in state.items() if ".mlp." in k}
        for k, shp in sparse_shapes(cfg, sp).items():
            if tuple(moe[k].shape) != shp:
                raise ValueError("%s: shape %s, expected %s" % (k, tuple(moe[k].shape), shp))
        self.moe = SparseFFN(sp, moe, dtype)
        super().__init__(cfg, {k: v for k, v in state.items() if ".mlp." not in k}, dtype, ffn=self.moe)

    def forward_traced(self, tokens):
        """(logits, routing per layer, min decision margin)."""
        self.moe.reset()
        lg = self.forward(tokens)
        return lg, [self.moe.trace[i] for i in range(self.cfg.num_hidden_layers)], self.moe.min_margin


def gguf_sparse_ffn(tensors, k_used):
    """The qwen3moe FFN over GGUF-named tensors as llama.cpp stores them (ffn_gate_inp (E, D), stacked
    ffn_{gate,up}_exps (E, F, D), ffn_down_exps (E, D, F)), vectorised and written apart from SparseFFN,
    for reference.gguf_forward's ffn hook: the read-back check of a written file."""
    t = {k: torch.as_tensor(v).to(torch.float64) for k, v in tensors.items()}

    def ffn(i, x):
        b = "blk.%d." % i
        p = torch.softmax(x @ t[b + "ffn_gate_inp.weight"].T, -1)  # (T, E)
        top_w, top_i = torch.topk(p, k_used, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        g, u, d = t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"], t[b + "ffn_down_exps.weight"]
        y = torch.zeros_like(x)
        for j in range(k_used):
            e = top_i[:, j]
            h = silu(torch.einsum("tfd,td->tf", g[e], x)) * torch.einsum("tfd,td->tf", u[e], x)
            y = y + top_w[:, j:j + 1] * torch.einsum("tdf,tf->td", d[e], h)
        return y
    return ffn


# ============================================================================ MoLE

class MoLEParams:
    def __init__(self, names, ranks, alphas, shared=None, fallback=None):
        assert len(names) == len(ranks) == len(alphas)
        self.names, self.ranks, self.alphas = list(names), list(ranks), list(alphas)
        self.shared = shared      # index of the adapter added to every code token (or None)
        self.fallback = fallback  # index of the adapter for tokens outside code (or None)

    def scale(self, a):
        return self.alphas[a] / math.sqrt(self.ranks[a])


def mole_shapes(cfg, mp):
    """LoRA weight names -> shapes. A: (r, in), B: (out, r) for gate/up (in D, out F), down (in F, out D)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    s = {}
    for i in range(cfg.num_hidden_layers):
        for proj, (din, dout) in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D))):
            for a, (n, r) in enumerate(zip(mp.names, mp.ranks)):
                p = "model.layers.%d.mlp.%s_proj.lora.%s." % (i, proj, n)
                s[p + "A"] = (r, din)
                s[p + "B"] = (dout, r)
    return s


class MoLEFFN:
    def __init__(self, cfg, mp, state, dtype=torch.float64):
        self.mp = mp
        self.w = {k: torch.as_tensor(v).to(dtype) for k, v in state.items()}
        self.sets = None  # list (T) of adapter index lists; set before forward

    def proj(self, i, name, x, sets):
        p = "model.layers.%d.mlp.%s_proj." % (i, name)
        y = x @ self.w[p + "weight"].T
        for t, st in enumerate(sets):
            for a in st:
                q = p + "lora.%s." % self.mp.names[a]
                y[t] += self.mp.scale(a) * (self.w[q + "B"] @ (self.w[q + "A"] @ x[t]))
        return y

    def __call__(self, i, x, tokens=None):
        sets = self.sets
        assert sets is not None and len(sets) >= x.shape[0], "adapter sets must cover every token"
        sets = sets[:x.shape[0]]
        h = silu(self.proj(i, "gate", x, sets)) * self.proj(i, "up", x, sets)
        return self.proj(i, "down", h, sets)


class MoLEModel(ref.Model):
    """reference.Model (llama) with LoRA experts on the MLP. state: HF-named base weights (mlp.* included)
    plus the mole_shapes() weights."""

    def __init__(self, cfg, mp, state, dtype=torch.float64):
        for k, shp in mole_shapes(cfg, mp).items():
            if tuple(state[k].shape) != shp:
                raise ValueError("%s: shape %s, expected %s" % (k, tuple(state[k].shape), shp))
        super().__init__(cfg, {k: v for k, v in state.items() if ".lora." not in k}, dtype)
        self.mole = MoLEFFN(cfg, mp, {k: v for k, v in state.items() if k.startswith("model.layers.") and
                                      ".mlp." in k}, dtype)
        self.ffn = self.mole

    def forward_sets(self, tokens, sets):
        self.mole.sets = sets
        return self.forward(tokens)

    def generate_sets(self, prompt, sets, gen_set, n_predict):
        """Greedy; prompt tokens use `sets`, every generated token uses `gen_set`."""
        toks, s = list(prompt), list(sets)
        out, margin = [], float("inf")
        for _ in range(n_predict):
            last = self.forward_sets(toks, s)[-1]
            top2 = torch.topk(last, 2)
            margin = min(margin, float(top2.values[0] - top2.values[1]))
            nxt = int(torch.argmax(last))
            out.append(nxt)
            toks.append(nxt)
            s.append(list(gen_set))
        return out, margin


LANG_ALIASES = {"py": "python", "python3": "python", "rs": "rust", "js": "javascript", "c++": "cpp",
                "cs": "csharp", "c#": "csharp", "golang": "go"}


def mole_sets_from_fences(tok, tokens, mp):
    """A proposal for routing from the text (the server's job; the reference code has no detector),
    causal so it works for generated tokens too: a line whose text so far starts with ``` (after spaces)
    is a fence line; an opening fence ```lang starts a block of language lang (aliases above), the next
    fence closes it. A token is placed by its first byte: inside a block of a language that has an
    adapter -> [lang, shared]; anything else (prose, fence lines, unknown languages) -> [fallback]."""
    sets, text = [], b""
    in_block, lang, line_start = False, None, 0
    for t in tokens:
        b = tok.decode_bytes([t])
        fence_line = (text[line_start:] + b).lstrip(b" ").startswith(b"```")
        if in_block and not fence_line and lang in mp.names:
            st = [mp.names.index(lang)] + ([mp.shared] if mp.shared is not None else [])
        else:
            st = [mp.fallback] if mp.fallback is not None else []
        sets.append(st)
        text += b
        while b"\n" in text[line_start:]:  # a line is complete: update the block state
            nl = text.index(b"\n", line_start)
            line = text[line_start:nl].strip()
            if line.startswith(b"```"):
                if in_block:
                    in_block, lang = False, None
                else:
                    name = line[3:].strip().decode("utf-8", "replace").lower()
                    in_block, lang = True, LANG_ALIASES.get(name, name)
            line_start = nl + 1
    return sets


# ============================================================================ self-test

def _selftest():
    import numpy as np
    rng = np.random.default_rng(7)
    cfg = ref.Config("qwen2", 40, 32, 48, 2, 2, 1, 1e-6, 1e6, True, 64, 16)
    base = {k: (1 + 0.1 * rng.standard_normal(s) if "norm" in k else 0.15 * rng.standard_normal(s))
            for k, s in ref.hf_shapes(cfg).items()}
    dense = ref.Model(cfg, base)
    toks = list(rng.integers(0, 40, 19))
    want = dense.forward(toks)
    # 1. upcycling invariant: experts = copies of the dense FFN, a_tok = 1, a_seg = 0 -> the dense logits
    hp = HybridParams(4, 2, 3, 48, 3, 4, "max", 1.0, 2, 0.25, 1.0, 0.0)
    st = {k: v for k, v in base.items() if ".mlp." not in k}
    for i in range(2):
        m = "model.layers.%d.mlp." % i
        for kind, n in (("tok", hp.n_tok), ("seg", hp.n_seg)):
            for proj in ("gate", "up", "down"):
                st["model.layers.%d.moe.%s_%s" % (i, kind, proj)] = np.stack([base[m + proj + "_proj.weight"]] * n)
            st["model.layers.%d.moe.%s_router" % (i, kind)] = rng.standard_normal((n, 32))
    hm = HybridModel(cfg, hp, st)
    for mode in ("causal", "reference"):
        assert float((hm.forward_traced(toks, mode)[0] - want).abs().max()) < 1e-12
    # 2. causal mode: a prefix's logits are the first rows of the full sequence's (nothing looks ahead);
    #    reference mode is NOT causal (a window sees its future), so its prefix logits differ
    hp2 = HybridParams(4, 3, 0, 24, 3, 4, "mean", 2.0, 1, 1.0, 0.7, 0.3)
    for i in range(2):
        for kind, n in (("tok", hp2.n_tok), ("seg", hp2.n_seg)):
            st["model.layers.%d.moe.%s_gate" % (i, kind)] = 0.2 * rng.standard_normal((n, 24, 32))
            st["model.layers.%d.moe.%s_up" % (i, kind)] = 0.2 * rng.standard_normal((n, 24, 32))
            st["model.layers.%d.moe.%s_down" % (i, kind)] = 0.2 * rng.standard_normal((n, 32, 24))
    hm2 = HybridModel(cfg, hp2, st)
    full, tr, _ = hm2.forward_traced(toks, "causal")
    for n in (1, 5, 12):
        assert float((hm2.forward_traced(toks[:n], "causal")[0] - full[:n]).abs().max()) < 1e-12
    assert all(len(e) == 3 and e[-1] == 0 for e in tr[0]["token_experts"])  # top-2 non-shared + shared 0
    assert all(len(e) == 2 for e in tr[0]["segment_experts"])  # capacity 2 -> top-2
    rfull, rtr, _ = hm2.forward_traced(toks, "reference")
    assert float((hm2.forward_traced(toks[:12], "reference")[0] - rfull[:12]).abs().max()) > 1e-6
    # P = 4 windows, K = floor(4 * 2 / 3) = 2, bucket 1: 3 experts x 2 slots over 4 segments -> one short
    ch = rtr[0]["segment_choice"]
    assert [len(c) for c in ch] == [2, 2, 0] and len(set(sum(ch, []))) == 4
    # tail rule: tokens past the last full window get no segment output in reference mode
    assert float((hm2.forward_traced(toks[:3], "reference")[0] - hm2.forward_traced(toks[:3], "causal")[0])
                 .abs().max()) > 0  # causal routes them, reference does not
    # 3. MoLE: no adapters -> the base model; one adapter on every token -> the merged weights
    mp = MoLEParams(["python", "shared", "other"], [2, 4, 4], [2.0, 4.0, 3.0], shared=1, fallback=2)
    lcfg = ref.Config("llama", 40, 32, 48, 2, 2, 2, 1e-5, 1e4, False, 64, 16)
    lb = {k: (1 + 0.1 * rng.standard_normal(s) if "norm" in k else 0.15 * rng.standard_normal(s))
          for k, s in ref.hf_shapes(lcfg).items()}
    lst = dict(lb)
    for k, s in mole_shapes(lcfg, mp).items():
        lst[k] = 0.2 * rng.standard_normal(s)
    mm = MoLEModel(lcfg, mp, lst)
    ldense = ref.Model(lcfg, lb)
    assert float((mm.forward_sets(toks, [[]] * len(toks)) - ldense.forward(toks)).abs().max()) < 1e-12
    merged = dict(lb)
    for i in range(2):
        for proj in ("gate", "up", "down"):
            p = "model.layers.%d.mlp.%s_proj." % (i, proj)
            for a in (0, 1):
                q = p + "lora.%s." % mp.names[a]
                merged[p + "weight"] = merged[p + "weight"] + mp.scale(a) * (lst[q + "B"] @ lst[q + "A"])
    got = mm.forward_sets(toks, [[0, 1]] * len(toks))
    assert float((got - ref.Model(lcfg, merged).forward(toks)).abs().max()) < 1e-10
    # 4. sparse (Qwen3-MoE): every expert a copy of one FFN -> the dense model whatever the routing (the
    #    k weights sum to 1); routing as the vectorised GGUF-side FFN computes it; 8 experts, top 2
    qcfg = ref.Config("qwen3_moe", 40, 32, 48, 2, 2, 1, 1e-6, 1e6, False, 64, 24)
    qb = {k: (1 + 0.1 * rng.standard_normal(s) if "norm" in k else 0.15 * rng.standard_normal(s))
          for k, s in ref.hf_shapes(qcfg).items()}
    sp = SparseParams(8, 2, 48)
    qst = {k: v for k, v in qb.items() if ".mlp." not in k}
    for i in range(2):
        qst["model.layers.%d.mlp.gate.weight" % i] = rng.standard_normal((8, 32))
        for e in range(8):
            for proj in ("gate", "up", "down"):
                qst["model.layers.%d.mlp.experts.%d.%s_proj.weight" % (i, e, proj)] = \
                    qb["model.layers.%d.mlp.%s_proj.weight" % (i, proj)]
    sm = SparseModel(qcfg, sp, qst)
    lg, tr, _ = sm.forward_traced(toks)
    assert float((lg - ref.Model(qcfg, qb).forward(toks)).abs().max()) < 1e-12
    assert all(len(e) == 2 for e in tr[0]["token_experts"]) and len({e[0] for e in tr[0]["token_experts"]}) > 1
    sp2 = SparseParams(8, 2, 24)
    for i in range(2):
        for e in range(8):
            for proj, shp in (("gate", (24, 32)), ("up", (24, 32)), ("down", (32, 24))):
                qst["model.layers.%d.mlp.experts.%d.%s_proj.weight" % (i, e, proj)] = 0.2 * rng.standard_normal(shp)
    sm2 = SparseModel(qcfg, sp2, qst)
    g = {ref.hf_to_gguf_name(k): v for k, v in qst.items() if ".mlp." not in k}
    for i in range(2):
        p = "model.layers.%d.mlp." % i
        g["blk.%d.ffn_gate_inp.weight" % i] = qst[p + "gate.weight"]
        for proj in ("gate", "up", "down"):
            g["blk.%d.ffn_%s_exps.weight" % (i, proj)] = np.stack(
                [qst[p + "experts.%d.%s_proj.weight" % (e, proj)] for e in range(8)])
    got = ref.gguf_forward(g, "qwen3moe", 2, 1, 1e-6, 1e6, toks, ffn=gguf_sparse_ffn(g, 2))
    assert float((got - sm2.forward(toks)).abs().max()) < 1e-10
    print("reference_moe.py selftest ok")


if __name__ == "__main__":
    _selftest()
