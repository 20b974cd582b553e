#!/usr/bin/env python3
"""Reference training throughput for the trainer benchmark, measured in the same run as ours.

  --mode original  the original project's pipeline: HF GPT2LMHeadModel, every synopsis padded to
                   max_length with an attention mask, AdamW + linear warm-up/decay schedule
  --mode packed    a lean PyTorch loop on the same model: documents packed end to end separated
                   by <|endoftext|>, no padding

Prints one JSON line: real (non-padding) tokens per second and the step time.
"""
import argparse
import csv
import json
import time

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup


def load_texts(path, column, limit):
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        texts = [r[column] for r in rows if r.get(column)]
    return texts[:limit]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["original", "packed"], required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--column", default="Synopsis")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    tok.pad_token = tok.eos_token
    texts = load_texts(a.data, a.column, 4000)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=max(a.seq, 256), n_embd=a.width, n_layer=a.layers, n_head=a.heads)
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    total = a.steps + a.warmup_steps
    sched = get_linear_schedule_with_warmup(opt, 10, total)

    def batches():
        if a.mode == "original":
            # As the original: "<|endoftext|>" + text + "<|endoftext|>", padded to max_length.
            i = 0
            while True:
                chunk = [f"{tok.eos_token}{t}{tok.eos_token}" for t in texts[i:i + a.batch]]
                i = (i + a.batch) % (len(texts) - a.batch)
                enc = tok(chunk, truncation=True, max_length=a.seq, padding="max_length", return_tensors="pt")
                labels = enc.input_ids.clone()
                labels[enc.attention_mask == 0] = -100
                yield enc.input_ids, enc.attention_mask, labels, int(enc.attention_mask.sum())
        else:
            stream = []
            for t in texts:
                stream.extend(tok(t).input_ids + [tok.eos_token_id])
            stream = torch.tensor(stream)
            n = a.batch * (a.seq + 1)
            i = 0
            while True:
                window = stream[i:i + n].view(a.batch, a.seq + 1)
                i = (i + n) % (len(stream) - n)
                yield window[:, :-1], None, window[:, 1:], a.batch * a.seq

    it = batches()
    tokens = 0
    elapsed = 0.0
    for step in range(total):
        ids, mask, labels, real = next(it)
        start = time.perf_counter()
        if a.mode == "original":
            loss = model(ids, attention_mask=mask, labels=labels).loss
        else:
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup_steps:
            elapsed += time.perf_counter() - start
            tokens += real
    print(json.dumps({"mode": a.mode, "real_tokens_per_second": tokens / elapsed,
                      "seconds_per_step": elapsed / a.steps, "loss": float(loss)}))


if __name__ == "__main__":
    main()
