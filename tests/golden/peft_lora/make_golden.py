"""Writes the PEFT LoRA golden files `tests/lora.rs` reads.

A tiny random Llama saved by transformers (`base/`: `config.json`, `model.safetensors`),
LoRA adapters on it saved by PEFT (`adapter/`: `adapter_config.json`,
`adapter_model.safetensors`), and `golden.safetensors`: the `input_ids`, the float32
`logits` of the adapted model (eager attention) and of the base alone (`base_logits`), the `loss` (mean next-token
cross-entropy of `input_ids[:, :-1]` against `input_ids[:, 1:]`), the gradients of that
loss for a few adapter weights (`grad.<FQN>`), and `merged_logits` from PEFT's
`merge_and_unload`. PEFT starts `lora_B` at zero; here it is drawn at random, as after
training, so the adapters change the logits. Run with torch, transformers and peft:

    pip install torch transformers peft; python tests/golden/peft_lora/make_golden.py
"""

import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["q_proj", "v_proj", "down_proj"]
GRADS = [
    "model.layers.0.self_attn.q_proj.lora_A.weight",
    "model.layers.0.self_attn.v_proj.lora_B.weight",
    "model.layers.1.mlp.down_proj.lora_A.weight",
    "model.layers.1.mlp.down_proj.lora_B.weight",
]

torch.manual_seed(7)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)
config._attn_implementation = "eager"
base = LlamaForCausalLM(config).eval()
for folder in ("base", "adapter"):
    shutil.rmtree(os.path.join(HERE, folder), ignore_errors=True)
base.save_pretrained(os.path.join(HERE, "base"))
os.remove(os.path.join(HERE, "base", "generation_config.json"))
generator = torch.Generator().manual_seed(11)
input_ids = torch.randint(0, config.vocab_size, (2, 10), generator=generator)
with torch.no_grad():
    base_logits = base(input_ids).logits.float().contiguous()

lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                  task_type="CAUSAL_LM")
model = get_peft_model(base, lora)
with torch.no_grad():
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn_like(param) * 0.3)
model.save_pretrained(os.path.join(HERE, "adapter"))
os.remove(os.path.join(HERE, "adapter", "README.md"))

logits = model(input_ids).logits
inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
short = model(inputs).logits
loss = torch.nn.functional.cross_entropy(short.reshape(-1, config.vocab_size), targets.reshape(-1))
loss.backward()
named = {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in model.named_parameters()}
golden = {"input_ids": input_ids, "logits": logits.detach().float().contiguous(), "loss": loss.detach().reshape(1),
          "base_logits": base_logits}
for fqn in GRADS:
    golden["grad." + fqn] = named[fqn].grad.contiguous()
with torch.no_grad():
    golden["merged_logits"] = model.merge_and_unload()(input_ids).logits.float().contiguous()
save_file(golden, os.path.join(HERE, "golden.safetensors"))
print(f"transformers {transformers.__version__}, peft {peft.__version__}: loss {loss.item():.5f}, "
      f"the adapters move the logits by up to {(logits - base_logits).abs().max():.3f}, "
      f"merging by {(logits - golden['merged_logits']).abs().max():.2e}")
