#!/usr/bin/env python3
"""PyTorch FSDP2 reference for the step times of examples/gpu_check/ (on a GPU) and
examples/bench.rs (on the CPU).

Trains the Llama of src/models/llama.rs (token embedding, pre-norm decoder layers with
RMSNorm, causal self-attention with rotary embeddings in the Hugging Face "rotate half"
convention and grouped key/value heads, a SiLU-gated MLP, a final RMSNorm and an untied
lm_head, no biases, N(0, 0.02) initialisation) with AdamW in f32 on one GPU (or the CPU,
with --device cpu), two ways in one run, taking turns in rounds:

  (a) plain PyTorch, no FSDP;
  (b) FSDP2 at world size 1 over NCCL (gloo on the CPU): every decoder layer
      `fully_shard`ed, then the root (reshard_after_forward=True, the FULL_SHARD
      equivalent).

Same model configurations, batch, sequence length, dtype (f32, TF32 off), optimizer
(AdamW lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01: candle-nn's defaults) and
step (forward + next-token cross-entropy + backward + AdamW step, then
torch.cuda.synchronize() before the timer stops) as gpu_check; the data are random token
ids (the step time does not depend on them). It prints the median and minimum of the
measured steps, the ratio FSDP2 / plain and the peak allocated memory.

Usage (on the GPU machine; MASTER_ADDR/MASTER_PORT are set here when absent):

    python3 examples/fsdp2_reference.py --model small|medium|large|all
    python3 examples/fsdp2_reference.py --model all --steps 20 --warmup 3 --rounds 2
    python3 examples/fsdp2_reference.py --model large --attention sdpa   # fused attention
    python3 examples/fsdp2_reference.py --device cpu --threads 1 --model train  # bench.rs's CPU

--attention math (the default) computes attention as candle does (matmul, mask, softmax
in f32, matmul); sdpa uses torch's scaled_dot_product_attention (flash/efficient kernels).
"""

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


# (vocab, hidden, intermediate, layers, heads, kv_heads, batch, seq_len), as gpu_check.
SMALL = (512, 128, 344, 4, 4, 2, 16, 64)
MEDIUM = (1024, 256, 688, 6, 8, 4, 16, 128)
# The main job's model and batch (examples/train.rs: one rank's 8 sequences of 32 tokens).
TRAIN = (128, 128, 344, 4, 4, 2, 8, 32)
LR = 1e-3


class Config:
    def __init__(self, name, vocab, hidden, intermediate, layers, heads, kv_heads, batch, seq_len):
        self.name = name
        self.vocab_size = vocab
        self.hidden_size = hidden
        self.intermediate_size = intermediate
        self.num_hidden_layers = layers
        self.num_attention_heads = heads
        self.num_key_value_heads = kv_heads
        self.batch = batch
        self.seq_len = seq_len
        self.max_position_embeddings = seq_len
        self.rms_norm_eps = 1e-5
        self.rope_theta = 10000.0
        self.initializer_range = 0.02

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) * weight, as candle_fsdp::models::rms_norm.
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c, attention):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        self.attention = attention

    def repeat_kv(self, x):
        n_rep = self.heads // self.kv_heads
        if n_rep == 1:
            return x
        b, kv, s, d = x.shape
        return x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)) + mask
            out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c, attention):
        super().__init__()
        self.self_attn = Attention(c, attention)
        self.mlp = Mlp(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, c, attention):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(c, attention) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=c.initializer_range)
        # Rotary tables (not parameters): cos/sin of position * theta^(-2j/head_dim), in f32,
        # each half repeated ("rotate half"), and the causal mask.
        half = c.head_dim // 2
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / c.head_dim))
        freqs = torch.arange(c.max_position_embeddings, dtype=torch.float64)[:, None] * inv_freq[None, :]
        freqs = torch.cat((freqs, freqs), dim=-1).float()
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        s = c.max_position_embeddings
        mask = torch.full((s, s), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, ids):
        s = ids.shape[1]
        cos, sin, mask = self.cos[:s], self.sin[:s], self.mask[:s, :s]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def configs(args):
    large = (args.large_vocab, args.large_hidden, args.large_intermediate, args.large_layers,
             args.large_heads, args.large_kv_heads, args.large_batch, args.large_seq)
    table = {"small": SMALL, "medium": MEDIUM, "large": large, "train": TRAIN}
    names = ["small", "medium", "large"] if args.model == "all" else [args.model]
    return [Config(n, *table[n]) for n in names]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(device):
    """The peak allocated on the GPU; on the CPU, the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(model, batches, warmup, device):
    """Times each step after `warmup`; returns (ms per measured step, first loss, last
    loss, peak allocated bytes)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for n, (inputs, targets) in enumerate(batches):
        started = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        elapsed = (time.perf_counter() - started) * 1e3
        if n >= warmup:
            times.append(elapsed)
        losses.append(loss.item())
    return times, losses[0], losses[-1], peak_bytes(device)


def run_model(c, args, device):
    per_round = -(-args.steps // args.rounds)
    measured = per_round * args.rounds
    torch.manual_seed(0)
    base = Llama(c, args.attention).to(device)
    numel = sum(p.numel() for p in base.parameters())
    gen = torch.Generator(device="cpu").manual_seed(11)
    batches = []
    for _ in range(args.warmup + per_round):
        tokens = torch.randint(0, c.vocab_size, (c.batch, c.seq_len + 1), generator=gen)
        batches.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    print(f"\nmodel {c.name}: Llama, vocab {c.vocab_size}, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
          f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, MLP {c.intermediate_size}: "
          f"{numel / 1e6:.2f}M parameters ({numel * 4 / 2**20:.1f} MiB f32); batch {c.batch} x {c.seq_len} tokens; "
          f"{measured} measured steps per run in {args.rounds} round(s) of {args.warmup} warm-up + {per_round} measured; "
          f"attention {args.attention}", flush=True)
    runs = {"plain": None, "fsdp2": None, "fsdp2_bf16": None}
    for r in range(1, args.rounds + 1):
        for kind in runs:
            print(f"  {c.name} round {r}/{args.rounds}: {kind}", file=sys.stderr, flush=True)
            model = copy.deepcopy(base)
            if kind != "plain":
                # bf16 gathered and computed over f32 master shards, gradients reduced in f32.
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                    if kind == "fsdp2_bf16" else MixedPrecisionPolicy()
                for layer in model.layers:
                    fully_shard(layer, reshard_after_forward=True, mp_policy=mp)
                fully_shard(model, reshard_after_forward=True, mp_policy=mp)
            result = train(model, batches, args.warmup, device)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if runs[kind] is None:
                runs[kind] = list(result)
            else:
                runs[kind][0] = runs[kind][0] + result[0]
                runs[kind][3] = max(runs[kind][3], result[3])
    tokens = c.batch * c.seq_len
    (pt, pf, pl, pm), (ft, ff, fl, fm), (bt, bf, bl, bm) = runs["plain"], runs["fsdp2"], runs["fsdp2_bf16"]
    base_med, base_min = statistics.median(pt), min(pt)
    print(f"  {'run':<50} {'median':>10} {'min':>10} {'x (a) med':>9} {'x (a) min':>9} {'tokens/s':>12} {'peak alloc':>12}")
    backend = "NCCL" if device.type == "cuda" else "gloo"
    for name, times, peak in (("(a)  plain PyTorch", pt, pm), (f"(b)  FSDP2 world 1 ({backend}), reshard_after_forward", ft, fm),
                              ("(c)  as (b), bf16 params, f32 reduce", bt, bm)):
        med, least = statistics.median(times), min(times)
        print(f"  {name:<50} {med:>7.2f} ms {least:>7.2f} ms {med / base_med:>9.3f} {least / base_min:>9.3f} "
              f"{tokens / (med / 1e3):>12.0f} {peak / 2**20:>8.1f} MiB")
    print(f"  losses first / last: (a) {pf:.5f} / {pl:.5f}, (b) {ff:.5f} / {fl:.5f}, (c) {bf:.5f} / {bl:.5f}")
    print(f"  ---> step time {c.name} ({numel / 1e6:.2f}M params, {c.batch}x{c.seq_len} tokens): plain {base_med:.2f} ms "
          f"median / {base_min:.2f} min; FSDP2 {statistics.median(ft):.2f} / {min(ft):.2f}; FSDP2/plain "
          f"{statistics.median(ft) / base_med:.3f} by median, {min(ft) / base_min:.3f} by min; FSDP2 bf16 "
          f"{statistics.median(bt):.2f} / {min(bt):.2f}, /f32 FSDP2 {statistics.median(bt) / statistics.median(ft):.3f} "
          f"by median", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["small", "medium", "large", "train", "all"], default="all")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads PyTorch uses (torch.set_num_threads)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per run, in total over the rounds")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per run and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds: the runs take turns (plain, FSDP2, plain, ...)")
    parser.add_argument("--attention", choices=["math", "sdpa"], default="math")
    parser.add_argument("--large-batch", type=int, default=8)
    parser.add_argument("--large-seq", type=int, default=512)
    parser.add_argument("--large-hidden", type=int, default=1024)
    parser.add_argument("--large-layers", type=int, default=8)
    parser.add_argument("--large-intermediate", type=int, default=2816)
    parser.add_argument("--large-vocab", type=int, default=32000)
    parser.add_argument("--large-heads", type=int, default=16)
    parser.add_argument("--large-kv-heads", type=int, default=8)
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be at least 1, --warmup at least 0")

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    print("PyTorch FSDP2 reference (examples/fsdp2_reference.py)")
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    if args.device == "cpu":
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=0, world_size=1)
        print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s), f32; step = forward + "
              f"cross-entropy + backward + AdamW step (lr {LR}, weight decay 0.01) + zero_grad")
    else:
        if not torch.cuda.is_available():
            sys.exit("fsdp2_reference: no CUDA device")
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        # f32 as in candle (whose f32 GEMMs do not use TF32 by default).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        try:
            dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
        except TypeError:  # older torch without device_id
            dist.init_process_group("nccl", rank=0, world_size=1)
        nccl = torch.cuda.nccl.version()
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}, "
              f"GPU {torch.cuda.get_device_name(0)}, TF32 off, f32; step = forward + cross-entropy + backward + AdamW step "
              f"(lr {LR}, weight decay 0.01) + zero_grad, then torch.cuda.synchronize()")
    try:
        for c in configs(args):
            run_model(c, args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
