#!/usr/bin/env python3
"""Hugging Face side of the interoperability tests of synopsis-model.

  make-reference OUT TOKENIZER_DIR   build a small random GPT-2 with transformers (fixed seed),
                                     save it with the GPT-2 tokenizer, record reference logits
  check-ours DIR OUT                 load a directory written by synopsis with
                                     GPT2LMHeadModel / AutoTokenizer, record logits and a greedy
                                     continuation for the Rust side to compare
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

PROMPTS = ["In the year 2199, humanity", "A young man, who has lost his mother, sets out"]


def make_reference(out, tokenizer_dir):
    torch.manual_seed(1234)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out)
    tensors = {}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            tensors[f"ids_{i}"] = ids[0].contiguous()
            tensors[f"logits_{i}"] = model(ids).logits[0].contiguous()
    save_file(tensors, f"{out}/reference.safetensors")


def check_ours(directory, out):
    model = GPT2LMHeadModel.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    records = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0]
            generated = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )[0][len(ids):]
            records.append({
                "prompt": prompt,
                "ids": ids,
                "last_logits": logits[-1].tolist(),
                "greedy": generated.tolist(),
                "greedy_text": tokenizer.decode(generated),
            })
    with open(out, "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"make-reference": make_reference, "check-ours": check_ours}[command](*args)
