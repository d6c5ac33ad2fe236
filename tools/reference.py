"""reference.py - from-scratch PyTorch reference of the dense Qwen2 / Qwen3 / Llama decoders, as Hugging
Face defines them (Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM; Qwen3-MoE's attention too, whose
FFN reference_moe.py plugs in), plus the tiny byte-level BPE tokenizer used by the
fixtures (trainer, encoder, decoder; GPT-2 byte<->unicode mapping; Qwen2 pre-tokenizer rules).

No transformers / tokenizers / safetensors packages: everything is written here so the C engine is
compared against an independent, readable implementation. Run with /usr/bin/python3 (python3-torch).

Model (HF semantics; shapes: T tokens, D hidden, H heads, K kv heads, E head_dim, F ffn, V vocab):
    x = embed[tokens]                                   (T, D)
    per layer: h = x + o_proj(attn(rope(q), rope(k), v)) on rmsnorm(x)
               x = h + down(silu(gate(n)) * up(n)), n = rmsnorm(h)
    logits = lm_head(rmsnorm(x))                        (T, V); lm_head = embed when tied
    rmsnorm(x) = w * (x * rsqrt(mean(x^2) + eps))       (in float32 in HF; here in `dtype`)
    rope: NeoX halves: q*cos + rotate_half(q)*sin, inv_freq = theta^(-2i/E)
    Qwen3: q and k RMS-normed per head (weights (E,), the layer's eps) before rope; E from head_dim, so
           H*E need not equal D; no q/k/v bias unless attention_bias
    attention: causal softmax(q k^T / sqrt(E)) v, k/v heads shared by H/K query heads (GQA)

The model can run in float32 (what HF does for an f32 checkpoint) or float64 (used for the goldens, so
the stored logits are the exact answer rounded once to f32 and the C engine's error is only its own).
"""

import math
import unicodedata

import numpy as np
import torch

# ============================================================================ config / weights

HF_ARCH = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM"}
QK_NORM = ("qwen3", "qwen3_moe")  # model types with per-head q/k RMS norms


class Config:
    """Hyper-parameters, named as in HF config.json."""

    def __init__(self, model_type, vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                 num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta, tie_word_embeddings,
                 max_position_embeddings, head_dim=None, attention_bias=None, rope_scaling=None):
        assert model_type in HF_ARCH
        self.model_type = model_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.tie_word_embeddings = tie_word_embeddings
        self.max_position_embeddings = max_position_embeddings
        self.head_dim = head_dim or hidden_size // num_attention_heads
        # Qwen2 always has q/k/v biases; Llama has them only with attention_bias=true
        self.attention_bias = (model_type == "qwen2") if attention_bias is None else attention_bias
        # HF rope_scaling dict ({"type" or "rope_type": "linear" | "yarn", "factor", ...}) or None
        self.rope_scaling = rope_scaling
        assert num_attention_heads % num_key_value_heads == 0

    @classmethod
    def from_hf(cls, d):
        return cls(d["model_type"], d["vocab_size"], d["hidden_size"], d["intermediate_size"],
                   d["num_hidden_layers"], d["num_attention_heads"], d.get("num_key_value_heads",
                   d["num_attention_heads"]), d["rms_norm_eps"], d.get("rope_theta", 10000.0),
                   d.get("tie_word_embeddings", False), d.get("max_position_embeddings", 2048),
                   d.get("head_dim"), d.get("attention_bias"), d.get("rope_scaling"))


def hf_shapes(cfg, dense_ffn=True):
    """HF state-dict names -> shapes (out, in), in the order HF's modules define them. dense_ffn=False
    leaves out the mlp.* weights (a MoE FFN brings its own)."""
    D, F, V, E = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    s = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        p = "model.layers.%d." % i
        s[p + "self_attn.q_proj.weight"] = (H * E, D)
        if cfg.attention_bias:
            s[p + "self_attn.q_proj.bias"] = (H * E,)
        s[p + "self_attn.k_proj.weight"] = (K * E, D)
        if cfg.attention_bias:
            s[p + "self_attn.k_proj.bias"] = (K * E,)
        s[p + "self_attn.v_proj.weight"] = (K * E, D)
        if cfg.attention_bias:
            s[p + "self_attn.v_proj.bias"] = (K * E,)
        s[p + "self_attn.o_proj.weight"] = (D, H * E)
        if cfg.model_type in QK_NORM:
            s[p + "self_attn.q_norm.weight"] = (E,)
            s[p + "self_attn.k_norm.weight"] = (E,)
        if dense_ffn:
            s[p + "mlp.gate_proj.weight"] = (F, D)
            s[p + "mlp.up_proj.weight"] = (F, D)
            s[p + "mlp.down_proj.weight"] = (D, F)
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
    s["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, D)
    return s


# HF name (per layer suffix) <-> GGUF name, as llama.cpp's converter maps them
HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
HF_TO_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}


def hf_to_gguf_name(name):
    if name in HF_TO_GGUF_TOP:
        return HF_TO_GGUF_TOP[name]
    parts = name.split(".", 3)  # model, layers, i, rest
    assert parts[0] == "model" and parts[1] == "layers", name
    return "blk.%s.%s" % (parts[2], HF_TO_GGUF_LAYER[parts[3]])


def gguf_to_hf_name(name):
    inv_top = {v: k for k, v in HF_TO_GGUF_TOP.items()}
    if name in inv_top:
        return inv_top[name]
    inv = {v: k for k, v in HF_TO_GGUF_LAYER.items()}
    _, i, rest = name.split(".", 2)
    return "model.layers.%s.%s" % (i, inv[rest])


def llama_permute(w, n_head):
    """HF q/k rows -> llama.cpp's order, so that "normal" rope on adjacent pairs (x[2i], x[2i+1]) equals
    HF's rotate_half on halves. Per head, rows (2, E/2) are interleaved into (E/2, 2)."""
    w = np.asarray(w)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w, n_head):
    w = np.asarray(w)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ============================================================================ model

def rms_norm(x, w, eps):
    # HF: hidden.to(float32); var = mean(x^2); x * rsqrt(var + eps); weight * x.to(input dtype)
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_inv_freq(head_dim, theta, scaling=None, max_position_embeddings=None):
    """(E/2,) inverse frequencies and the cos/sin multiplier, as HF's modeling_rope_utils computes them
    (_compute_default / _compute_linear_scaling / _compute_yarn_rope_parameters), in float64.
    YaRN: original_max_position_embeddings (else max_position_embeddings) sets the correction range, and
    `factor` is used as given (transformers 4.5x replaced it by max_position_embeddings / original when
    both exist; llama.cpp never does, and neither do we: see docs/engine.md)."""
    E = head_dim
    pos_freqs = theta ** (torch.arange(0, E, 2, dtype=torch.float64) / E)
    inv_freq = 1.0 / pos_freqs
    kind = None if not scaling else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":  # Llama 3.1: long wavelengths interpolated, short kept, a smooth blend between
        lo_f, hi_f = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo_f, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi_f) & (wavelen <= old / lo_f)
        return torch.where(medium, blended, scaled), 1.0
    assert kind == "yarn", kind
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    orig = scaling.get("original_max_position_embeddings") or max_position_embeddings

    def corr_dim(n_rot):  # the dim whose frequency turns n_rot times over the original context
        return E * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr_dim(beta_fast)), 0), min(math.ceil(corr_dim(beta_slow)), E - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(E // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # weight of the unscaled frequency
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, float(attention)


def rope_cos_sin(n_pos, head_dim, theta, dtype, pos0=0, scaling=None, max_position_embeddings=None):
    """(T, E) cos and sin, HF layout: the E/2 frequencies repeated twice (cat(freqs, freqs)), times the
    scaling's attention factor (YaRN) as HF's rotary embedding applies it."""
    inv_freq, mscale = rope_inv_freq(head_dim, theta, scaling, max_position_embeddings)
    pos = torch.arange(pos0, pos0 + n_pos, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x, cos, sin):
    # x: (heads, T, E); cos/sin: (T, E)
    return x * cos + rotate_half(x) * sin


class Model:
    """Dense decoder over an HF-named state dict (numpy or torch tensors, any float dtype)."""

    def __init__(self, cfg, state, dtype=torch.float64, ffn=None):
        self.cfg = cfg
        self.dtype = dtype
        self.w = {k: torch.as_tensor(np.asarray(v, dtype=np.float64) if not torch.is_tensor(v) else v)
                  .to(dtype) for k, v in state.items()}
        shapes = hf_shapes(cfg, dense_ffn=ffn is None)
        missing = [k for k in shapes if k not in self.w]
        if missing:
            raise KeyError("missing weights: %s" % missing[:4])
        for k, shp in shapes.items():
            if tuple(self.w[k].shape) != shp:
                raise ValueError("%s: shape %s, expected %s" % (k, tuple(self.w[k].shape), shp))
        # ffn(layer, x_normed (T, D), tokens) -> (T, D): the hook the MoE references replace
        self.ffn = ffn or self.dense_ffn

    def lin(self, x, name, bias=True):
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y + b if (b is not None and bias) else y

    def dense_ffn(self, i, x, tokens=None):
        p = "model.layers.%d.mlp." % i
        return self.lin(torch.nn.functional.silu(self.lin(x, p + "gate_proj")) * self.lin(x, p + "up_proj"),
                        p + "down_proj")

    def attention(self, i, x, cos, sin):
        cfg = self.cfg
        T = x.shape[0]
        H, K, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        p = "model.layers.%d.self_attn." % i
        q = self.lin(x, p + "q_proj").view(T, H, E)
        k = self.lin(x, p + "k_proj").view(T, K, E)
        if cfg.model_type in QK_NORM:  # Qwen3: each head normalised over its E values
            q = rms_norm(q, self.w[p + "q_norm.weight"], cfg.rms_norm_eps)
            k = rms_norm(k, self.w[p + "k_norm.weight"], cfg.rms_norm_eps)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, T, E), (K, T, E)
        v = self.lin(x, p + "v_proj").view(T, K, E).transpose(0, 1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(H // K, dim=0)  # query head h uses kv head h // (H/K)
        v = v.repeat_interleave(H // K, dim=0)
        s = (q @ k.transpose(1, 2)) / math.sqrt(E)  # (H, T, T)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        s = s.masked_fill(mask, float("-inf"))
        a = torch.softmax(s, dim=-1) @ v  # (H, T, E)
        return self.lin(a.transpose(0, 1).reshape(T, H * E), p + "o_proj")

    def forward(self, tokens, return_hidden=False):
        """tokens: list of ids -> logits (T, V) at every position, in self.dtype."""
        cfg = self.cfg
        tokens = torch.as_tensor(list(tokens), dtype=torch.long)
        if tokens.numel() == 0 or int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
            raise ValueError("bad tokens")
        x = self.w["model.embed_tokens.weight"][tokens]
        cos, sin = rope_cos_sin(len(tokens), cfg.head_dim, cfg.rope_theta, self.dtype, scaling=cfg.rope_scaling,
                                max_position_embeddings=cfg.max_position_embeddings)
        for i in range(cfg.num_hidden_layers):
            p = "model.layers.%d." % i
            x = x + self.attention(i, rms_norm(x, self.w[p + "input_layernorm.weight"], cfg.rms_norm_eps), cos, sin)
            x = x + self.ffn(i, rms_norm(x, self.w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps), tokens)
        h = rms_norm(x, self.w["model.norm.weight"], cfg.rms_norm_eps)
        head = self.w["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        logits = h @ head.T
        return (logits, h) if return_hidden else logits

    def generate(self, prompt, n_predict):
        """Greedy decoding (argmax, lowest id wins ties). Returns (new tokens, min top1-top2 margin)."""
        toks = list(prompt)
        out, margin = [], float("inf")
        for _ in range(n_predict):
            last = self.forward(toks)[-1]
            top2 = torch.topk(last, 2)
            nxt = int(torch.argmax(last))
            margin = min(margin, float(top2.values[0] - top2.values[1]))
            out.append(nxt)
            toks.append(nxt)
        return out, margin


# ============================================================================ GGUF-side check

def gguf_rope_angles(E, theta, T, rope=None):
    """(T, E/2) cos and sin with llama.cpp's conventions, from GGUF keys: rope = None or {"type": "none" |
    "linear" | "yarn", "factor", "orig_ctx", "attn_factor", "beta_fast", "beta_slow", "freqs" (the
    rope_freqs.weight values)} (defaults as llama.cpp:
    attn_factor 1, betas 32 / 1). Written after ggml's rope_yarn / rope_yarn_corr_dims (pair index i0/2,
    ramp guard max(0.001, high - low), mscale = attn_factor * (1 + 0.1 ln(factor)) for YaRN), not after HF,
    so that the two references check each other."""
    rope = rope or {}
    kind = rope.get("type", "none")
    freq_scale = 1.0 / float(rope.get("factor", 1.0)) if kind != "none" else 1.0
    mscale = float(rope.get("attn_factor", 1.0)) if kind != "none" else 1.0
    theta_extrap = torch.tensor([theta ** (-i0 / E) for i0 in range(0, E, 2)], dtype=torch.float64)
    if rope.get("freqs") is not None:  # rope_freqs.weight (Llama 3.1): divides each pair's frequency
        theta_extrap = theta_extrap / torch.as_tensor(np.asarray(rope["freqs"], dtype=np.float64))
    theta_scaled = theta_extrap * freq_scale
    if kind == "yarn":
        n_orig = rope["orig_ctx"]
        fast, slow = rope.get("beta_fast", 32.0), rope.get("beta_slow", 1.0)
        corr = [E * math.log(n_orig / (b * 2 * math.pi)) / (2 * math.log(theta)) for b in (fast, slow)]
        lo, hi = max(0.0, math.floor(corr[0])), min(E - 1.0, math.ceil(corr[1]))
        y = torch.tensor([(i0 // 2 - lo) / max(0.001, hi - lo) for i0 in range(0, E, 2)], dtype=torch.float64)
        mix = 1 - y.clamp(0, 1)  # 1: keep the unscaled angle
        theta_scaled = theta_scaled * (1 - mix) + theta_extrap * mix
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), theta_scaled)
    return ang.cos() * mscale, ang.sin() * mscale


def llama3_rope_freqs(head_dim, theta, scaling):
    """rope_freqs.weight (E/2,) float32 for an HF "llama3" rope_scaling, as llama.cpp's converter makes it:
    per frequency, 1 for short wavelengths, `factor` for long ones, 1 / ((1 - s) / factor + s) between,
    s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    factor = float(scaling["factor"])
    lo_f, hi_f = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    out = []
    for i0 in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i0 / head_dim))
        if wavelen < old / hi_f:
            out.append(1.0)
        elif wavelen > old / lo_f:
            out.append(factor)
        else:
            s = (old / wavelen - lo_f) / (hi_f - lo_f)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def gguf_forward(tensors, arch, n_head, n_head_kv, eps, theta, tokens, rope=None, ffn=None):
    """An independent forward over GGUF-named float tensors with llama.cpp's rope conventions: NeoX
    (halves) for qwen2 / qwen3 / qwen3moe, "normal" (adjacent pairs) for llama, whose q/k rows were permuted
    at conversion; attn_q_norm / attn_k_norm per head when the file has them (qwen3); rope scaling from the
    GGUF keys (gguf_rope_angles). ffn(layer, x normed) replaces the dense FFN (a MoE's, from its tensors).
    Used by make_fixtures.py to prove that what it wrote (names, permutation, keys) gives the HF logits."""
    t = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in tensors.items()}
    T = len(tokens)
    x = t["token_embd.weight"][torch.as_tensor(tokens)]
    D = x.shape[1]
    H, K = n_head, n_head_kv
    E = t["blk.0.attn_q.weight"].shape[0] // H
    if "rope_freqs.weight" in t:
        rope = dict(rope or {}, freqs=t["rope_freqs.weight"])
    c, s = gguf_rope_angles(E, theta, T, rope)

    def rope(z):  # z: (T, heads, E)
        if arch == "llama":
            a, b = z[..., 0::2], z[..., 1::2]
            return torch.stack((a * c[:, None] - b * s[:, None], a * s[:, None] + b * c[:, None]), -1).reshape(z.shape)
        a, b = z[..., :E // 2], z[..., E // 2:]
        return torch.cat((a * c[:, None] - b * s[:, None], a * s[:, None] + b * c[:, None]), -1)

    def norm(z, w):
        return z / torch.sqrt((z * z).mean(-1, keepdim=True) + eps) * w

    def mm(z, n):
        y = z @ t[n + ".weight"].T
        return y + t[n + ".bias"] if n + ".bias" in t else y

    nl = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("blk."))
    for i in range(nl):
        b = "blk.%d." % i
        n = norm(x, t[b + "attn_norm.weight"])
        q = mm(n, b + "attn_q").view(T, H, E)
        k = mm(n, b + "attn_k").view(T, K, E)
        if b + "attn_q_norm.weight" in t:
            q, k = norm(q, t[b + "attn_q_norm.weight"]), norm(k, t[b + "attn_k_norm.weight"])
        q, k = rope(q), rope(k)
        v = mm(n, b + "attn_v").view(T, K, E)
        out = torch.zeros(T, H, E, dtype=torch.float64)
        for h in range(H):
            kh = h // (H // K)
            sc = q[:, h] @ k[:, kh].T / math.sqrt(E)
            sc = sc + torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
            out[:, h] = torch.softmax(sc, -1) @ v[:, kh]
        x = x + mm(out.reshape(T, H * E), b + "attn_output")
        n = norm(x, t[b + "ffn_norm.weight"])
        if ffn is not None:
            x = x + ffn(i, n)
            continue
        x = x + mm(torch.nn.functional.silu(mm(n, b + "ffn_gate")) * mm(n, b + "ffn_up"), b + "ffn_down")
    h = norm(x, t["output_norm.weight"])
    return h @ t.get("output.weight", t["token_embd.weight"]).T


# ============================================================================ tokenizer

def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map. The ORDER of the returned dict (printable
    bytes first, then the rest mapped to 256+n) is also the id order of the 256 byte tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


BYTE_ENC = bytes_to_unicode()
BYTE_DEC = {v: k for k, v in BYTE_ENC.items()}

# The Qwen2 pre-tokenizer regex (tokenizer.json Split pattern; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2):
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")

# \s as Oniguruma/PCRE2 (Unicode White_Space), not Python's str.isspace (which adds \x1c-\x1f)
_WS = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | \
    set(chr(c) for c in range(0x2000, 0x200b))


def _is_l(ch):
    return unicodedata.category(ch)[0] == "L"


def _is_n(ch):
    return unicodedata.category(ch)[0] == "N"


def _is_s(ch):
    return ch in _WS


def _match_qwen2(s, i):
    """End of the regex match starting at i (leftmost alternative that matches, with the backtracking
    the regex engine would do). Python's re has no \\p{L}, so the pattern is hand-compiled here."""
    n = len(s)
    c = s[i]
    # (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c == "'" and i + 1 < n:
        for suf in ("s", "t", "re", "ve", "m", "ll", "d"):
            if s[i + 1:i + 1 + len(suf)].lower() == suf:
                return i + 1 + len(suf)
    # [^\r\n\p{L}\p{N}]?\p{L}+
    j = i
    if not _is_l(c) and c not in "\r\n" and not _is_n(c) and i + 1 < n and _is_l(s[i + 1]):
        j = i + 1
    if _is_l(s[j]):
        while j < n and _is_l(s[j]):
            j += 1
        return j
    # \p{N}
    if _is_n(c):
        return i + 1
    # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    def other(ch):
        return not _is_s(ch) and not _is_l(ch) and not _is_n(ch)
    j = i + 1 if (c == " " and i + 1 < n and other(s[i + 1])) else i
    if other(s[j]):
        while j < n and other(s[j]):
            j += 1
        while j < n and s[j] in "\r\n":
            j += 1
        return j
    # whitespace alternatives
    j = i
    while j < n and _is_s(s[j]):
        j += 1
    if j == i:
        return i + 1  # unreachable: every char is L, N, \s or "other"
    # \s*[\r\n]+ : ends after the last \r or \n of the whitespace run
    for k in range(j - 1, i - 1, -1):
        if s[k] in "\r\n":
            return k + 1
    # \s+(?!\S) : the whole run at the end of text, else the run minus its last char (if >= 1 left)
    if j == n:
        return j
    if j - 1 > i:
        return j - 1
    # \s+
    return j


def pretokenize(text):
    out, i = [], 0
    while i < len(text):
        j = _match_qwen2(text, i)
        out.append(text[i:j])
        i = j
    return out


def _word_symbols(w):
    return [BYTE_ENC[b] for b in w.encode("utf-8")]


def train_bpe(text, n_merges):
    """Byte-level BPE merges over text (pre-tokenized by the Qwen2 rules). Deterministic: the most
    frequent adjacent pair wins, ties broken by the lexicographically smallest (left, right) pair. A pair
    whose concatenation already is a token is skipped, so every merge adds a distinct token."""
    counts = {}
    for w in pretokenize(text):
        key = tuple(_word_symbols(w))
        counts[key] = counts.get(key, 0) + 1
    words = [(list(k), c) for k, c in sorted(counts.items())]
    vocab = set(BYTE_ENC.values())
    merges = []
    while len(merges) < n_merges:
        pairs = {}
        for sym, c in words:
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        cands = sorted(((-c, p) for p, c in pairs.items() if p[0] + p[1] not in vocab))
        if not cands:
            break
        a, b = cands[0][1]
        merges.append((a, b))
        vocab.add(a + b)
        for idx, (sym, c) in enumerate(words):
            i, out = 0, []
            while i < len(sym):
                if i + 1 < len(sym) and sym[i] == a and sym[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            words[idx] = (out, c)
    return merges


class Tokenizer:
    """Byte-level BPE: NFC-normalise, split out special tokens, pre-tokenize (Qwen2 regex), map bytes to
    GPT-2 unicode, apply merges by rank (lowest first), look up ids."""

    def __init__(self, tokens, merges, specials):
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        assert len(self.ids) == len(self.tokens), "duplicate tokens"
        self.merges = list(merges)
        self.rank = {m: r for r, m in enumerate(self.merges)}
        self.specials = list(specials)  # strings, matched longest first in the raw text

    @classmethod
    def build(cls, text, n_merges, specials):
        """Vocab: 256 byte tokens (bytes_to_unicode order), then one token per merge, then specials."""
        merges = train_bpe(text, n_merges)
        tokens = list(BYTE_ENC.values()) + [a + b for a, b in merges] + list(specials)
        return cls(tokens, merges, specials)

    def _bpe(self, word):
        sym = _word_symbols(word)
        while len(sym) > 1:
            best, bi = None, -1
            for i in range(len(sym) - 1):
                r = self.rank.get((sym[i], sym[i + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, i
            if best is None:
                break
            a, b = self.merges[best]
            out, i = [], 0
            while i < len(sym):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(sym) and sym[i] == a and sym[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            sym = out
        return [self.ids[s] for s in sym]

    def encode(self, text, special=True):
        ids = []
        for piece, is_special in self._split_special(text, special):
            if is_special:
                ids.append(self.ids[piece])
                continue
            for w in pretokenize(unicodedata.normalize("NFC", piece)):
                ids.extend(self._bpe(w))
        return ids

    def _split_special(self, text, special):
        if not special or not self.specials:
            return [(text, False)] if text else []
        out, i, start = [], 0, 0
        sp = sorted(self.specials, key=len, reverse=True)
        while i < len(text):
            m = next((s for s in sp if text.startswith(s, i)), None)
            if m:
                if start < i:
                    out.append((text[start:i], False))
                out.append((m, True))
                i += len(m)
                start = i
            else:
                i += 1
        if start < len(text):
            out.append((text[start:], False))
        return out

    def decode_bytes(self, ids):
        out = bytearray()
        for i in ids:
            t = self.tokens[i]
            if t in self.specials:
                out += t.encode("utf-8")
            else:
                out += bytes(BYTE_DEC[ch] for ch in t)
        return bytes(out)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# Llama 3.1's rope_scaling (config.json of Llama-3.1-8B)
LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
           "rope_type": "llama3"}


def _selftest():
    # pre-tokenizer cases worked out from the regex by hand
    assert pretokenize("Hello world") == ["Hello", " world"]
    assert pretokenize("x  = 1") == ["x", " ", " =", " ", "1"]
    assert pretokenize("a\n\n  b") == ["a", "\n\n", " ", " b"]
    assert pretokenize("he's 123!!\n") == ["he", "'s", " ", "1", "2", "3", "!!\n"]
    assert pretokenize("  \n x") == ["  \n", " x"]
    assert pretokenize("end   ") == ["end", "   "]
    assert pretokenize("(x)") == ["(x", ")"]
    assert pretokenize("\tfoo") == ["\tfoo"]
    # permutation round trip
    w = np.arange(8 * 3).reshape(8, 3)
    assert np.array_equal(llama_unpermute(llama_permute(w, 2), 2), w)
    # rope scaling: the HF-style and the llama.cpp-style computations agree (Qwen2.5-Coder's YaRN, a ramp
    # that starts above 0, a custom attention factor, DeepSeek-Coder's linear 4)
    for E, theta, T, hf, gg in (
            (128, 1e6, 300, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
             {"type": "yarn", "factor": 4.0, "orig_ctx": 32768}),
            (64, 1e4, 300, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
                            "attention_factor": 1.2},
             {"type": "yarn", "factor": 8.0, "orig_ctx": 4096, "attn_factor": 1.2 / (1 + 0.1 * math.log(8.0))}),
            (128, 1e5, 300, {"type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
            (16, 100.0, 64, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
             {"type": "yarn", "factor": 4.0, "orig_ctx": 32}),
            (128, 5e5, 300, LLAMA31, {"freqs": llama3_rope_freqs(128, 5e5, LLAMA31)})):
        c1, s1 = rope_cos_sin(T, E, theta, torch.float64, scaling=hf)
        c2, s2 = gguf_rope_angles(E, theta, T, gg)
        tol = 1e-9 if "freqs" not in gg else 1e-4  # rope_freqs are float32, as llama.cpp stores them
        assert float((c1[:, :E // 2] - c2).abs().max()) < tol and float((s1[:, E // 2:] - s2).abs().max()) < tol, hf
        inv, _ = rope_inv_freq(E, theta, hf)
        assert not torch.allclose(inv, rope_inv_freq(E, theta)[0])  # the scaling changed something
    # Qwen3 (head_dim 24 != 32 / 2, per-head q/k norms): the HF-style model and the GGUF-side forward agree,
    # and the q/k norm weights matter
    rng = np.random.default_rng(3)
    cfg = Config("qwen3", 40, 32, 48, 2, 2, 1, 1e-6, 1e6, False, 64, 24)
    st = {k: (1 + 0.3 * rng.standard_normal(sh) if "norm" in k else 0.2 * rng.standard_normal(sh))
          for k, sh in hf_shapes(cfg).items()}
    assert "model.layers.0.self_attn.q_norm.weight" in st and "model.layers.0.self_attn.q_proj.bias" not in st
    toks = list(rng.integers(0, 40, 13))
    want = Model(cfg, st).forward(toks)
    got = gguf_forward({hf_to_gguf_name(k): v for k, v in st.items()}, "qwen3", 2, 1, 1e-6, 1e6, toks)
    assert float((got - want).abs().max()) < 1e-10
    st2 = dict(st, **{"model.layers.1.self_attn.k_norm.weight": st["model.layers.1.self_attn.k_norm.weight"] * 2})
    assert float((Model(cfg, st2).forward(toks) - want).abs().max()) > 1e-3
    print("reference.py selftest ok")


if __name__ == "__main__":
    _selftest()
