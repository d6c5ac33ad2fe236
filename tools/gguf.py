"""gguf.py - a small GGUF (v3) writer and reader in numpy, written from the format spec.

Layout of a GGUF file (all little-endian):
    u32 magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x  (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `alignment`, then the data section; each tensor's offset is relative to the data section
    and a multiple of `alignment` (general.alignment, default 32).
A string is u64 length + bytes (no NUL). An array is u32 element type + u64 count + elements.
ne[0] is the innermost (row) dimension, so a numpy array of shape (rows, cols) has ne = (cols, rows).

Tensor types handled: F32, F16, BF16 and Q8_0 (blocks of 32 values: f16 scale d, then 32 int8 q; x = d*q).

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
    BF16 = 30


# (block size in elements, bytes per block)
GGML_BLOCK = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.Q8_0: (32, 34),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
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
