"""moe_make_models.py - two random dense qwen2 GGUFs for the MoE speed comparison (bench/moe_bench.sh):
F768 (upcycled into a hybrid with 6+6 experts of width 768; a token runs top-1 + shared token experts
and 1 segment expert = 3 x 768 FFN rows) and F2304 (the dense model of the same ACTIVE size).
D=768, 6 layers, 12 heads, F16 matrices; the tokenizer is the fixtures'. Usage: moe_make_models.py OUTDIR
"""
import os, sys, numpy as np
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
from gguf import GGUFWriter, GGUFReader, GGMLType, GGUFValueType as VT
src = GGUFReader(os.path.join(ROOT, 'tests/fixtures/models/qwen2-gqa.gguf'))
def make(path, F, D=768, L=6, H=12):
    w = GGUFWriter(path)
    a = 'qwen2'
    w.add_string('general.architecture', a); w.add_string('general.name', 'bench-dense-F%d' % F)
    w.add_uint32(a+'.context_length', 4096); w.add_uint32(a+'.embedding_length', D)
    w.add_uint32(a+'.block_count', L); w.add_uint32(a+'.feed_forward_length', F)
    w.add_uint32(a+'.attention.head_count', H); w.add_uint32(a+'.attention.head_count_kv', H)
    w.add_float32(a+'.attention.layer_norm_rms_epsilon', 1e-6); w.add_float32(a+'.rope.freq_base', 1e6)
    for k, f in src.fields.items():
        if k.startswith('tokenizer.'):
            if f.vtype == VT.ARRAY: w.add_array(k, list(f.value) if not isinstance(f.value, list) else f.value, f.elem_type)
            else: w.add_kv(k, f.value, f.vtype)
    V = len(src.fields['tokenizer.ggml.tokens'].value)
    rng = np.random.default_rng(1)
    r = lambda *s: lambda: (0.02 * rng.standard_normal(s)).astype(np.float32)
    T = GGMLType.F16
    w.add_tensor('token_embd.weight', r(V, D), T, shape=(V, D))
    w.add_tensor('output_norm.weight', np.ones(D, np.float32))
    for i in range(L):
        p = 'blk.%d.' % i
        w.add_tensor(p+'attn_norm.weight', np.ones(D, np.float32)); w.add_tensor(p+'ffn_norm.weight', np.ones(D, np.float32))
        for n in ('q', 'k', 'v'):
            w.add_tensor(p+'attn_%s.weight' % n, r(D, D), T, shape=(D, D)); w.add_tensor(p+'attn_%s.bias' % n, np.zeros(D, np.float32))
        w.add_tensor(p+'attn_output.weight', r(D, D), T, shape=(D, D))
        w.add_tensor(p+'ffn_gate.weight', r(F, D), T, shape=(F, D)); w.add_tensor(p+'ffn_up.weight', r(F, D), T, shape=(F, D))
        w.add_tensor(p+'ffn_down.weight', r(D, F), T, shape=(D, F))
    w.write()
if len(sys.argv) != 2:
    sys.exit('usage: moe_make_models.py OUTDIR')
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
make(os.path.join(out, 'dense-768.gguf'), 768)
make(os.path.join(out, 'dense-2304.gguf'), 2304)
