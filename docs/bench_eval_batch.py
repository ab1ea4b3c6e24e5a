"""eval.py's choice scoring on a CPU (issue 28, point 3): records batched (tasks.continuation_logprobs over E pairs at once)
against one record at a time, and against the scoring before (output layer over every prompt
position), interleaved in one process on a random model with random token ids. From the repository root:
    python docs/bench_eval_batch.py [--dim 1024 --layers 8 --vocab 128256 --threads 2 --batch 8 --reps 3]"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

import model
import tasks


@torch.inference_mode()
def before(m, prompt, continuations):
    """tasks.continuation_logprobs as it was: the whole prompt decoded, logits at every position."""
    n, longest, start = len(continuations), max(map(len, continuations)), len(prompt)
    m.setup_cache(n, start + longest)
    try:
        last = m.decode(torch.tensor([prompt]), 0)[:, -1:]
        for layer in m.layers:
            c = layer.attention.cache
            c.k[1:n].copy_(c.k[:1].expand(n - 1, -1, -1, -1))
            c.v[1:n].copy_(c.v[:1].expand(n - 1, -1, -1, -1))
        rows = torch.zeros(n, longest, dtype=torch.long)
        for i, c in enumerate(continuations):
            rows[i, : len(c)] = torch.tensor(c)
        logits = m.decode(rows, start)[:, :-1] if longest > 1 else last.new_empty(n, 0, last.shape[-1])
    finally:
        m.clear_cache()
    lp = torch.cat([last.expand(n, -1, -1), logits.float()], dim=1).log_softmax(-1)
    picked = lp.gather(-1, rows.unsqueeze(-1)).squeeze(-1)
    return [picked[i, : len(c)].tolist() for i, c in enumerate(continuations)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lengths", default="20-60,200-400")
    p.add_argument("--answer_tokens", default="1-5")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    args = model.ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, n_kv_heads=max(1, a.dim // 256),
                           vocab_size=a.vocab, max_seq_len=1024)
    m = model.Transformer(args)
    m.init_weights()
    m.eval()
    print(f"cpu {torch.cpu.get_capabilities()['cpu_name']} ({torch.backends.cpu.get_cpu_capability()}); "
          f"load {os.getloadavg()}; threads {a.threads}; dim {a.dim} layers {a.layers} vocab {a.vocab}")
    r = random.Random(0)
    lo_a, hi_a = map(int, a.answer_tokens.split("-"))
    for span in a.lengths.split(","):
        lo, hi = map(int, span.split("-"))
        pairs = [([r.randrange(a.vocab) for _ in range(r.randint(lo, hi))],
                  [[r.randrange(a.vocab) for _ in range(r.randint(lo_a, hi_a))] for _ in range(4)])
                 for _ in range(a.records)]
        ways = {"before (1 at a time, all logits)": lambda: [before(m, p, c) for p, c in pairs],
                "now, 1 at a time": lambda: [tasks.continuation_logprobs(m, [pc]) for pc in pairs],
                f"now, batches of {a.batch}": lambda: [tasks.continuation_logprobs(m, pairs[i : i + a.batch])
                                                        for i in range(0, len(pairs), a.batch)]}
        got = {k: [] for k in ways}
        for name, run in ways.items():  # warm-up
            run()
        for _ in range(a.reps):  # interleaved, so load changes hit every way alike
            for name, run in ways.items():
                t0 = time.perf_counter()
                run()
                got[name].append(time.perf_counter() - t0)
        base = statistics.median(got["now, 1 at a time"])
        print(f"prompts {span} tokens, {a.records} records x 4 answers of {a.answer_tokens} tokens; load {os.getloadavg()[0]:.1f}")
        for name, t in got.items():
            med = statistics.median(t)
            print(f"  {name:34s} {a.records / med:7.2f} records/s  (median of {a.reps}: {med:.3f}s; {base / med:.2f}x 1-at-a-time)")


if __name__ == "__main__":
    main()
