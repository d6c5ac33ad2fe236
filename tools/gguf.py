"""gguf.py - a small GGUF (v3) writer and reader in numpy, written from the format spec.

Layout of a GGUF file (all little-endian):
    u32 magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x  (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `alignment`, then the data section; each tensor's offset is relative to the data section
    and a multiple of `alignment` (general.alignment, default 32).
A string is u64 length + bytes (no NUL). An array is u32 element type + u64 count + elements.
ne[0] is the innermost (row) dimension, so a numpy array of shape (rows, cols) has ne = (cols, rows).

Tensor types handled: F32, F16, BF16, Q8_0 (blocks of 32 values: f16 scale d, then 32 int8 q; x = d*q), and
the block types llama-quantize writes, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K (see "block quants" below).

Writing streams: tensors may be given as callables that produce the array when it is written, so a model
larger than RAM/3 can be written one tensor at a time (the header only needs shapes and types).

    w = GGUFWriter("m.gguf")
    w.add_string("general.architecture", "qwen2")
    w.add_uint32("qwen2.block_count", 2)
    w.add_array("tokenizer.ggml.tokens", ["a", "b"], GGUFValueType.STRING)
    w.add_tensor("token_embd.weight", emb, GGMLType.F16)            # ndarray (f32) converted at write
    w.add_tensor("blk.0.ffn_up.weight", lambda: make(), GGMLType.Q8_0, shape=(F, D))  # lazy
    w.write()

    r = GGUFReader("m.gguf")
    r.fields["qwen2.block_count"].value ; r.tensors["token_embd.weight"].dequantize()  # f32, numpy shape

Command line: python3 tools/gguf.py dump FILE   (metadata and tensor table)
"""

import os
import struct
import sys

import numpy as np

GGUF_MAGIC = 0x46554747  # b"GGUF" read as a little-endian u32
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32


class GGUFValueType:
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


VT = GGUFValueType

# struct format of each scalar value type
_VT_FMT = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
_VT_NP = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
    VT.FLOAT32: "<f4", VT.BOOL: "<u1", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8",
}
_VT_NAME = {v: k for k, v in vars(GGUFValueType).items() if not k.startswith("_")}


class GGMLType:
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# (block size in elements, bytes per block)
GGML_BLOCK = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.Q8_0: (32, 34),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144), GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
}
GGML_TYPE_NAME = {v: k for k, v in vars(GGMLType).items() if not k.startswith("_")}
QK8_0 = 32


def align_up(n, a):
    return (n + a - 1) // a * a


# ---------------------------------------------------------------------------------- conversions

def f32_to_bf16(x):
    """float32 array -> uint16 bf16 bits, round to nearest even (NaN kept quiet), as ggml does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if nan.any():
        r = np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)
    return r


def bf16_to_f32(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def quantize_q8_0(x):
    """float32 (..., n) with n % 32 == 0 -> uint8 bytes (..., n/32*34).

    Per block of 32: amax = max|x|, d = amax/127 (float32), q = round-half-away(x * (1/d)), d stored f16.
    Rounding is done in float64 on the float32 product so that values like 0.49999997 do not round up
    (C's roundf semantics)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK8_0:
        raise ValueError("Q8_0 row length %d not a multiple of %d" % (x.shape[-1], QK8_0))
    lead = x.shape[:-1]
    nb = x.shape[-1] // QK8_0
    blk = x.reshape(-1, QK8_0)
    amax = np.abs(blk).max(axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    v = (blk * idd[:, None]).astype(np.float32).astype(np.float64)
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)
    out = np.empty((blk.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(lead + (nb * 34,))


def dequantize_q8_0(b, n):
    """uint8 bytes (..., n/32*34) -> float32 (..., n)."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    lead = b.shape[:-1]
    blk = b.reshape(-1, 34)
    d = blk[:, 0:2].copy().view("<f2").astype(np.float32)  # (nblk, 1)
    q = blk[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).astype(np.float32).reshape(lead + (n,))


# ---------------------------------------------------------------------------------- block quants
#
# The block formats llama-quantize writes (besides Q8_0), written from their description: every value is
# a small integer q times a scale (plus an offset), packed in fixed-size blocks.
#   legacy, 32 values:  Q4_0 {f16 d, 16 B nibbles}               x = d * (q - 8)
#                       Q4_1 {f16 d, f16 m, 16 B nibbles}        x = d * q + m
#                       Q5_0 {f16 d, u32 qh, 16 B nibbles}       x = d * (q - 16)
#                       Q5_1 {f16 d, f16 m, u32 qh, 16 B}        x = d * q + m
#     byte j of the nibbles holds value j (low) and j + 16 (high); bit j of qh is value j's fifth bit.
#   K-quants, 256 values in sub-blocks, each sub-block with an integer scale sc (and min mn):
#     Q2_K {16 B sc|mn<<4, 64 B 2-bit q, f16 d, f16 dmin}        x = (d*sc) * q - dmin*mn, 16 per sub
#     Q3_K {32 B hmask, 64 B 2-bit q, 12 B 6-bit sc, f16 d}      x = (d*(sc-32)) * (q - 4), 16 per sub
#     Q4_K {f16 d, f16 dmin, 12 B 6-bit sc/mn, 128 B nibbles}    x = (d*sc) * q - dmin*mn, 32 per sub
#     Q5_K {f16 d, f16 dmin, 12 B, 32 B qh, 128 B nibbles}       same with a fifth bit
#     Q6_K {128 B low nibbles, 64 B 2-bit highs, 16 int8 sc, f16 d}  x = (d*sc) * (q - 32), 16 per sub
#   2-bit fields (Q2_K, Q3_K low bits, Q6_K highs): value 128h + 32s + l sits at bits 2s of byte 32h + l.
#   Q3_K's third bit of value v is bit v // 32 of hmask[v % 32]. Q4_K/Q5_K: value 64c + 32h + l is
#   nibble h of byte 32c + l, its fifth bit (Q5_K) bit 2c + h of qh[l]. Q6_K: value 128h + 32s + l
#   has its low nibble in byte 64h + 32(s & 1) + l (low nibble for s < 2, high for s >= 2).
#   Q3_K scales: sub-block j's low 4 bits are byte j & 0xF (j < 8) or byte j-8 >> 4, its top 2 bits
#   are bits 2(j // 4) of byte 8 + j % 4. Q4_K/Q5_K scales (8 sub-blocks, 6-bit sc and mn): j < 4 in
#   the low 6 bits of bytes j (sc) and j + 4 (mn); j >= 4: low nibbles in byte j + 4 (sc low, mn high),
#   top 2 bits in the top bits of bytes j - 4 (sc) and j (mn).
# Every float step is a float32 operation in the order written above, so a C dequantiser that does the
# same gives the same bits (tests/fixtures/golden/quants.gguf).

F32 = np.float32


def _f16(blk, off):
    """(nb, 1) float32 from the f16 at byte off of each block."""
    return blk[:, off:off + 2].copy().view("<f2").astype(F32)


def _put_f16(blk, off, v):
    blk[:, off:off + 2] = np.asarray(v, dtype=F32).astype("<f2").reshape(-1, 1).view(np.uint8)


def _nibbles32(qs):
    """(nb, 16) bytes -> (nb, 32) values: low nibbles then high nibbles."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)


def _pack_nibbles32(q):
    q = q.astype(np.uint8)
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _bits32(qh):
    """(nb, 4) bytes -> (nb, 32) bits, bit j of the little-endian u32."""
    u = qh.copy().view("<u4").astype(np.uint64)  # (nb, 1)
    return ((u >> np.arange(32, dtype=np.uint64)) & 1).astype(np.int32)


def _pack_bits32(b):
    u = (b.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=1).astype("<u4")
    return u.reshape(-1, 1).view(np.uint8)


_HS = (np.arange(2).reshape(1, 2, 1, 1), np.arange(4).reshape(1, 1, 4, 1))  # h, s of value 128h + 32s + l


def _crumbs(qs):
    """(nb, 64) bytes -> (nb, 256) 2-bit fields in value order."""
    h, s = _HS
    return ((qs.reshape(-1, 2, 1, 32) >> (2 * s)) & 3).reshape(-1, 256).astype(np.int32)


def _pack_crumbs(q):
    h, s = _HS
    return (q.reshape(-1, 2, 4, 32).astype(np.uint8) << (2 * s).astype(np.uint8)).sum(axis=2, dtype=np.uint8) \
        .reshape(-1, 64)


def _q3k_scales(s):
    j = np.arange(16)
    low = np.where(j < 8, s[:, j % 8] & 0xF, s[:, j % 8] >> 4)
    top = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (top << 4)).astype(np.int32) - 32


def _pack_q3k_scales(sc):
    u = (sc + 32).astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, :8] = (u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)
    for j in range(16):
        out[:, 8 + j % 4] |= ((u[:, j] >> 4) & 3) << (2 * (j // 4))
    return out


def _q4k_scales(s):
    sc = np.empty((s.shape[0], 8), dtype=np.int32)
    mn = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[:, j] = s[:, j] & 63
            mn[:, j] = s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, mn


def _pack_q4k_scales(sc, mn):
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    for j in range(8):
        if j < 4:
            out[:, j] |= sc[:, j] & 63
            out[:, j + 4] |= mn[:, j] & 63
        else:
            out[:, j + 4] = (sc[:, j] & 0xF) | ((mn[:, j] & 0xF) << 4)
            out[:, j - 4] |= (sc[:, j] >> 4) << 6
            out[:, j] |= (mn[:, j] >> 4) << 6
    return out


def _q45k_values(qs, qh=None):
    """Q4_K/Q5_K quants: (nb, 128) nibble bytes (+ (nb, 32) qh) -> (nb, 256)."""
    b = qs.reshape(-1, 4, 1, 32)
    half = np.arange(2).reshape(1, 1, 2, 1)
    q = ((b >> (4 * half)) & 0xF).astype(np.int32)
    if qh is not None:
        c = np.arange(4).reshape(1, 4, 1, 1)
        q |= (((qh.reshape(-1, 1, 1, 32) >> (2 * c + half)) & 1) << 4).astype(np.int32)
    return q.reshape(-1, 256)


def _pack_q45k_values(q):
    q = q.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    c = np.arange(4).reshape(1, 4, 1, 1).astype(np.uint8)
    half = np.arange(2).reshape(1, 1, 2, 1).astype(np.uint8)
    qh = (((q >> 4) & 1) << (2 * c + half)).sum(axis=(1, 2), dtype=np.uint8)
    return qs, qh


def _q6k_values(ql, qh):
    """(nb, 128) low-nibble bytes, (nb, 64) high-crumb bytes -> (nb, 256) values q - 32."""
    q = np.empty((ql.shape[0], 2, 4, 32), dtype=np.int32)
    for h in range(2):
        for s in range(4):
            lb = ql[:, 64 * h + 32 * (s & 1):64 * h + 32 * (s & 1) + 32]
            low = lb & 0xF if s < 2 else lb >> 4
            q[:, h, s] = low | (((qh[:, 32 * h:32 * h + 32] >> (2 * s)) & 3) << 4)
    return q.reshape(-1, 256) - 32


def _pack_q6k_values(q):
    u = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.zeros((u.shape[0], 2, 2, 32), dtype=np.uint8)
    for s in range(4):
        ql[:, :, s & 1] |= (u[:, :, s] & 0xF) << (0 if s < 2 else 4)
    qh = np.zeros((u.shape[0], 2, 32), dtype=np.uint8)
    for s in range(4):
        qh |= ((u[:, :, s] >> 4) & 3) << (2 * s)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _deq_sub(d, sc, q, sub, dmin=None, mn=None):
    """(d*sc) * q [- dmin*mn] per sub-block, all float32 steps."""
    nb = q.shape[0]
    dl = (d * sc.astype(F32)).astype(F32)[:, :, None]
    y = (dl * q.reshape(nb, -1, sub).astype(F32)).astype(F32)
    if dmin is not None:
        y = (y - (dmin * mn.astype(F32)).astype(F32)[:, :, None]).astype(F32)
    return y.reshape(nb, 256)


def _dequant_blocks(blk, ttype):
    """(nb, bytes) uint8 blocks -> (nb, values) float32."""
    T = GGMLType
    if ttype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        has_m = ttype in (T.Q4_1, T.Q5_1)
        d = _f16(blk, 0)
        o = 4 if has_m else 2
        if ttype in (T.Q5_0, T.Q5_1):
            q = _nibbles32(blk[:, o + 4:o + 20]) | (_bits32(blk[:, o:o + 4]) << 4)
        else:
            q = _nibbles32(blk[:, o:o + 16])
        if has_m:
            return (d * q.astype(F32) + _f16(blk, 2)).astype(F32)
        return (d * (q - (16 if ttype == T.Q5_0 else 8)).astype(F32)).astype(F32)
    if ttype == T.Q2_K:
        s = blk[:, 0:16]
        return _deq_sub(_f16(blk, 80), s & 0xF, _crumbs(blk[:, 16:80]), 16, _f16(blk, 82), s >> 4)
    if ttype == T.Q3_K:
        h, s = _HS
        hb = (blk[:, 0:32].reshape(-1, 1, 1, 32) >> (4 * h + s)) & 1
        q = _crumbs(blk[:, 32:96]) - 4 * (1 - hb.reshape(-1, 256).astype(np.int32))
        return _deq_sub(_f16(blk, 108), _q3k_scales(blk[:, 96:108]), q, 16)
    if ttype in (T.Q4_K, T.Q5_K):
        sc, mn = _q4k_scales(blk[:, 4:16])
        q = _q45k_values(blk[:, 16:144]) if ttype == T.Q4_K else _q45k_values(blk[:, 48:176], blk[:, 16:48])
        return _deq_sub(_f16(blk, 0), sc, q, 32, _f16(blk, 2), mn)
    if ttype == T.Q6_K:
        return _deq_sub(_f16(blk, 208), blk[:, 192:208].view(np.int8), _q6k_values(blk[:, 0:128], blk[:, 128:192]), 16)
    raise ValueError("not a block type: %r" % ttype)


def _put_legacy_q(out, o, q, five):
    """Legacy quants q (nb, 32) into the blocks from byte o: the u32 of fifth bits (Q5_*), then nibbles."""
    if five:
        out[:, o:o + 4] = _pack_bits32(q >> 4)
        o += 4
    out[:, o:o + 16] = _pack_nibbles32(q & 0xF)


def _safe_inv(d):
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def _round_clip(v, lo, hi):
    return np.clip(np.rint(v.astype(np.float64)), lo, hi).astype(np.int32)


def _quant_blocks(x, ttype):
    """float32 (nb, values) -> (nb, bytes) uint8. A plain quantiser: per-(sub-)block range -> scale,
    nearest integer; the K-quants' sub-block scales are themselves rounded to their few bits first and
    the values quantised with the rounded scales. Good enough to store tensors; not llama.cpp's
    error-minimising search."""
    T = GGMLType
    nb = x.shape[0]
    out = np.zeros((nb, GGML_BLOCK[ttype][1]), dtype=np.uint8)
    if ttype in (T.Q4_0, T.Q5_0):
        n = 8 if ttype == T.Q4_0 else 16
        # the value of largest magnitude maps to -n, the one end of the range that is exactly reachable
        big = x[np.arange(nb), np.abs(x).argmax(axis=1)]
        d = (big / F32(-n)).astype("<f2").astype(F32)
        q = _round_clip(x * _safe_inv(d)[:, None], -n, n - 1) + n
        _put_f16(out, 0, d)
        _put_legacy_q(out, 2, q, ttype == T.Q5_0)
        return out
    if ttype in (T.Q4_1, T.Q5_1):
        n = 15 if ttype == T.Q4_1 else 31
        lo, hi = x.min(axis=1), x.max(axis=1)
        d = ((hi - lo) / F32(n)).astype("<f2").astype(F32)
        m = lo.astype("<f2").astype(F32)
        q = _round_clip((x - m[:, None]) * _safe_inv(d)[:, None], 0, n)
        _put_f16(out, 0, d)
        _put_f16(out, 2, m)
        _put_legacy_q(out, 4, q, ttype == T.Q5_1)
        return out
    sub = 32 if ttype in (T.Q4_K, T.Q5_K) else 16
    xs = x.reshape(nb, -1, sub)
    if ttype in (T.Q2_K, T.Q4_K, T.Q5_K):
        nq, nsc = {T.Q2_K: (3, 15), T.Q4_K: (15, 63), T.Q5_K: (31, 63)}[ttype]
        mn_f = np.maximum(-xs.min(axis=2), F32(0)).astype(F32)          # x >= -mn
        sc_f = ((xs.max(axis=2) + mn_f) / F32(nq)).astype(F32)          # step of q
        d = (sc_f.max(axis=1) / F32(nsc)).astype("<f2").astype(F32)
        dmin = (mn_f.max(axis=1) / F32(nsc)).astype("<f2").astype(F32)
        sc = _round_clip(sc_f * _safe_inv(d)[:, None], 0, nsc)
        mn = _round_clip(mn_f * _safe_inv(dmin)[:, None], 0, nsc)
        step = (d[:, None] * sc.astype(F32)).astype(F32)
        off = (dmin[:, None] * mn.astype(F32)).astype(F32)
        q = _round_clip((xs + off[:, :, None]) * _safe_inv(step)[:, :, None], 0, nq).reshape(nb, 256)
        if ttype == T.Q2_K:
            out[:, 0:16] = (sc | (mn << 4)).astype(np.uint8)
            out[:, 16:80] = _pack_crumbs(q)
            _put_f16(out, 80, d)
            _put_f16(out, 82, dmin)
        else:
            _put_f16(out, 0, d)
            _put_f16(out, 2, dmin)
            out[:, 4:16] = _pack_q4k_scales(sc, mn)
            qs, qh = _pack_q45k_values(q)
            if ttype == T.Q4_K:
                out[:, 16:144] = qs
            else:
                out[:, 16:48] = qh
                out[:, 48:176] = qs
        return out
    # symmetric: Q3_K (q in -4..3, scales -32..31), Q6_K (q in -32..31, scales -128..127)
    nq, nsc = (4, 31) if ttype == T.Q3_K else (32, 127)
    sc_f = (np.abs(xs).max(axis=2) / F32(nq)).astype(F32)
    d = (sc_f.max(axis=1) / F32(nsc)).astype("<f2").astype(F32)
    sc = _round_clip(sc_f * _safe_inv(d)[:, None], 0, nsc)
    step = (d[:, None] * sc.astype(F32)).astype(F32)
    q = _round_clip(xs * _safe_inv(step)[:, :, None], -nq, nq - 1).reshape(nb, 256)
    if ttype == T.Q3_K:
        h, s = _HS
        u = (q + 4).reshape(-1, 2, 4, 32)
        hm = ((u >> 2).astype(np.uint8) << (4 * h + s).astype(np.uint8)).sum(axis=(1, 2), dtype=np.uint8)
        out[:, 0:32] = hm
        out[:, 32:96] = _pack_crumbs((u & 3).reshape(-1, 256))
        out[:, 96:108] = _pack_q3k_scales(sc)
        _put_f16(out, 108, d)
    else:
        ql, qh = _pack_q6k_values(q)
        out[:, 0:128] = ql
        out[:, 128:192] = qh
        out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
        _put_f16(out, 208, d)
    return out


BLOCK_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q3_K,
               GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)


def quantize_blocks(x, ttype):
    """float32 (..., n), n a multiple of the block -> uint8 (..., n/block*bytes)."""
    x = np.ascontiguousarray(x, dtype=F32)
    bs, bb = GGML_BLOCK[ttype]
    if x.shape[-1] % bs:
        raise ValueError("%s row length %d not a multiple of %d" % (GGML_TYPE_NAME[ttype], x.shape[-1], bs))
    lead = x.shape[:-1]
    return _quant_blocks(x.reshape(-1, bs), ttype).reshape(lead + (x.shape[-1] // bs * bb,))


def dequantize_blocks(b, ttype, n):
    """uint8 (..., n/block*bytes) -> float32 (..., n)."""
    bs, bb = GGML_BLOCK[ttype]
    b = np.ascontiguousarray(b, dtype=np.uint8)
    lead = b.shape[:-1]
    return _dequant_blocks(b.reshape(-1, bb), ttype).reshape(lead + (n,))


def quantize(x, ttype):
    """float32 array (numpy shape, last dim = row) -> array of the on-disk element type."""
    if ttype == GGMLType.F32:
        return np.ascontiguousarray(x, dtype="<f4")
    if ttype == GGMLType.F16:
        return np.ascontiguousarray(x, dtype=np.float32).astype("<f2")
    if ttype == GGMLType.BF16:
        return f32_to_bf16(x)
    if ttype == GGMLType.Q8_0:
        return quantize_q8_0(x)
    if ttype in BLOCK_TYPES:
        return quantize_blocks(x, ttype)
    raise ValueError("cannot quantize to type %s" % GGML_TYPE_NAME.get(ttype, ttype))


def dequantize(raw, ttype, shape):
    """on-disk data (any view) -> float32 of numpy `shape`."""
    n = shape[-1] if shape else 1
    if ttype == GGMLType.F32:
        return np.asarray(raw).view("<f4").astype(np.float32).reshape(shape)
    if ttype == GGMLType.F16:
        return np.asarray(raw).view("<f2").astype(np.float32).reshape(shape)
    if ttype == GGMLType.BF16:
        return bf16_to_f32(np.asarray(raw).view("<u2")).reshape(shape)
    if ttype == GGMLType.Q8_0:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return dequantize_q8_0(np.asarray(raw).view(np.uint8).reshape(rows, n // 32 * 34), n).reshape(shape)
    if ttype in BLOCK_TYPES:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        bs, bb = GGML_BLOCK[ttype]
        return dequantize_blocks(np.asarray(raw).view(np.uint8).reshape(rows, n // bs * bb), ttype, n).reshape(shape)
    raise ValueError("cannot dequantize type %s" % GGML_TYPE_NAME.get(ttype, ttype))


def roundtrip(x, ttype):
    """What a float32 tensor becomes after storing it as ttype and reading it back."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return dequantize(quantize(x, ttype), ttype, x.shape)


def tensor_nbytes(shape, ttype):
    bs, bb = GGML_BLOCK[ttype]
    n = int(np.prod(shape)) if len(shape) else 1
    if shape and shape[-1] % bs:
        raise ValueError("row length %d not a multiple of block size %d" % (shape[-1], bs))
    return n // bs * bb


# ---------------------------------------------------------------------------------- writer

def _pack_string(s):
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _infer_vtype(v):
    if isinstance(v, bool):
        return VT.BOOL
    if isinstance(v, (int, np.integer)):
        return VT.INT32 if -2**31 <= int(v) < 2**31 else VT.INT64
    if isinstance(v, (float, np.floating)):
        return VT.FLOAT32
    if isinstance(v, (str, bytes)):
        return VT.STRING
    if isinstance(v, (list, tuple, np.ndarray)):
        return VT.ARRAY
    raise TypeError("cannot infer GGUF type of %r" % (v,))


def _pack_value(v, vtype, elem_type=None):
    if vtype == VT.STRING:
        return _pack_string(v)
    if vtype == VT.ARRAY:
        vals = list(v) if not isinstance(v, np.ndarray) else v
        if elem_type is None:
            if len(vals) == 0:
                raise ValueError("empty array needs an explicit element type")
            elem_type = _infer_vtype(vals[0])
        head = struct.pack("<IQ", elem_type, len(vals))
        if elem_type in _VT_NP:
            arr = np.asarray(vals)
            if elem_type == VT.BOOL:
                arr = arr.astype(bool).astype(np.uint8)
            return head + np.ascontiguousarray(arr.astype(_VT_NP[elem_type])).tobytes()
        if elem_type == VT.STRING:
            return head + b"".join(_pack_string(s) for s in vals)
        if elem_type == VT.ARRAY:  # nested arrays: each element is (values, elem_type) or a list
            out = [head]
            for e in vals:
                if isinstance(e, tuple) and len(e) == 2 and isinstance(e[1], int):
                    out.append(_pack_value(e[0], VT.ARRAY, e[1])[0:])
                else:
                    out.append(_pack_value(e, VT.ARRAY))
            # a nested element carries its own (type, count) prefix, which _pack_value produced
            return b"".join(out)
        raise ValueError("bad array element type %r" % elem_type)
    if vtype in _VT_FMT:
        if vtype in (VT.FLOAT32, VT.FLOAT64):
            return struct.pack(_VT_FMT[vtype], float(v))
        if vtype == VT.BOOL:
            return struct.pack("<?", bool(v))
        return struct.pack(_VT_FMT[vtype], int(v))
    raise ValueError("bad value type %r" % vtype)


class _TensorEntry:
    __slots__ = ("name", "shape", "ttype", "src", "raw", "offset", "nbytes")


class GGUFWriter:
    """Collects metadata and tensor descriptions, then writes the file in one pass.

    Tensor data is pulled at write() time, one tensor at a time: pass a callable (or an np.memmap) to
    keep peak memory at about one tensor (plus its converted copy)."""

    def __init__(self, path, alignment=None):
        self.path = path
        self.kv = {}  # key -> (vtype, value, elem_type); insertion order is file order
        self.tensors = []
        self._names = set()
        if alignment is not None:
            self.add_uint32("general.alignment", alignment)

    # -- metadata
    def add_kv(self, key, value, vtype=None, elem_type=None):
        if key in self.kv:
            raise KeyError("duplicate key %s" % key)
        if vtype is None:
            vtype = _infer_vtype(value)
        if key == "general.alignment":
            if vtype != VT.UINT32 or value <= 0 or value & (value - 1) or value % 8:
                raise ValueError("general.alignment must be a u32 power of two, multiple of 8")
        self.kv[key] = (vtype, value, elem_type)

    def add_uint8(self, k, v): self.add_kv(k, v, VT.UINT8)
    def add_int8(self, k, v): self.add_kv(k, v, VT.INT8)
    def add_uint16(self, k, v): self.add_kv(k, v, VT.UINT16)
    def add_int16(self, k, v): self.add_kv(k, v, VT.INT16)
    def add_uint32(self, k, v): self.add_kv(k, v, VT.UINT32)
    def add_int32(self, k, v): self.add_kv(k, v, VT.INT32)
    def add_uint64(self, k, v): self.add_kv(k, v, VT.UINT64)
    def add_int64(self, k, v): self.add_kv(k, v, VT.INT64)
    def add_float32(self, k, v): self.add_kv(k, v, VT.FLOAT32)
    def add_float64(self, k, v): self.add_kv(k, v, VT.FLOAT64)
    def add_bool(self, k, v): self.add_kv(k, v, VT.BOOL)
    def add_string(self, k, v): self.add_kv(k, v, VT.STRING)

    def add_array(self, k, values, elem_type=None):
        self.add_kv(k, values, VT.ARRAY, elem_type)

    @property
    def alignment(self):
        e = self.kv.get("general.alignment")
        return int(e[1]) if e else GGUF_DEFAULT_ALIGNMENT

    # -- tensors
    def add_tensor(self, name, data, ttype=GGMLType.F32, shape=None, raw=False):
        """data: float array (converted to ttype at write), or a zero-argument callable returning one
        (then `shape` is required), or, with raw=True, the already-encoded bytes/elements of ttype.
        shape is the numpy shape (last dim = row = ne[0])."""
        if name in self._names:
            raise KeyError("duplicate tensor %s" % name)
        if len(name.encode()) >= 64:
            raise ValueError("tensor name too long for ggml (max 63 bytes): %s" % name)
        if shape is None:
            if callable(data):
                raise ValueError("shape is required for a lazy tensor")
            shape = data.shape if not raw else None
            if shape is None:
                raise ValueError("shape is required for raw data")
        shape = tuple(int(s) for s in shape)
        if not 1 <= len(shape) <= 4:
            raise ValueError("tensor %s: 1..4 dims" % name)
        e = _TensorEntry()
        e.name, e.shape, e.ttype, e.src, e.raw = name, shape, ttype, data, raw
        e.nbytes = tensor_nbytes(shape, ttype)
        self.tensors.append(e)
        self._names.add(name)

    def _header(self):
        al = self.alignment
        out = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self.tensors), len(self.kv))]
        for k, (vt, v, et) in self.kv.items():
            out.append(_pack_string(k) + struct.pack("<I", vt) + _pack_value(v, vt, et))
        off = 0
        for e in self.tensors:
            e.offset = off
            ne = tuple(reversed(e.shape))
            out.append(_pack_string(e.name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
                       + struct.pack("<IQ", e.ttype, off))
            off = align_up(off + e.nbytes, al)
        h = b"".join(out)
        return h + b"\0" * (align_up(len(h), al) - len(h))

    def _encode(self, e):
        src = e.src() if callable(e.src) else e.src
        if e.raw:
            b = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
            if b.nbytes != e.nbytes:
                raise ValueError("tensor %s: raw data is %d bytes, expected %d" % (e.name, b.nbytes, e.nbytes))
            return [b]
        src = np.asarray(src)
        if tuple(src.shape) != e.shape:
            raise ValueError("tensor %s: shape %s, declared %s" % (e.name, src.shape, e.shape))
        # convert in row chunks so a huge tensor needs only ~chunk extra memory
        rows = src.reshape(-1, e.shape[-1])
        step = max(1, (64 << 20) // max(1, e.shape[-1] * 4))
        return (quantize(rows[i:i + step], e.ttype).view(np.uint8).reshape(-1) for i in range(0, rows.shape[0], step))

    def write(self):
        al = self.alignment
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self._header())
            data_start = f.tell()
            for e in self.tensors:
                assert f.tell() - data_start == e.offset
                n = 0
                for chunk in self._encode(e):
                    chunk.tofile(f)
                    n += chunk.nbytes
                chunk = None  # a view keeps the whole source tensor alive: drop it before the next
                if n != e.nbytes:
                    raise ValueError("tensor %s: wrote %d bytes, expected %d" % (e.name, n, e.nbytes))
                pad = align_up(n, al) - n
                f.write(b"\0" * pad)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------- reader

class GGUFField:
    __slots__ = ("key", "vtype", "elem_type", "value")

    def __init__(self, key, vtype, elem_type, value):
        self.key, self.vtype, self.elem_type, self.value = key, vtype, elem_type, value

    def __repr__(self):
        t = _VT_NAME.get(self.vtype, self.vtype)
        if self.vtype == VT.ARRAY:
            t += "[%s]" % _VT_NAME.get(self.elem_type, self.elem_type)
        return "GGUFField(%s, %s, %r)" % (self.key, t, self.value)


class GGUFTensor:
    __slots__ = ("name", "shape", "ttype", "offset", "nbytes", "raw")

    def dequantize(self):
        return dequantize(self.raw, self.ttype, self.shape)

    def __repr__(self):
        return "GGUFTensor(%s, %s, %s)" % (self.name, GGML_TYPE_NAME.get(self.ttype, self.ttype), self.shape)


class GGUFFormatError(ValueError):
    pass


class GGUFReader:
    """Parses a whole GGUF file (v2 or v3) over a read-only memmap. fields: key -> GGUFField (arrays of
    numbers as numpy arrays, of strings as lists of str); tensors: name -> GGUFTensor (raw = memmap view)."""

    def __init__(self, path):
        self.path = path
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0
        magic, self.version = self._unpack("<II")
        if magic != GGUF_MAGIC:
            raise GGUFFormatError("bad magic")
        if self.version not in (2, 3):
            raise GGUFFormatError("unsupported version %d" % self.version)
        n_tensors, n_kv = self._unpack("<QQ")
        self.fields = {}
        for _ in range(n_kv):
            key = self._string()
            vt = self._unpack("<I")[0]
            val, et = self._value(vt)
            if key in self.fields:
                raise GGUFFormatError("duplicate key %s" % key)
            self.fields[key] = GGUFField(key, vt, et, val)
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        if "general.alignment" in self.fields:
            fa = self.fields["general.alignment"]
            if fa.vtype != VT.UINT32 or fa.value <= 0 or fa.value & (fa.value - 1):
                raise GGUFFormatError("bad general.alignment")
            self.alignment = fa.value
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            nd = self._unpack("<I")[0]
            if not 1 <= nd <= 4:
                raise GGUFFormatError("tensor %s: %d dims" % (name, nd))
            ne = self._unpack("<%dQ" % nd)
            tt, off = self._unpack("<IQ")
            infos.append((name, ne, tt, off))
        self.data_offset = align_up(self.pos, self.alignment)
        self.tensors = {}
        for name, ne, tt, off in infos:
            t = GGUFTensor()
            t.name, t.shape, t.ttype, t.offset = name, tuple(int(x) for x in reversed(ne)), tt, off
            if tt not in GGML_BLOCK:
                raise GGUFFormatError("tensor %s: unknown type %d" % (name, tt))
            if off % self.alignment:
                raise GGUFFormatError("tensor %s: misaligned offset" % name)
            t.nbytes = tensor_nbytes(t.shape, tt)
            start = self.data_offset + off
            if start + t.nbytes > len(self.buf):
                raise GGUFFormatError("tensor %s: data past end of file" % name)
            t.raw = self.buf[start:start + t.nbytes]
            if name in self.tensors:
                raise GGUFFormatError("duplicate tensor %s" % name)
            self.tensors[name] = t

    def _need(self, n):
        if self.pos + n > len(self.buf):
            raise GGUFFormatError("truncated at offset %d" % self.pos)

    def _unpack(self, fmt):
        n = struct.calcsize(fmt)
        self._need(n)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def _string(self):
        n = self._unpack("<Q")[0]
        self._need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def _value(self, vt):
        if vt == VT.STRING:
            return self._string(), None
        if vt in _VT_FMT:
            v = self._unpack(_VT_FMT[vt])[0]
            return (bool(v) if vt == VT.BOOL else v), None
        if vt == VT.ARRAY:
            et, n = self._unpack("<IQ")
            if et in _VT_NP:
                sz = np.dtype(_VT_NP[et]).itemsize
                self._need(n * sz)
                a = np.frombuffer(self.buf, dtype=_VT_NP[et], count=n, offset=self.pos).copy()
                self.pos += n * sz
                return (a.astype(bool) if et == VT.BOOL else a), et
            if et == VT.STRING:
                return [self._string() for _ in range(n)], et
            if et == VT.ARRAY:
                return [self._value(VT.ARRAY) for _ in range(n)], et
            raise GGUFFormatError("bad array element type %d" % et)
        raise GGUFFormatError("bad value type %d" % vt)

    def get(self, key, default=None):
        f = self.fields.get(key)
        return f.value if f is not None else default


# ---------------------------------------------------------------------------------- CLI / self-test

def _dump(path):
    r = GGUFReader(path)
    print("version %d, alignment %d, %d kv, %d tensors, data at %d" % (
        r.version, r.alignment, len(r.fields), len(r.tensors), r.data_offset))
    for k, f in r.fields.items():
        v = f.value
        if f.vtype == VT.ARRAY:
            v = list(v[:8]) + (["... (%d)" % len(v)] if len(v) > 8 else [])
        print("  %-45s %-8s %s" % (k, _VT_NAME[f.vtype], v))
    for t in r.tensors.values():
        print("  %-45s %-5s %-18s off %d" % (t.name, GGML_TYPE_NAME[t.ttype], t.shape, t.offset))


def _scalar_block(b, tt):
    """One block decoded value by value with plain Python integers (a second reading of the layouts
    described under "block quants", for the self-test)."""
    b = bytes(bytearray(b))
    f16 = lambda o: np.float32(np.frombuffer(b[o:o + 2], "<f2")[0])  # noqa: E731
    T = GGMLType
    out = []
    if tt in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        m = f16(2) if tt in (T.Q4_1, T.Q5_1) else None
        o = 2 if m is None else 4
        qh = struct.unpack("<I", b[o:o + 4])[0] if tt in (T.Q5_0, T.Q5_1) else 0
        qs = b[o + 4:] if tt in (T.Q5_0, T.Q5_1) else b[o:]
        for v in range(32):
            q = (qs[v % 16] >> (4 * (v // 16))) & 0xF | (((qh >> v) & 1) << 4)
            if m is None:
                out.append(f16(0) * np.float32(q - (16 if tt == T.Q5_0 else 8)))
            else:
                out.append(f16(0) * np.float32(q) + m)
        return out
    for v in range(256):
        h, s, l = v // 128, (v % 128) // 32, v % 32
        c, half = v // 64, (v % 64) // 32
        if tt == T.Q2_K:
            sc = b[v // 16]
            q = (b[16 + 32 * h + l] >> (2 * s)) & 3
            out.append(f16(80) * np.float32(sc & 0xF) * np.float32(q) - f16(82) * np.float32(sc >> 4))
        elif tt == T.Q3_K:
            j = v // 16
            sc = ((b[96 + j] & 0xF) if j < 8 else (b[96 + j - 8] >> 4)) | (((b[104 + j % 4] >> (2 * (j // 4))) & 3) << 4)
            q = ((b[32 + 32 * h + l] >> (2 * s)) & 3) - (0 if (b[v % 32] >> (v // 32)) & 1 else 4)
            out.append(f16(108) * np.float32(sc - 32) * np.float32(q))
        elif tt in (T.Q4_K, T.Q5_K):
            j, sb = v // 32, b[4:16]
            if j < 4:
                sc, mn = sb[j] & 63, sb[j + 4] & 63
            else:
                sc, mn = (sb[j + 4] & 0xF) | ((sb[j - 4] >> 6) << 4), (sb[j + 4] >> 4) | ((sb[j] >> 6) << 4)
            qs = b[16:] if tt == T.Q4_K else b[48:]
            q = (qs[32 * c + l] >> (4 * half)) & 0xF
            if tt == T.Q5_K:
                q |= ((b[16 + l] >> (2 * c + half)) & 1) << 4
            out.append(f16(0) * np.float32(sc) * np.float32(q) - f16(2) * np.float32(mn))
        else:
            lo = (b[64 * h + 32 * (s & 1) + l] >> (4 * (s // 2))) & 0xF
            q = lo | (((b[128 + 32 * h + l] >> (2 * s)) & 3) << 4)
            sc = struct.unpack("<b", b[192 + v // 16:193 + v // 16])[0]
            out.append(f16(208) * np.float32(sc) * np.float32(q - 32))
    return out


def _selftest():
    import tempfile
    rng = np.random.default_rng(0)
    d = tempfile.mkdtemp()
    p = os.path.join(d, "t.gguf")
    w = GGUFWriter(p)
    w.add_uint32("general.alignment", 64)
    w.add_string("general.architecture", "qwen2")
    w.add_uint8("a.u8", 200); w.add_int8("a.i8", -5); w.add_uint16("a.u16", 60000); w.add_int16("a.i16", -3)
    w.add_uint32("a.u32", 4000000000); w.add_int32("a.i32", -7); w.add_float32("a.f32", 1.5)
    w.add_bool("a.bool", True); w.add_uint64("a.u64", 2**63); w.add_int64("a.i64", -2**40)
    w.add_float64("a.f64", 0.1)
    w.add_array("a.strs", ["x", "héllo", ""], VT.STRING)
    w.add_array("a.i32s", [1, -2, 3], VT.INT32)
    w.add_array("a.f32s", [0.5, 2.0], VT.FLOAT32)
    w.add_array("a.nested", [([1, 2], VT.INT32), (["q"], VT.STRING)], VT.ARRAY)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    for tt in (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0):
        w.add_tensor("t%d" % tt, x, tt)
    w.add_tensor("lazy", lambda: x[:, :32] * 2, GGMLType.F32, shape=(6, 32))
    w.write()
    r = GGUFReader(p)
    assert r.alignment == 64 and r.data_offset % 64 == 0
    assert r.get("a.u8") == 200 and r.get("a.i8") == -5 and r.get("a.u64") == 2**63 and r.get("a.i64") == -2**40
    assert r.get("a.f64") == 0.1 and r.get("a.bool") is True and r.get("a.strs") == ["x", "héllo", ""]
    assert list(r.get("a.i32s")) == [1, -2, 3] and r.fields["a.i32s"].elem_type == VT.INT32
    assert [list(v[0]) for v in r.get("a.nested")] == [[1, 2], ["q"]]
    for tt, tol in ((GGMLType.F32, 0), (GGMLType.F16, 1e-3), (GGMLType.BF16, 1e-2), (GGMLType.Q8_0, 2e-2)):
        t = r.tensors["t%d" % tt]
        assert t.offset % 64 == 0 and t.shape == (6, 64)
        y = t.dequantize()
        assert np.abs(y - x).max() <= tol * np.abs(x).max() + 1e-7, (tt, np.abs(y - x).max())
        assert np.array_equal(y, roundtrip(x, tt))
    assert np.array_equal(r.tensors["lazy"].dequantize(), x[:, :32] * 2)
    # Q8_0 against a scalar re-implementation of the C reference
    blk = x[0, :32]
    amax = max(abs(float(v)) for v in blk)
    dd = np.float32(amax / np.float32(127))
    q = [int(np.sign(v) * np.floor(abs(float(np.float32(v) * (np.float32(1) / dd))) + 0.5)) for v in blk]
    b = quantize_q8_0(blk)
    assert list(b[2:].view(np.int8)) == q and b[:2].view("<f2")[0] == np.float16(dd)
    # block types: through a file and back unchanged, within each format's step of the original, and an
    # all-zero row stays zero; then one block of each decoded by a plain per-value loop over the layout
    xb = rng.standard_normal((3, 512)).astype(np.float32)
    xb[2] = 0
    # worst error relative to the row's max |x| of this quantiser on normal data (q levels per sign)
    btol = {GGMLType.Q4_0: 0.13, GGMLType.Q4_1: 0.07, GGMLType.Q5_0: 0.07, GGMLType.Q5_1: 0.035,
            GGMLType.Q2_K: 0.35, GGMLType.Q3_K: 0.3, GGMLType.Q4_K: 0.07, GGMLType.Q5_K: 0.035,
            GGMLType.Q6_K: 0.04}
    p2 = os.path.join(d, "q.gguf")
    w = GGUFWriter(p2)
    for tt in BLOCK_TYPES:
        w.add_tensor("q%d" % tt, xb, tt)
    w.write()
    r2 = GGUFReader(p2)
    for tt in BLOCK_TYPES:
        t = r2.tensors["q%d" % tt]
        assert t.nbytes == 3 * 512 // GGML_BLOCK[tt][0] * GGML_BLOCK[tt][1]
        y = t.dequantize()
        assert np.array_equal(y, roundtrip(xb, tt)) and y.dtype == np.float32
        err = np.abs(y[:2] - xb[:2]).max() / np.abs(xb[:2]).max()
        assert err <= btol[tt], (GGML_TYPE_NAME[tt], err)
        assert not y[2].any()
        assert _scalar_block(np.asarray(t.raw).reshape(3, -1)[0, :GGML_BLOCK[tt][1]], tt) == list(y[0, :GGML_BLOCK[tt][0]])
    # BF16 rounding: 1 + 2^-8 is a tie -> even (1.0); 1 + 3*2^-9 rounds up
    assert bf16_to_f32(f32_to_bf16(np.float32([1 + 2**-8, 1 + 3 * 2**-9])))[0] == 1.0
    assert bf16_to_f32(f32_to_bf16(np.float32([1 + 3 * 2**-9])))[0] == 1 + 2**-7
    print("gguf.py selftest ok")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        _dump(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "selftest":
        _selftest()
    else:
        print("usage: gguf.py dump FILE | selftest", file=sys.stderr)
        sys.exit(2)
