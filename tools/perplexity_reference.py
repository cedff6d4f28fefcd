"""An independent perplexity reference for llama GGUFs, in numpy: the weights dequantized to f32
(`gguf` package), the llama forward pass (RMSNorm, adjacent-pair RoPE, grouped-query
attention, SiLU FFN, tied head), and llama.cpp's windowed scoring (second half of each
window of N_CTX tokens). Token ids come from a file: a JSON array (as
`bitnetc tokenize -m MODEL -p "$(cat TEXT)" --ids` prints) or whitespace-separated ids.

Usage: python perplexity_reference.py MODEL.gguf IDS.txt N_CTX CHUNKS  (needs numpy and gguf)
"""
import json, sys

import gguf
import numpy as np
path, ids_path, n_ctx, chunks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = gguf.GGUFReader(path)
meta = {f.name: f for f in r.fields.values()}
def val(k):
    f = meta[k]; return f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else None
W = {}
for t in r.tensors:
    a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    W[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim == 1 and len(t.shape) > 1 else a
L = val("llama.block_count"); H = val("llama.attention.head_count"); G = val("llama.attention.head_count_kv")
eps = val("llama.attention.layer_norm_rms_epsilon"); base = val("llama.rope.freq_base")
E = W["token_embd.weight"]; D = E.shape[1]; d = D // H
print("layers", L, "heads", H, G, "dim", D, "eps", eps, "base", base, file=sys.stderr)
def rms(x, w): return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
def rope(x, pos):  # x [T, heads, d], adjacent pairs
    i = np.arange(d // 2); th = pos[:, None] * base ** (-2 * i / d)
    c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x); out[..., 0::2] = x0 * c - x1 * s; out[..., 1::2] = x0 * s + x1 * c
    return out
text = open(ids_path).read()
ids = np.array(json.loads(text) if text.lstrip().startswith("[") else text.split(), dtype=np.int64)
nll = []; 
for ch in range(chunks):
    toks = ids[ch * n_ctx:(ch + 1) * n_ctx]; T = len(toks); pos = np.arange(T, dtype=np.float64)
    x = E[toks].astype(np.float32)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for l in range(L):
        p = f"blk.{l}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = (h @ W[p + "attn_q.weight"].T).reshape(T, H, d)
        k = (h @ W[p + "attn_k.weight"].T).reshape(T, G, d)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, G, d)
        q, k = rope(q, pos), rope(k, pos)
        out = np.empty((T, H, d), np.float32)
        for hh in range(H):
            g = hh // (H // G)
            s = q[:, hh] @ k[:, g].T / np.sqrt(d) + mask
            s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
            out[:, hh] = s @ v[:, g]
        x = x + out.reshape(T, D) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        gt = h @ W[p + "ffn_gate.weight"].T; up = h @ W[p + "ffn_up.weight"].T
        x = x + ((gt / (1 + np.exp(-gt))) * up) @ W[p + "ffn_down.weight"].T
    logits = rms(x, W["output_norm.weight"]) @ E.T
    first = n_ctx // 2
    for j in range(first, n_ctx - 1):
        lg = logits[j].astype(np.float64); m = lg.max()
        nll.append(-(lg[toks[j + 1]] - m - np.log(np.exp(lg - m).sum())))
    print(f"[{ch + 1}] {np.exp(np.mean(nll)):.4f}", file=sys.stderr, flush=True)
print("PPL", np.exp(np.mean(nll)))
