"""moe_resident_make.py - two random Qwen3-MoE-shaped GGUFs (arch qwen3moe: 128 experts, top-8, Qwen3
attention with q/k norms) for bench/moe_resident.sh, alike but for their routers. Every token embedding
shares one direction c besides its noise, so the hidden states keep a component along c. "skewed": in every
layer 24 random experts' router rows lean towards c and the others' away from it, so a token's top 8 are
always among those 24 (which 8: the rows' noise); "spread": no row leans, tokens go to all 128.
Default shape D=512, 4 layers, expert width F=256; 8 heads (4 KV heads, head_dim 64), F16 matrices (routers
F32): about 400 MB each, nearly all of it experts. The tokenizer is the fixtures'
(tests/fixtures/models/qwen2-gqa.gguf). Usage: moe_resident_make.py OUTDIR [D F LAYERS] (writes
qwen3moe-skewed-D<D>-F<F>-L<LAYERS>.gguf and the -spread- one; an existing file is kept).
"""
import os, sys, numpy as np
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
from gguf import GGUFWriter, GGUFReader, GGMLType, GGUFValueType as VT

H, HKV, E, N_EXP, K_USED, HOT = 8, 4, 64, 128, 8, 24
src = GGUFReader(os.path.join(ROOT, 'tests/fixtures/models/qwen2-gqa.gguf'))


def make(path, skewed):
    a = 'qwen3moe'
    w = GGUFWriter(path)
    w.add_string('general.architecture', a)
    w.add_string('general.name', 'bench-qwen3moe-%s' % ('skewed' if skewed else 'spread'))
    for k, v in (('context_length', 4096), ('embedding_length', D), ('block_count', L), ('feed_forward_length', 4 * D),
                 ('attention.head_count', H), ('attention.head_count_kv', HKV), ('attention.key_length', E),
                 ('attention.value_length', E), ('rope.dimension_count', E), ('expert_count', N_EXP),
                 ('expert_used_count', K_USED), ('expert_feed_forward_length', F_EXP)):
        w.add_uint32(a + '.' + k, v)
    w.add_float32(a + '.attention.layer_norm_rms_epsilon', 1e-6)
    w.add_float32(a + '.rope.freq_base', 1e6)
    for k, f in src.fields.items():
        if k.startswith('tokenizer.'):
            if f.vtype == VT.ARRAY: w.add_array(k, list(f.value) if not isinstance(f.value, list) else f.value, f.elem_type)
            else: w.add_kv(k, f.value, f.vtype)
    V = len(src.fields['tokenizer.ggml.tokens'].value)
    rng = np.random.default_rng(7)
    r = lambda std, *s: (lambda: (std * rng.standard_normal(s, dtype=np.float32)))
    T = GGMLType.F16
    c = rng.standard_normal(D, dtype=np.float32)
    c_unit = c / np.linalg.norm(c)
    w.add_tensor('token_embd.weight', lambda: 0.5 * rng.standard_normal((V, D), dtype=np.float32) + c, T, shape=(V, D))
    w.add_tensor('output_norm.weight', np.ones(D, np.float32))
    w.add_tensor('output.weight', r(0.05, V, D), T, shape=(V, D))
    for i in range(L):
        p = 'blk.%d.' % i
        w.add_tensor(p + 'attn_norm.weight', np.ones(D, np.float32))
        w.add_tensor(p + 'ffn_norm.weight', np.ones(D, np.float32))
        w.add_tensor(p + 'attn_q_norm.weight', np.ones(E, np.float32))
        w.add_tensor(p + 'attn_k_norm.weight', np.ones(E, np.float32))
        w.add_tensor(p + 'attn_q.weight', r(0.04, H * E, D), T, shape=(H * E, D))
        w.add_tensor(p + 'attn_k.weight', r(0.04, HKV * E, D), T, shape=(HKV * E, D))
        w.add_tensor(p + 'attn_v.weight', r(0.04, HKV * E, D), T, shape=(HKV * E, D))
        w.add_tensor(p + 'attn_output.weight', r(0.04, D, H * E), T, shape=(D, H * E))
        # the router (N_EXP, D): noise of logit std ~1; skewed: +-0.2 c_unit, a logit shift of about +-4
        lean = np.zeros((N_EXP, 1), np.float32)
        if skewed:
            lean[:] = -0.2
            lean[rng.choice(N_EXP, HOT, replace=False)] = 0.2
        # the noise without its component along c: what routes a token is its own part of the hidden state
        noise = 0.05 * rng.standard_normal((N_EXP, D), dtype=np.float32)
        noise -= (noise @ c_unit)[:, None] * c_unit[None, :]
        w.add_tensor(p + 'ffn_gate_inp.weight', noise + lean * c_unit[None, :])
        w.add_tensor(p + 'ffn_gate_exps.weight', r(0.04, N_EXP, F_EXP, D), T, shape=(N_EXP, F_EXP, D))
        w.add_tensor(p + 'ffn_up_exps.weight', r(0.04, N_EXP, F_EXP, D), T, shape=(N_EXP, F_EXP, D))
        w.add_tensor(p + 'ffn_down_exps.weight', r(0.06, N_EXP, D, F_EXP), T, shape=(N_EXP, D, F_EXP))
    w.write()


if len(sys.argv) not in (2, 5):
    sys.exit('usage: moe_resident_make.py OUTDIR [D F LAYERS]')
out = sys.argv[1]
D, F_EXP, L = (int(x) for x in sys.argv[2:5]) if len(sys.argv) == 5 else (512, 256, 4)
os.makedirs(out, exist_ok=True)
for kind, skewed in (('skewed', True), ('spread', False)):
    path = os.path.join(out, 'qwen3moe-%s-D%d-F%d-L%d.gguf' % (kind, D, F_EXP, L))
    if not os.path.exists(path):
        make(path + '.tmp', skewed)
        os.replace(path + '.tmp', path)
    print(path)
