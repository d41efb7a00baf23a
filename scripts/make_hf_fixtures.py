#!/usr/bin/env python3
"""Makes the Hugging Face faithfulness fixtures under tests/fixtures/hf/.

For each supported family — a llama-family grouped-query model, gpt2, and
gpt_bigcode (multi-query) — it builds a small model with random weights using
transformers' own model code, saves config.json and model.safetensors, and
records a prompt, the greedy continuation and the raw logits of every
generated position (reference.json). The Rust test tests/hf_faithfulness.rs
compiles each config with bifurc and checks that `bifurc run` reproduces the
ids and logits. CI reads the committed files; it never needs torch.

Run once (needs torch and transformers from PyPI, CPU is fine):
    python3 scripts/make_hf_fixtures.py tests/fixtures/hf
"""

import json
import os
import sys

import torch
import transformers as tf

PROMPT = [3, 17, 5, 42, 9, 28, 11]
NEW_TOKENS = 6

MODELS = {
    "llama": lambda: tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
            torch_dtype="float32",
        )
    ),
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            torch_dtype="float32",
        )
    ),
    "gpt_bigcode": lambda: tf.GPTBigCodeForCausalLM(
        tf.GPTBigCodeConfig(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128, multi_query=True,
            activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, torch_dtype="float32",
        )
    ),
}


def main(out_dir):
    for name, make in MODELS.items():
        torch.manual_seed(1234)
        model = make().eval()
        # Random init is small; scale up so logits are far from ties.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
        d = os.path.join(out_dir, name)
        model.save_pretrained(d, safe_serialization=True)
        gen = os.path.join(d, "generation_config.json")
        if os.path.exists(gen):
            os.remove(gen)  # not needed by the test
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0,
            )
        generated = out.sequences[0, len(PROMPT):].tolist()
        logits = [step[0].tolist() for step in out.logits]
        ref = {
            "transformers": tf.__version__,
            "torch": torch.__version__,
            "prompt": PROMPT,
            "generated": generated,
            "logits": logits,
        }
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(ref, f)
        print(name, "generated", generated)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf")
