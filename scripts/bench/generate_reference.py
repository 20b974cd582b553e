#!/usr/bin/env python3
"""Reference decoding speed for the generator benchmark: Hugging Face `generate()` (KV cache,
sampling) on the same weights directory and the same torch, measured in the same run as ours.

Prints one JSON line: tokens per second (best of --runs), the time of a generate() of one new
token (prefill + first token), and resident memory before loading, after loading (transformers
maps safetensors lazily, so little is resident yet), after generating, and at peak.
"""
import argparse
import json
import resource
import time

import torch
from transformers import GPT2LMHeadModel


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prompt-ids", default="", help="comma-separated prompt token ids (overrides --prompt-tokens)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--first-token-runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    base_rss = rss_bytes()
    model = GPT2LMHeadModel.from_pretrained(a.model).eval()
    loaded_rss = rss_bytes()
    if a.prompt_ids:
        ids = torch.tensor([[int(t) for t in a.prompt_ids.split(",")]])
    else:
        ids = torch.arange(1000, 1000 + a.prompt_tokens).unsqueeze(0)
    mask = torch.ones_like(ids)
    sampling = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=50256)
    best = 0.0
    first = []
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, **sampling)
        for run in range(a.first_token_runs):
            torch.manual_seed(100 + run)
            start = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **sampling)
            first.append(time.perf_counter() - start)
        for run in range(a.runs):
            torch.manual_seed(run)
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                                 min_new_tokens=a.new_tokens, **sampling)
            elapsed = time.perf_counter() - start
            generated = out.shape[1] - ids.shape[1]
            best = max(best, generated / elapsed)
    first.sort()
    final_rss = rss_bytes()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tokens_per_second": best, "first_token_seconds": first[len(first) // 2],
                      "max_rss_bytes": rss, "loaded_rss_bytes": loaded_rss, "base_rss_bytes": base_rss,
                      "final_rss_bytes": final_rss}))


if __name__ == "__main__":
    main()
