"""Writes the golden files `tests/hf_families.rs` reads: tiny random Qwen2, Qwen3 and
Mistral models saved by transformers itself (`config.json`, `model.safetensors`) and
`golden.safetensors` (tiny random Phi-3 too): the `input_ids`, the float32 `logits` transformers computed (eager
attention), the `loss` (mean next-token cross-entropy of `input_ids[:, :-1]` against
`input_ids[:, 1:]`) and its gradients for a few parameters (`grad.<FQN>`). Each family's
own settings are switched on: Qwen2's q/k/v biases, Qwen3's per-head q/k norms with an
explicit head dimension, Mistral's sliding window shorter than the sequence, Phi-3's fused
q/k/v and gate/up projections with a window too, Mixtral's sparse experts (4, top 2) with
the router's load-balancing loss in the loss, Gemma 2 (soft caps, a sliding and a full
layer, `1 + w` norms around attention and MLP, GeGLU, scaled embeddings, tied head) and
Gemma 3 (per-head norms, two rotary bases). Run with
torch and transformers:

    pip install torch transformers; python tests/golden/hf_families/make_golden.py
"""

import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
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
    ("mixtral", MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                              router_aux_loss_coef=0.05), MixtralForCausalLM,
     ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.2.w1.weight",
      "model.layers.1.block_sparse_moe.experts.2.w2.weight", "model.layers.0.block_sparse_moe.experts.0.w3.weight"]),
]
# Gemma: a sliding and a full layer, a window under the sequence, soft caps small enough
# to bite at this size; Gemma 3 with its two default rotary bases.
GEMMA = {**SIZES, "tie_word_embeddings": True, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4}
del GEMMA["rope_theta"]
CASES += [
    ("gemma2", Gemma2Config(**GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0), Gemma2ForCausalLM,
     ["model.layers.0.pre_feedforward_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
      "model.embed_tokens.weight", "model.norm.weight"]),
    ("gemma3", Gemma3TextConfig(**GEMMA, layer_types=["sliding_attention", "full_attention"]), Gemma3ForCausalLM,
     ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.post_feedforward_layernorm.weight",
      "model.layers.1.mlp.gate_proj.weight"]),
]


def grad_of(named, fqn):
    """The gradient of `fqn` as transformers saves it: Mixtral's experts are one 3-D
    tensor in memory (`mlp.experts.gate_up_proj`, gate then up; `mlp.experts.down_proj`)
    and per expert in the file (`block_sparse_moe.experts.{e}.w1`, `w3`, `w2`)."""
    if ".block_sparse_moe." not in fqn:
        return named[fqn].grad
    layer, rest = fqn.split(".block_sparse_moe.")
    if rest == "gate.weight":
        return named[layer + ".mlp.gate.weight"].grad
    _, expert, which, _ = rest.split(".")
    expert = int(expert)
    if which == "w2":
        return named[layer + ".mlp.experts.down_proj"].grad[expert]
    gate_up = named[layer + ".mlp.experts.gate_up_proj"].grad[expert]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if which == "w1" else gate_up[half:]

for seed, (folder, config, cls, grads) in enumerate(CASES):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        # Non-zero biases and norm weights, so that they matter.
        for name, param in model.named_parameters():
            # Gemma's norms start at zero (they scale by 1 + w): all of them drawn too.
            if name.endswith(".bias") or "_norm" in name or (folder.startswith("gemma") and "norm" in name):
                param.add_(torch.randn_like(param) * 0.5)
    path = os.path.join(HERE, folder)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    os.remove(os.path.join(path, "generation_config.json"))
    generator = torch.Generator().manual_seed(100 + seed)
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 10), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits.float().contiguous()
    short = model(input_ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(short.logits.reshape(-1, SIZES["vocab_size"]), input_ids[:, 1:].reshape(-1))
    if getattr(short, "aux_loss", None) is not None:
        # Mixtral's router load-balancing loss, as MixtralForCausalLM adds it.
        loss = loss + config.router_aux_loss_coef * short.aux_loss
    loss.backward()
    named = dict(model.named_parameters())
    golden = {"input_ids": input_ids, "logits": logits, "loss": loss.detach().reshape(1)}
    for fqn in grads:
        golden["grad." + fqn] = grad_of(named, fqn).contiguous()
    save_file(golden, os.path.join(path, "golden.safetensors"))
    print(f"{folder}: transformers {transformers.__version__}, loss {loss.item():.5f}, logits up to {logits.abs().max():.3f}")
