#!/usr/bin/env python3
"""Reference decoding speed for the generator benchmark: Hugging Face `generate()` (KV cache,
sampling) on the same weights directory and the same torch, measured in the same run as ours.

Prints one JSON line: tokens per second (best of --runs), the time of a generate() of one new
token (prefill + first token), and resident memory before loading, after loading (transformers
maps safetensors lazily, so little is resident yet), after generating, and at peak.

It also times a lean eager decoding loop over the same weights (preallocated KV cache, fused
attention, the tied head as one GEMV, the same sampling): no framework overhead, only the
libtorch ops one token needs. That is the floor eager libtorch reaches on this machine, the
figure that says how much of a gap to HF is left to take.
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel


def sync(device):
    """Waits for the GPU's queued work, so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lean_tokens_per_second(model, ids, new_tokens, runs):
    """Best tokens/s of a hand-written KV-cache decoding loop on `model`'s weights."""
    cfg = model.config
    device = ids.device
    sd = {k: v.detach() for k, v in model.transformer.state_dict().items()}
    layers = cfg.n_layer
    d, h = cfg.n_embd, cfg.n_head
    hd = d // h
    eps = cfg.layer_norm_epsilon
    head = sd["wte.weight"].t().contiguous()
    cap = ids.shape[1] + new_tokens

    def block(x, i, keys, values, pos):
        p = f"h.{i}."
        t = x.shape[1]
        a = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
        qkv = torch.addmm(sd[p + "attn.c_attn.bias"], a.view(t, d), sd[p + "attn.c_attn.weight"])
        q, k, v = qkv.view(1, t, 3, h, hd).permute(2, 0, 3, 1, 4)
        keys[i][:, :, pos:pos + t] = k
        values[i][:, :, pos:pos + t] = v
        y = F.scaled_dot_product_attention(q, keys[i][:, :, :pos + t], values[i][:, :, :pos + t],
                                           is_causal=t > 1)
        y = torch.addmm(sd[p + "attn.c_proj.bias"], y.transpose(1, 2).reshape(t, d),
                        sd[p + "attn.c_proj.weight"])
        x = x + y.view(1, t, d)
        m = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
        m = F.gelu(torch.addmm(sd[p + "mlp.c_fc.bias"], m.view(t, d), sd[p + "mlp.c_fc.weight"]),
                   approximate="tanh")
        m = torch.addmm(sd[p + "mlp.c_proj.bias"], m, sd[p + "mlp.c_proj.weight"])
        return x + m.view(1, t, d)

    def forward(tokens, keys, values, pos):
        t = tokens.shape[1]
        x = sd["wte.weight"][tokens] + sd["wpe.weight"][pos:pos + t]
        for i in range(layers):
            x = block(x, i, keys, values, pos)
        last = F.layer_norm(x[:, -1], (d,), sd["ln_f.weight"], sd["ln_f.bias"], eps)
        return last @ head

    best = 0.0
    for run in range(runs + 1):  # the first run warms up
        torch.manual_seed(run)
        keys = [torch.zeros(1, h, cap, hd, device=device) for _ in range(layers)]
        values = [torch.zeros(1, h, cap, hd, device=device) for _ in range(layers)]
        sync(device)
        start = time.perf_counter()
        logits = forward(ids, keys, values, 0)
        pos = ids.shape[1]
        for _ in range(new_tokens):
            token = torch.multinomial(torch.softmax(logits, -1), 1)
            logits = forward(token, keys, values, pos)
            pos += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if run > 0:
            best = max(best, new_tokens / elapsed)
    assert math.isfinite(best)
    return best


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
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    base_rss = rss_bytes()
    model = GPT2LMHeadModel.from_pretrained(a.model).eval().to(device)
    loaded_rss = rss_bytes()
    if a.prompt_ids:
        ids = torch.tensor([[int(t) for t in a.prompt_ids.split(",")]])
    else:
        ids = torch.arange(1000, 1000 + a.prompt_tokens).unsqueeze(0)
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    sampling = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=50256)
    best = 0.0
    first = []
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, **sampling)
        for run in range(a.first_token_runs):
            torch.manual_seed(100 + run)
            sync(device)
            start = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **sampling)
            sync(device)
            first.append(time.perf_counter() - start)
        for run in range(a.runs):
            torch.manual_seed(run)
            sync(device)
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                                 min_new_tokens=a.new_tokens, **sampling)
            sync(device)
            elapsed = time.perf_counter() - start
            generated = out.shape[1] - ids.shape[1]
            best = max(best, generated / elapsed)
    first.sort()
    final_rss = rss_bytes()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # After the memory figures: the lean loop's transposed head is not HF's memory.
    with torch.no_grad():
        lean = lean_tokens_per_second(model, ids, a.new_tokens, a.runs)
    print(json.dumps({"tokens_per_second": best, "lean_tokens_per_second": lean,
                      "first_token_seconds": first[len(first) // 2],
                      "max_rss_bytes": rss, "loaded_rss_bytes": loaded_rss, "base_rss_bytes": base_rss,
                      "final_rss_bytes": final_rss}))


if __name__ == "__main__":
    main()
