"""Writes the golden files `tests/hf_families.rs` reads: tiny random Qwen2, Qwen3 and
Mistral models saved by transformers itself (`config.json`, `model.safetensors`) and
`golden.safetensors` (tiny random Phi-3 too): the `input_ids`, the float32 `logits` transformers computed (eager
attention), the `loss` (mean next-token cross-entropy of `input_ids[:, :-1]` against
`input_ids[:, 1:]`) and its gradients for a few parameters (`grad.<FQN>`). Each family's
own settings are switched on: Qwen2's q/k/v biases, Qwen3's per-head q/k norms with an
explicit head dimension, Mistral's sliding window shorter than the sequence, Phi-3's fused
q/k/v and gate/up projections with a window too. Run with
torch and transformers:

    pip install torch transformers; python tests/golden/hf_families/make_golden.py
"""

import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import (MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.2,
             tie_word_embeddings=False, rope_theta=10000.0)
CASES = [
    ("qwen2", Qwen2Config(**SIZES), Qwen2ForCausalLM,
     ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias", "model.layers.1.mlp.down_proj.weight"]),
    ("qwen3", Qwen3Config(**SIZES, head_dim=16), Qwen3ForCausalLM,
     ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight",
      "model.layers.0.self_attn.o_proj.weight"]),
    ("mistral", MistralConfig(**SIZES, sliding_window=4), MistralForCausalLM,
     ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.gate_proj.weight"]),
    ("phi3", Phi3Config(**SIZES, sliding_window=6, pad_token_id=0, eos_token_id=2), Phi3ForCausalLM,
     ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"]),
]

for seed, (folder, config, cls, grads) in enumerate(CASES):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        # Non-zero biases and norm weights, so that they matter.
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "_norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
    path = os.path.join(HERE, folder)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    os.remove(os.path.join(path, "generation_config.json"))
    generator = torch.Generator().manual_seed(100 + seed)
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 10), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits.float().contiguous()
    short = model(input_ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(short.reshape(-1, SIZES["vocab_size"]), input_ids[:, 1:].reshape(-1))
    loss.backward()
    named = dict(model.named_parameters())
    golden = {"input_ids": input_ids, "logits": logits, "loss": loss.detach().reshape(1)}
    for fqn in grads:
        golden["grad." + fqn] = named[fqn].grad.contiguous()
    save_file(golden, os.path.join(path, "golden.safetensors"))
    print(f"{folder}: transformers {transformers.__version__}, loss {loss.item():.5f}, logits up to {logits.abs().max():.3f}")
