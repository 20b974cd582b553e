#!/usr/bin/env python3
"""Reference for the overhead-bound training row of the trainer benchmark: a model so narrow that
its arithmetic is negligible, so a step's time is kernel dispatch, the optimizer's loops and
synchronisations. PyTorch eager at its best for that: Hugging Face GPT2LMHeadModel,
AdamW(fused=True), clip_grad_norm_ (foreach), a linear warm-up/decay schedule, random token ids.

Prints one JSON line: steps per second, and the ATen operations one step dispatches (counted
with the profiler on one extra, untimed step).
"""
import argparse
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    cfg = GPT2Config(vocab_size=a.vocab, n_positions=a.seq, n_embd=a.width, n_layer=a.layers,
                     n_head=a.heads, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1, fused=True)
    total = a.steps + a.warmup_steps + 1
    sched = get_linear_schedule_with_warmup(opt, 10, total)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1))

    def step():
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup_steps):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    elapsed = time.perf_counter() - start

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    # Top-level ATen calls only: an op another op calls is not a separate dispatch from Python.
    aten_ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)

    print(json.dumps({"steps_per_second": a.steps / elapsed, "seconds_per_step": elapsed / a.steps,
                      "loss": float(loss.detach()), "aten_ops_per_step": aten_ops}))


if __name__ == "__main__":
    main()
