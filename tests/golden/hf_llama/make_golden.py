"""Writes the Hugging Face Llama golden files `tests/hf_llama.rs` reads.

Each case is a folder with a tiny random Llama saved by transformers itself
(`config.json`, `model.safetensors`) and `logits.safetensors`: the `input_ids` it was run
on and the float32 `logits` transformers computed (eager attention). The cases of one
config layout are written by the transformers release that writes it, so run this twice:

    pip install "transformers==4.57.*"; python tests/golden/hf_llama/make_golden.py
    pip install "transformers>=5";      python tests/golden/hf_llama/make_golden.py

transformers 4.x writes `rope_theta` / `rope_scaling` at the top level, 5.x both inside
`rope_parameters`. The initializer range is large so that the rotary settings move the
logits far beyond the tolerance of the test.
"""

import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
V5 = int(transformers.__version__.split(".")[0]) >= 5

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)


def rope(theta, scaling):
    """The rotary settings in the layout this transformers release writes."""
    if V5:
        return {"rope_parameters": dict(rope_theta=theta, **(scaling or {"rope_type": "default"}))}
    return {"rope_theta": theta, "rope_scaling": scaling}


# (folder, seed, tied head, rope theta, rope scaling): Llama 3.1 (untied) and 3.2 (tied)
# style, with and without the llama3 scaling, in each layout.
CASES = {
    False: [
        ("v4-llama31-scaled-untied", 1, False, 500000.0, LLAMA3),
        ("v4-theta-tied", 2, True, 500000.0, None),
    ],
    True: [
        ("v5-llama32-scaled-tied", 3, True, 500000.0, LLAMA3),
        ("v5-theta-untied", 4, False, 500000.0, None),
    ],
}

for folder, seed, tied, theta, scaling in CASES[V5]:
    torch.manual_seed(seed)
    config = LlamaConfig(**SIZES, tie_word_embeddings=tied, **rope(theta, scaling))
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    path = os.path.join(HERE, folder)
    model.save_pretrained(path)
    os.remove(os.path.join(path, "generation_config.json"))
    generator = torch.Generator().manual_seed(100 + seed)
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 12), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits.float().contiguous()
    save_file({"input_ids": input_ids, "logits": logits}, os.path.join(path, "logits.safetensors"))
    print(f"{folder}: transformers {transformers.__version__}, logits up to {logits.abs().max():.3f}")
