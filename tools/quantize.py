"""quantize.py - llama-quantize's presets in numpy, an independent twin of `codemoe quantize`
(modelfile/quantize.c), written from the published descriptions of ggml's reference quantisers and of
llama-quantize's per-tensor type policy. Used to hold the C code to the same bytes (py_quantize).

What llama-quantize writes for an F32/F16/BF16 GGUF and a preset, without an importance matrix:
  tensors   non-layer tensors first, then by the N of "blk.N.", by name (bytewise) within each;
  types     2-D/3-D tensors whose name ends in "weight" get the preset's type, except norms, routers
            (ffn_gate_inp; codemoe's ffn_gate_inp_seg too) and a list of small special tensors; then
            - output.weight (and token_embd.weight when there is no output.weight): Q8_0 if the row is
              not a multiple of the preset type's block, else Q6_K unless the preset type is Q8_0;
            - attn_v (and attn_qkv, attn_kv_b; counted in file order as i of n):
              Q2_K: Q4_K if n_head/n_head_kv >= 4 else Q3_K; Q3_K_M: Q5_K for i < 2 else Q4_K;
              Q3_K_L: Q5_K; Q4_K_M/Q5_K_M: Q6_K at "more bits" positions; Q4_K_S: Q5_K for i < 4;
              then Q3_K/Q4_K -> Q5_K for 70B models, and Q8_0 for 8-expert models;
            - attn_k: Q8_0 for 8-expert models;
            - ffn_down (layer = position, or blk.N for MoE): Q2_K: Q3_K; Q3_K_M: Q5_K below n/16 else
              Q4_K; Q3_K_L: Q5_K; Q4_K_M/Q5_K_M: Q6_K at more-bits layers; Q4_K_S: Q5_K below n/8
              (Falcon variants as written below);
            - attn_output: 8 experts: Q5_K for Q2_K..Q4_K_M presets; else Q2_K: Q3_K, Q3_K_M: Q4_K,
              Q3_K_L: Q5_K;
            "more bits" at layer i of n: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2.
            A row the chosen type's block does not divide falls back: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
            Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 if 32 does not divide it either; legacy types have no
            fallback (an error).
  keys      every input key in order (strings up to a NUL), then general.quantization_version = 2 and
            general.file_type = the preset's llama_ftype (each removed first if present); split.* dropped.
  layout    GGUF v3, 32-byte alignment, each tensor's data padded to 32.

    python3 tools/quantize.py IN.gguf OUT.gguf PRESET [--allow-requantize]
    python3 tools/quantize.py check --codemoe BIN --fixtures DIR    (byte equality with the C code)
    python3 tools/quantize.py inputs DIR                           (test models for the next one)
    python3 tools/quantize.py compare --llama-quantize LQ --codemoe BIN IN.gguf...  (docs/quantize.md)
"""

import os
import re
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf  # noqa: E402
from gguf import F32, GGMLType as T  # noqa: E402

PRESETS = {  # name: (llama_ftype, default type)
    "Q4_0": (2, T.Q4_0), "Q4_1": (3, T.Q4_1), "Q5_0": (8, T.Q5_0), "Q5_1": (9, T.Q5_1),
    "Q2_K": (10, T.Q2_K), "Q3_K_S": (11, T.Q3_K), "Q3_K_M": (12, T.Q3_K), "Q3_K_L": (13, T.Q3_K),
    "Q4_K_S": (14, T.Q4_K), "Q4_K_M": (15, T.Q4_K), "Q5_K_S": (16, T.Q5_K), "Q5_K_M": (17, T.Q5_K),
    "Q6_K": (18, T.Q6_K), "Q8_0": (7, T.Q8_0),
}
QUANTIZED = (T.Q8_0,) + gguf.BLOCK_TYPES


class QuantizeError(Exception):
    pass


# ---------------------------------------------------------------------------------- reading the input

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _str_at(buf, off):
    n = struct.unpack_from("<Q", buf, off)[0]
    return buf[off + 8:off + 8 + n], off + 8 + n


def read_gguf(path):
    """-> (kv list of (key, serialised value bytes as llama-quantize re-writes them, parsed scalar),
    tensors list of dicts name/ne/type/data, alignment)."""
    buf = open(path, "rb").read()
    magic, version, n_t, n_kv = struct.unpack_from("<IIQQ", buf, 0)
    if magic != gguf.GGUF_MAGIC or version not in (2, 3):
        raise QuantizeError("%s: not a GGUF v2/v3 file" % path)
    off = 24
    kvs = []
    for _ in range(n_kv):
        key, off = _str_at(buf, off)
        vt = struct.unpack_from("<I", buf, off)[0]
        off += 4
        if vt == _ARRAY:
            et, n = struct.unpack_from("<IQ", buf, off)
            off += 12
            head = struct.pack("<IIQ", _ARRAY, et, n)
        else:
            et, n, head = vt, 1, struct.pack("<I", vt)
        if et == _STRING:
            parts = []
            for _ in range(n):
                s, off = _str_at(buf, off)
                s = s.split(b"\0")[0]  # passed on as a C string
                parts.append(struct.pack("<Q", len(s)) + s)
            body = b"".join(parts)
            val = parts[0][8:] if vt == _STRING else None
        else:
            size = _FIXED[et] * n
            body = buf[off:off + size]
            off += size
            # a scalar, or element 0 of an array (per-layer head counts)
            val = struct.unpack_from(_FMT[et], body)[0] if n else None
        kvs.append((key.decode("utf-8", "replace"), head + body, val))
    infos = []
    for _ in range(n_t):
        name, off = _str_at(buf, off)
        nd = struct.unpack_from("<I", buf, off)[0]
        ne = list(struct.unpack_from("<%dQ" % nd, buf, off + 4))
        tt, toff = struct.unpack_from("<IQ", buf, off + 4 + 8 * nd)
        off += 4 + 8 * nd + 12
        infos.append((name.decode(), ne, tt, toff))
    align = dict((k, v) for k, _, v in kvs).get("general.alignment", 32)
    base = gguf.align_up(off, align)
    tensors = []
    for name, ne, tt, toff in infos:
        ne4 = ne + [1] * (4 - len(ne))
        nbytes = gguf.tensor_nbytes(tuple(reversed(ne)), tt)
        tensors.append(dict(name=name, ne=ne4, type=tt, data=buf[base + toff:base + toff + nbytes]))
    return kvs, tensors, align


# ---------------------------------------------------------------------------------- the type policy

_LAYER = re.compile(r"blk\.[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _layer(name):
    """N of a name starting "blk.N" (what sscanf("blk.%d.") reads), or None."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def sort_key(t):
    layer = _layer(t["name"])
    return (-1 if layer is None else layer, t["name"].encode())


def n_dims(ne):
    n = 1
    for d in range(4):
        if ne[d] > 1:
            n = d + 1
    return n


_KEEP = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_seg.weight", "ffn_gate_tid2eid.weight", "altup",
         "laurel", "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
         "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_",
         ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd") + tuple(
    "time_mix_%s.weight" % s for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
                                        "decay_w1", "decay_w2", "lerp_fused"))


def quantizable(t):
    name = t["name"]
    if n_dims(t["ne"]) < 2:
        return False
    # "ends with weight" as rfind("weight") == size - 6, where "not found" equals a negative size - 6
    last = name.rfind("weight")
    if last != len(name) - 6 and not (last == -1 and len(name) == 5):
        return False
    if any(k in name for k in _KEEP):
        return False
    return name not in ("position_embd.weight", "token_types.weight")


def category(name):
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for sub, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if sub in name:
            return cat
    return "other"


def more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def plan(hp, preset, tensors):
    """Sets t["target"] for every tensor (in sort_key order)."""
    ft, base = PRESETS[preset]
    falcon = hp["arch"] == "falcon"
    n_l, n_exp = hp["n_layer"], hp["n_expert"]
    gqa = hp["n_head"] // hp["n_head_kv"] if hp["n_head_kv"] else 0
    big = n_l == 80 and (hp["arch"] in ("qwen2", "deci", "olmo") or
                         (hp["arch"] == "llama" and n_exp != 8 and hp["n_head"] != hp["n_head_kv"]))
    cats = [category(t["name"]) for t in tensors]
    tied = "output" not in cats
    n_v = cats.count("attn_v")
    cnt = dict(attn_v=0, ffn_down=0, ffn_gate=0, ffn_up=0)
    blk = lambda tt: gguf.GGML_BLOCK[tt][0]

    def ffn_layer(kind, name):
        if n_exp > 1:
            i = _layer(name)
            if i is None:
                raise QuantizeError("cannot tell the layer of %s" % name)
            if not 0 <= i < n_l:
                raise QuantizeError("layer %d of %s out of range" % (i, name))
            return i
        return cnt[kind]

    for t, c in zip(tensors, cats):
        t["target"] = t["type"]
        if not quantizable(t):
            continue
        q, ne0 = base, t["ne"][0]
        if c == "output" or (tied and c == "token_embd"):
            q = T.Q8_0 if falcon or ne0 % blk(base) else (T.Q6_K if base != T.Q8_0 else base)
        elif c == "attn_v":
            i = cnt["attn_v"]
            if ft == 10:
                q = T.Q4_K if gqa >= 4 else T.Q3_K
            elif ft == 12:
                q = T.Q5_K if i < 2 else T.Q4_K
            elif ft == 13:
                q = T.Q5_K
            elif ft in (15, 17) and more_bits(i, n_v):
                q = T.Q6_K
            elif ft == 14 and i < 4:
                q = T.Q5_K
            if big and q in (T.Q3_K, T.Q4_K):
                q = T.Q5_K
            if n_exp == 8:
                q = T.Q8_0
            cnt["attn_v"] += 1
        elif c == "attn_k":
            if n_exp == 8:
                q = T.Q8_0
        elif c == "ffn_down":
            i = ffn_layer("ffn_down", t["name"])
            if ft == 10:
                q = T.Q3_K
            elif ft == 12:
                q = T.Q5_K if i < n_l // 16 else T.Q4_K if not falcon or more_bits(i, n_l) else T.Q3_K
            elif ft == 13:
                q = T.Q4_K if falcon else T.Q5_K
            elif ft == 15:
                if falcon:
                    q = T.Q6_K if i < n_l // 16 else T.Q5_K if more_bits(i, n_l) else T.Q4_K
                elif more_bits(i, n_l):
                    q = T.Q6_K
            elif ft == 17 and more_bits(i, n_l):
                q = T.Q6_K
            elif ft == 14 and not falcon and i < n_l // 8:
                q = T.Q5_K
            cnt["ffn_down"] += 1
        elif c == "attn_output":
            if falcon:
                q = T.Q4_K if ft == 13 else q
            elif n_exp == 8:
                q = T.Q5_K if ft in (10, 11, 12, 14, 15) else q
            else:
                q = {10: T.Q3_K, 12: T.Q4_K, 13: T.Q5_K}.get(ft, q)
        elif c in ("ffn_gate", "ffn_up"):
            ffn_layer(c, t["name"])
            cnt[c] += 1
        if ne0 % blk(q):
            fb = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(q)
            if fb is None:
                raise QuantizeError("%s: row %d, and %s has no fallback" % (t["name"], ne0, gguf.GGML_TYPE_NAME[q]))
            q = fb if ne0 % blk(fb) == 0 else T.F16
        t["target"] = q


# ---------------------------------------------------------------------------------- the quantisers
#
# Arrays hold many (sub-)blocks side by side (axis 0); sums over a block's values run value by value in
# index order and every step is a float32 operation, so each block's numbers are the C code's.

I32 = np.int32


def nearest(v):
    """Round half to even through the 1.5 * 2^23 trick (|v| < 2^22)."""
    return ((np.asarray(v, dtype=F32) + F32(12582912.0)).view(I32) & 0x7FFFFF) - 0x400000


def f16(v):
    """float32 -> (fp16 bits as uint8 pairs, the float32 the fp16 stands for)."""
    h = np.asarray(v, dtype=F32).astype("<f2")
    return h.view(np.uint8).reshape(-1, 2), h.astype(F32)


def _safe(den):
    return np.where(den != 0, den, F32(1)).astype(F32)


def _first_absmax(x):
    """(signed value of largest magnitude, that magnitude); the first one wins ties, 0 for all-zero rows."""
    ax = np.abs(x)
    idx = ax.argmax(axis=1)
    amax = ax[np.arange(x.shape[0]), idx]
    return np.where(amax > 0, x[np.arange(x.shape[0]), idx], F32(0)).astype(F32), amax


EPS = F32(1e-15)


def qx_quants(x, nmax):
    """Symmetric search with weights x^2 over 19 trial scales around -nmax/max. -> (L in [0, 2nmax), scale)."""
    m, n = x.shape
    mx, amax = _first_absmax(x)
    zero = amax < EPS
    mxs = _safe(mx)
    nm = F32(nmax)
    w = x * x

    def quant(iscale):
        return np.clip(nearest(iscale[:, None] * x), -nmax, nmax - 1)

    def sums(l):
        lf = l.astype(F32)
        slx = np.zeros(m, F32)
        sl2 = np.zeros(m, F32)
        for i in range(n):
            slx = slx + w[:, i] * x[:, i] * lf[:, i]
            sl2 = sl2 + w[:, i] * lf[:, i] * lf[:, i]
        return slx, sl2

    l = quant(-nm / mxs)
    L = l + nmax
    sumlx, suml2 = sums(l)
    scale = np.where(suml2 != 0, sumlx / _safe(suml2), F32(0)).astype(F32)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = -(nm + F32(0.1) * F32(s)) / mxs
        l = quant(iscale)
        sumlx, suml2 = sums(l)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[:, None], l + nmax, L)
        scale = np.where(better, sumlx / _safe(suml2), scale).astype(F32)
        best = np.where(better, scale * sumlx, best).astype(F32)
    L = np.where(zero[:, None], 0, L)
    return L, np.where(zero, F32(0), scale).astype(F32)


def q3_quants(x, nmax):
    """Q3_K's search: -nmax/max, then up to 5 passes moving single values while sumlx^2/suml2 grows."""
    m, n = x.shape
    mx, amax = _first_absmax(x)
    zero = amax < EPS
    L = np.clip(nearest((-F32(nmax) / _safe(mx))[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx = np.zeros(m, F32)
    suml2 = np.zeros(m, F32)
    for i in range(n):
        lf = L[:, i].astype(F32)
        sumlx = sumlx + w[:, i] * x[:, i] * lf
        suml2 = suml2 + w[:, i] * lf * lf
    running = ~zero
    for _ in range(5):
        changed = np.zeros(m, bool)
        for i in range(n):
            xi, wi, li = x[:, i], w[:, i], L[:, i].astype(F32)
            slx = sumlx - wi * xi * li
            active = running & (slx > 0)
            sl2 = suml2 - wi * li * li
            nl = np.clip(nearest(xi * sl2 / _safe(slx)), -nmax, nmax - 1)
            nlf = nl.astype(F32)
            slx2 = slx + wi * xi * nlf
            sl22 = sl2 + wi * nlf * nlf
            ok = active & (nl != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(ok, nl, L[:, i])
            sumlx = np.where(ok, slx2, sumlx).astype(F32)
            suml2 = np.where(ok, sl22, suml2).astype(F32)
            changed |= ok
        running &= changed
        if not running.any():
            break
    scale = np.where(suml2 > 0, sumlx / _safe(suml2), F32(0)).astype(F32)
    return np.where(zero[:, None], 0, L + nmax), np.where(zero, F32(0), scale).astype(F32)


def qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """Asymmetric fit x ~ scale*L - the_min, L in [0, nmax]: min/max start, then nstep+1 trial scales refit by
    weighted least squares, kept when the weighted (absolute or squared) error drops. -> (L, scale, the_min)."""
    m, n = x.shape
    mn, mx = x[:, 0].copy(), x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        mn = np.where(x[:, i] < mn, x[:, i], mn)
        mx = np.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = np.where(mn > 0, F32(0), mn).astype(F32)
    flat = mx == mn
    rng = _safe(mx - mn)
    nm = F32(nmax)
    iscale = nm / rng
    scale = F32(1) / iscale
    L = np.clip(nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)

    def err(sc, mi, l):
        e = np.zeros(m, F32)
        for i in range(n):
            diff = sc * l[:, i].astype(F32) + mi - x[:, i]
            diff = np.abs(diff) if use_mad else diff * diff
            e = e + w[:, i] * diff
        return e

    best = err(scale, mn, L)
    for s in range(nstep + 1):
        # a trial that wins moves min, and the later trials start from it
        iscale = (F32(rmin) + F32(rdelta) * F32(s) + nm) / _safe(mx - mn)
        la = np.clip(nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        sl = np.zeros(m, F32)
        sl2 = np.zeros(m, F32)
        sxl = np.zeros(m, F32)
        for i in range(n):
            lf = la[:, i].astype(F32)
            sl = sl + w[:, i] * lf
            sl2 = sl2 + w[:, i] * lf * lf
            sxl = sxl + w[:, i] * lf * x[:, i]
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        Ds = _safe(D)
        ts = (sum_w * sxl - sum_x * sl) / Ds
        tm = (sl2 * sum_x - sl * sxl) / Ds
        pos = tm > 0
        tm = np.where(pos, F32(0), tm).astype(F32)
        ts = np.where(pos, sxl / _safe(sl2), ts).astype(F32)
        cur = err(ts, tm, la)
        better = ok & (cur < best) & ~flat
        L = np.where(better[:, None], la, L)
        best = np.where(better, cur, best).astype(F32)
        scale = np.where(better, ts, scale).astype(F32)
        mn = np.where(better, tm, mn).astype(F32)
    L = np.where(flat[:, None], 0, L)
    return L, np.where(flat, F32(0), scale).astype(F32), (-mn).astype(F32)


def _pack_q5(q):
    """(nb, 32) 5-bit values -> u32 of fifth bits, nibble bytes."""
    return gguf._pack_bits32((q >> 4) & 1), gguf._pack_nibbles32(q & 0xF)


def _trunc(v):
    return np.trunc(np.asarray(v, dtype=F32).astype(np.float64)).astype(I32)


def quant_legacy(x, tt):
    nb = x.shape[0]
    out = np.zeros((nb, gguf.GGML_BLOCK[tt][1]), np.uint8)
    with np.errstate(all="ignore"):
        if tt in (T.Q4_0, T.Q5_0):
            mx, _ = _first_absmax(x)
            d = mx / F32(-8 if tt == T.Q4_0 else -16)
            idd = np.where(d != 0, F32(1) / _safe(d), F32(0)).astype(F32)
            off, top = (F32(8.5), 15) if tt == T.Q4_0 else (F32(16.5), 31)
            q = np.minimum(top, _trunc(x * idd[:, None] + off))
            out[:, 0:2] = f16(d)[0]
            if tt == T.Q4_0:
                out[:, 2:18] = gguf._pack_nibbles32(q)
            else:
                out[:, 2:6], out[:, 6:22] = _pack_q5(q)
            return out
        lo, hi = x.min(axis=1), x.max(axis=1)
        d = (hi - lo) / F32(15 if tt == T.Q4_1 else 31)
        idd = np.where(d != 0, F32(1) / _safe(d), F32(0)).astype(F32)
        q = _trunc((x - lo[:, None]) * idd[:, None] + F32(0.5))
        out[:, 0:2] = f16(d)[0]
        out[:, 2:4] = f16(lo)[0]
        if tt == T.Q4_1:
            out[:, 4:20] = gguf._pack_nibbles32(np.minimum(15, q))
        else:
            out[:, 4:8], out[:, 8:24] = _pack_q5(q)
        return out


def quant_q2_k(x):
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    L, scales, mins = qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    L, scales, mins = L.reshape(nb, 16, 16), scales.reshape(nb, 16), mins.reshape(nb, 16)
    ms, mm = np.maximum(scales.max(axis=1), F32(0)), np.maximum(mins.max(axis=1), F32(0))
    sc = np.where(ms[:, None] > 0, nearest((F32(15) / _safe(ms))[:, None] * scales) & 0xFF, 0)
    d_b, d = f16(np.where(ms > 0, ms / F32(15), F32(0)))
    sc = sc | np.where(mm[:, None] > 0, (nearest((F32(15) / _safe(mm))[:, None] * mins) << 4) & 0xFF, 0)
    dm_b, dm = f16(np.where(mm > 0, mm / F32(15), F32(0)))
    dj = d[:, None] * (sc & 0xF).astype(F32)
    dmj = dm[:, None] * (sc >> 4).astype(F32)
    with np.errstate(all="ignore"):
        requant = np.clip(nearest((x.reshape(nb, 16, 16) + dmj[:, :, None]) / _safe(dj)[:, :, None]), 0, 3)
    L = np.where((dj != 0)[:, :, None], requant, L).reshape(nb, 256)
    out = np.zeros((nb, 84), np.uint8)
    out[:, 0:16] = sc.astype(np.uint8)
    out[:, 16:80] = gguf._pack_crumbs(L)
    out[:, 80:82], out[:, 82:84] = d_b, dm_b
    return out


def quant_q3_k(x):
    nb = x.shape[0]
    L, scales = q3_quants(x.reshape(nb * 16, 16), 4)
    L, scales = L.reshape(nb, 16, 16), scales.reshape(nb, 16)
    ms, amax = _first_absmax(scales)
    has = ms != 0
    iscale = F32(-32) / _safe(ms)
    l = np.where(has[:, None], np.clip(nearest(iscale[:, None] * scales), -32, 31), -32)
    d_b, d = f16(np.where(has, F32(1) / iscale, F32(0)))
    dj = d[:, None] * l.astype(F32)
    with np.errstate(all="ignore"):
        requant = np.clip(nearest(x.reshape(nb, 16, 16) / _safe(dj)[:, :, None]), -4, 3) + 4
    L = np.where((dj != 0)[:, :, None], requant, L).reshape(nb, 256)
    hm = np.zeros((nb, 32), np.uint8)
    for j in range(256):
        hm[:, j % 32] |= ((L[:, j] > 3).astype(np.uint8) << (j // 32))
    out = np.zeros((nb, 110), np.uint8)
    out[:, 0:32] = hm
    out[:, 32:96] = gguf._pack_crumbs(np.where(L > 3, L - 4, L))
    out[:, 96:108] = np.where(has[:, None], gguf._pack_q3k_scales(l), 0)
    out[:, 108:110] = d_b
    return out


def quant_q45_k(x, tt):
    nb = x.shape[0]
    nmax, rmin, nstep = (15, -1.0, 20) if tt == T.Q4_K else (31, -0.5, 15)
    xs = x.reshape(nb * 8, 32)
    s2 = np.zeros(nb * 8, F32)
    for i in range(32):
        s2 = s2 + xs[:, i] * xs[:, i]
    av = np.sqrt(s2 / F32(32))
    L, scales, mins = qkx2_quants(xs, av[:, None] + np.abs(xs), nmax, rmin, 0.1, nstep, False)
    L, scales, mins = L.reshape(nb, 8, 32), scales.reshape(nb, 8), mins.reshape(nb, 8)
    ms, mm = np.maximum(scales.max(axis=1), F32(0)), np.maximum(mins.max(axis=1), F32(0))
    inv_s = np.where(ms > 0, F32(63) / _safe(ms), F32(0)).astype(F32)
    inv_m = np.where(mm > 0, F32(63) / _safe(mm), F32(0)).astype(F32)
    ls = np.minimum(63, nearest(inv_s[:, None] * scales) & 0xFF)
    lm = np.minimum(63, nearest(inv_m[:, None] * mins) & 0xFF)
    d_b, d = f16(ms / F32(63))
    dm_b, dm = f16(mm / F32(63))
    dj = d[:, None] * ls.astype(F32)
    dmj = dm[:, None] * lm.astype(F32)
    with np.errstate(all="ignore"):
        requant = np.clip(nearest((x.reshape(nb, 8, 32) + dmj[:, :, None]) / _safe(dj)[:, :, None]), 0, nmax)
    L = np.where((dj != 0)[:, :, None], requant, L).reshape(nb, 256)
    out = np.zeros((nb, gguf.GGML_BLOCK[tt][1]), np.uint8)
    out[:, 0:2], out[:, 2:4] = d_b, dm_b
    out[:, 4:16] = gguf._pack_q4k_scales(ls, lm)
    qs, qh = gguf._pack_q45k_values(L)
    if tt == T.Q4_K:
        out[:, 16:144] = qs
    else:
        out[:, 16:48], out[:, 48:176] = qh, qs
    return out


def quant_q6_k(x):
    nb = x.shape[0]
    L, scales = qx_quants(x.reshape(nb * 16, 16), 32)
    L, scales = L.reshape(nb, 16, 16), scales.reshape(nb, 16)
    ms, amax = _first_absmax(scales)
    zero = amax < EPS
    iscale = F32(-128) / _safe(ms)
    d_b, d = f16(F32(1) / iscale)
    sc = np.minimum(127, nearest(iscale[:, None] * scales))
    dj = d[:, None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        requant = np.clip(nearest(x.reshape(nb, 16, 16) / _safe(dj)[:, :, None]), -32, 31) + 32
    L = np.where((dj != 0)[:, :, None], requant, L).reshape(nb, 256)
    ql, qh = gguf._pack_q6k_values(L - 32)
    out = np.zeros((nb, 210), np.uint8)
    out[:, 0:128], out[:, 128:192] = ql, qh
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d_b
    out[zero] = 0
    return out


def quantize_rows(x, tt):
    """float32 (rows, n) -> bytes of the rows in type tt (ggml's reference quantiser)."""
    x = np.ascontiguousarray(x, dtype=F32)
    if tt == T.F32:
        return x.astype("<f4").tobytes()
    if tt == T.F16:
        return x.astype("<f2").tobytes()
    if tt == T.Q8_0:
        return gguf.quantize_q8_0(x).tobytes()
    bs = gguf.GGML_BLOCK[tt][0]
    blocks = x.reshape(-1, bs)
    with np.errstate(all="ignore"):
        if tt in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
            out = quant_legacy(blocks, tt)
        elif tt == T.Q2_K:
            out = quant_q2_k(blocks)
        elif tt == T.Q3_K:
            out = quant_q3_k(blocks)
        elif tt in (T.Q4_K, T.Q5_K):
            out = quant_q45_k(blocks, tt)
        elif tt == T.Q6_K:
            out = quant_q6_k(blocks)
        else:
            raise QuantizeError("cannot quantize to %s" % gguf.GGML_TYPE_NAME[tt])
    return out.tobytes()


# ---------------------------------------------------------------------------------- the file

def _u32_kv(key, v):
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<II", 4, v)


def quantize_file(src, dst, preset, allow_requantize=False):
    preset = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(preset.upper(), preset.upper())
    if preset not in PRESETS:
        raise QuantizeError("unknown preset %s" % preset)
    kvs, tensors, align = read_gguf(src)
    if align != 32:
        raise QuantizeError("general.alignment %d" % align)
    meta = dict((k, v) for k, _, v in kvs)
    arch = meta["general.architecture"].decode()
    hp = dict(arch=arch, n_layer=meta[arch + ".block_count"], n_expert=meta.get(arch + ".expert_count") or 0,
              n_head=meta.get(arch + ".attention.head_count") or 0)
    hp["n_head_kv"] = meta.get(arch + ".attention.head_count_kv", hp["n_head"])
    tensors.sort(key=sort_key)
    plan(hp, preset, tensors)
    drop = ("general.quantization_version", "general.file_type", "split.no", "split.count", "split.tensors.count")
    out_kv = [struct.pack("<Q", len(k.encode())) + k.encode() + v for k, v, _ in kvs if k not in drop]
    out_kv += [_u32_kv("general.quantization_version", 2), _u32_kv("general.file_type", PRESETS[preset][0])]
    infos, datas, off = [], [], 0
    for t in tensors:
        nd, ne = n_dims(t["ne"]), t["ne"]
        shape = tuple(reversed(ne[:nd]))
        if t["target"] == t["type"]:
            data = t["data"]
        else:
            if t["type"] in QUANTIZED and not allow_requantize:
                raise QuantizeError("%s is already %s" % (t["name"], gguf.GGML_TYPE_NAME[t["type"]]))
            x = gguf.dequantize(np.frombuffer(t["data"], np.uint8), t["type"], shape).reshape(-1, ne[0])
            data = quantize_rows(x, t["target"])
        name = t["name"].encode()
        infos.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", nd) +
                     struct.pack("<%dQ" % nd, *ne[:nd]) + struct.pack("<IQ", t["target"], off))
        datas.append(data)
        off = gguf.align_up(off + len(data), 32)
    head = struct.pack("<IIQQ", gguf.GGUF_MAGIC, 3, len(tensors), len(out_kv)) + b"".join(out_kv) + b"".join(infos)
    with open(dst, "wb") as f:
        f.write(head + b"\0" * (gguf.align_up(len(head), 32) - len(head)))
        for d in datas:
            f.write(d)
            f.write(b"\0" * (gguf.align_up(len(d), 32) - len(d)))


# ---------------------------------------------------------------------------------- check against the C code

# the committed float models, and a K-quant-sized one requantised from its Q6_K form
CHECK_FILES = [("qwen2-gqa.gguf", False), ("qwen2-gqa-f16.gguf", False), ("qwen2-gqa-bf16.gguf", False),
               ("llama-mha.gguf", False), ("hybrid-max.gguf", False), ("mole.gguf", False),
               ("qwen2-k-q6_k.gguf", True)]


def check(codemoe, fixtures):
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, requant in CHECK_FILES:
            src = os.path.join(fixtures, "models", name)
            for preset in PRESETS:
                want, got = os.path.join(tmp, "want.gguf"), os.path.join(tmp, "got.gguf")
                for p in (want, got):
                    if os.path.exists(p):
                        os.unlink(p)
                try:
                    quantize_file(src, want, preset, requant)
                    err = None
                except QuantizeError as e:
                    err = str(e)
                cmd = [codemoe, "quantize", src, got, preset] + (["--allow-requantize"] if requant else [])
                r = subprocess.run(cmd, capture_output=True, text=True)
                if err is not None:
                    ok = r.returncode != 0 and not os.path.exists(got)
                    what = "both refuse (%s)" % err
                else:
                    ok = r.returncode == 0 and open(want, "rb").read() == open(got, "rb").read()
                    what = "identical"
                print("%-4s %-22s %-7s %s" % ("ok" if ok else "FAIL", name, preset,
                                              what if ok else "codemoe: %s %s" % (r.returncode, r.stderr.strip())))
                failed += not ok
    # the quantisers on data built to reach every branch (zero and constant blocks, outliers, one sign)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((8, 512)) * np.exp(rng.standard_normal((8, 1)))).astype(F32)
    x[1, :64] = 0
    x[2, :32] = F32(0.0123)
    x[3] = np.abs(x[3])
    x[4, ::37] *= 30
    with tempfile.TemporaryDirectory() as tmp:
        w = gguf.GGUFWriter(os.path.join(tmp, "in.gguf"))
        w.add_string("general.architecture", "llama")
        w.add_uint32("llama.block_count", 1)
        w.add_tensor("blk.0.ffn_up.weight", x, T.F32)
        w.write()
        for preset in PRESETS:
            want, got = os.path.join(tmp, "want.gguf"), os.path.join(tmp, "got.gguf")
            quantize_file(os.path.join(tmp, "in.gguf"), want, preset)
            r = subprocess.run([codemoe, "quantize", os.path.join(tmp, "in.gguf"), got, preset], capture_output=True,
                               text=True)
            ok = r.returncode == 0 and open(want, "rb").read() == open(got, "rb").read()
            print("%-4s %-22s %-7s %s" % ("ok" if ok else "FAIL", "edge-cases", preset, "identical" if ok else r.stderr))
            failed += not ok
    print("quantize.py check: %d failed" % failed)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------- against llama-quantize

def _test_weights(rng, shape):
    """Random weights with per-row scales, sprinkled outliers, a zero and a constant stretch, a one-signed
    row: every branch of the quantisers gets data."""
    x = rng.standard_normal(shape).astype(F32)
    x *= (np.exp(rng.standard_normal(shape[:-1] + (1,)) * 0.7) * 0.05).astype(F32)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, size=max(1, flat.size // 500))] *= F32(20)
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] > 3:
        rows[1, :64] = 0
        rows[2, :32] = F32(0.0123)
        rows[3, :] = np.abs(rows[3, :])
    return x


def _test_model(path, arch, D, F, L, H, KV, vocab, tied, tt, n_exp=0, seed=0, every_type=False):
    rng = np.random.default_rng(seed)
    VT = gguf.GGUFValueType
    w = gguf.GGUFWriter(path)
    w.add_string("general.architecture", arch)
    w.add_string("general.name", os.path.basename(path)[:-5])
    w.add_uint32("general.file_type", {T.F32: 0, T.F16: 1, T.BF16: 32}[tt])
    for k, v in (("context_length", 256), ("embedding_length", D), ("block_count", L), ("feed_forward_length", F),
                 ("attention.head_count", H), ("attention.head_count_kv", KV)):
        w.add_uint32(arch + "." + k, v)
    w.add_float32(arch + ".attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(arch + ".rope.freq_base", 10000.0)
    if n_exp:
        w.add_uint32(arch + ".expert_count", n_exp)
        w.add_uint32(arch + ".expert_used_count", 2)
    if every_type:  # one key of every value type, arrays of several
        w.add_uint8("test.u8", 7), w.add_int8("test.i8", -3), w.add_uint16("test.u16", 65535)
        w.add_int16("test.i16", -2), w.add_uint64("test.u64", 1 << 40), w.add_int64("test.i64", -(1 << 40))
        w.add_float64("test.f64", 0.1), w.add_bool("test.bool", True), w.add_string("test.str", "a\tb")
        w.add_array("test.arr_i32", [1, -2, 3], VT.INT32), w.add_array("test.arr_f32", [0.5, 1.5], VT.FLOAT32)
        w.add_array("test.arr_str", ["a", "", "\u00fc"], VT.STRING), w.add_array("test.arr_bool", [True, False], VT.BOOL)

    def t(name, shape):
        w.add_tensor(name, _test_weights(rng, shape), tt if len(shape) > 1 else T.F32)

    hd = D // H
    t("token_embd.weight", (vocab, D))
    for i in range(L):
        p = "blk.%d." % i
        t(p + "attn_norm.weight", (D,))
        t(p + "attn_q.weight", (H * hd, D)), t(p + "attn_k.weight", (KV * hd, D)), t(p + "attn_v.weight", (KV * hd, D))
        if arch == "qwen2":
            t(p + "attn_q.bias", (H * hd,)), t(p + "attn_k.bias", (KV * hd,)), t(p + "attn_v.bias", (KV * hd,))
        t(p + "attn_output.weight", (D, H * hd))
        t(p + "ffn_norm.weight", (D,))
        if n_exp:
            w.add_tensor(p + "ffn_gate_inp.weight", rng.standard_normal((n_exp, D)).astype(F32), T.F32)
            t(p + "ffn_gate_exps.weight", (n_exp, F, D)), t(p + "ffn_up_exps.weight", (n_exp, F, D))
            t(p + "ffn_down_exps.weight", (n_exp, D, F))
        else:
            t(p + "ffn_gate.weight", (F, D)), t(p + "ffn_up.weight", (F, D)), t(p + "ffn_down.weight", (D, F))
    t("output_norm.weight", (D,))
    if not tied:
        t("output.weight", (vocab, D))
    w.write()


def write_inputs(out):
    """The models docs/quantize.md compares on (about 75 MB)."""
    _test_model(out + "/qwen2-big.gguf", "qwen2", 256, 512, 16, 8, 2, 512, False, T.F32, seed=1, every_type=True)
    _test_model(out + "/qwen2-tied-f16.gguf", "qwen2", 256, 384, 8, 4, 4, 320, True, T.F16, seed=2)
    _test_model(out + "/llama-odd-bf16.gguf", "llama", 96, 160, 4, 4, 2, 300, False, T.BF16, seed=3)
    _test_model(out + "/llama-moe8.gguf", "llama", 256, 256, 4, 8, 2, 300, False, T.F32, n_exp=8, seed=4)


def compare(llama_quantize, codemoe, inputs):
    """Both tools on every input and preset: a markdown table of = (identical), DIFF, or refusals."""
    print("| input | " + " | ".join(PRESETS) + " |")
    print("|---|" + "---|" * len(PRESETS))
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        ref, out = os.path.join(tmp, "ref.gguf"), os.path.join(tmp, "out.gguf")
        for src in inputs:
            cells = []
            for preset in PRESETS:
                for p in (ref, out):
                    if os.path.exists(p):
                        os.unlink(p)
                a = subprocess.run([llama_quantize, src, ref, preset, "2"], capture_output=True).returncode
                b = subprocess.run([codemoe, "quantize", src, out, preset], capture_output=True).returncode
                if a and b:
                    cells.append("both refuse")
                elif a or b:
                    cells.append("rc %d/%d" % (a, b))
                else:
                    cells.append("=" if open(ref, "rb").read() == open(out, "rb").read() else "DIFF")
                bad += cells[-1] not in ("=", "both refuse")
            print("| %s | %s |" % (os.path.basename(src)[:-5], " | ".join(cells)))
    return 1 if bad else 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "check":
        args = dict(zip(argv[2::2], argv[3::2]))
        return check(args["--codemoe"], args["--fixtures"])
    if len(argv) == 3 and argv[1] == "inputs":
        write_inputs(argv[2])
        return 0
    if len(argv) >= 6 and argv[1] == "compare" and argv[2] == "--llama-quantize" and argv[4] == "--codemoe":
        return compare(argv[3], argv[5], argv[6:])
    pos = [a for a in argv[1:] if not a.startswith("--")]
    if len(pos) != 3:
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    try:
        quantize_file(pos[0], pos[1], pos[2], "--allow-requantize" in argv)
    except QuantizeError as e:
        print("quantize.py: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
