"""Benchmark: chunked advantage-weighted CE vs the naive ``F.cross_entropy(logits.float().view(-1, V), ...)``.

B·T = 8192 tokens, V = 32000, bf16 logits, forward + backward. Each variant runs in a fresh subprocess so its peak
resident memory (``ru_maxrss``) is its own; the baseline (inputs allocated, nothing computed) is subtracted. Times are
the median of ``--repeats`` runs in the same process after one warm-up. Prints ratios chunked / naive, both measured in
this run (targets: memory <= 0.35x, time <= 1.2x).

    python bench/bench_loss.py [--tokens 8192] [--vocab 32000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def make_inputs(tokens: int, vocab: int):
    import torch

    torch.manual_seed(0)
    batch = 8
    seq = tokens // batch
    logits = torch.randn(batch, seq, vocab, dtype=torch.bfloat16).requires_grad_()
    ids = torch.randint(0, vocab, (batch, seq))
    advantages = torch.randn(batch, seq)
    mask = (torch.rand(batch, seq) > 0.2).long()
    return logits, ids, advantages, mask


def naive_loss(logits, ids, advantages, mask):
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none")
    per_token = ce.view(ids.shape[0], -1) * advantages[:, 1:] * mask[:, 1:]
    return per_token.sum() / mask[:, 1:].sum()


def chunked_loss(logits, ids, advantages, mask):
    from recipe.atropos.algos.losses import compute_advantage_weighted_sft_loss

    return compute_advantage_weighted_sft_loss(logits, ids, advantages, mask)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_variant(variant: str, tokens: int, vocab: int, repeats: int) -> dict[str, float]:
    """In this process: peak RSS above the inputs for one forward+backward, then timed repeats."""
    logits, ids, advantages, mask = make_inputs(tokens, vocab)
    base = peak_rss_mb()
    fn = {"naive": naive_loss, "chunked": chunked_loss}[variant]
    fn(logits, ids, advantages, mask).backward()
    peak = peak_rss_mb() - base
    times = []
    for _ in range(repeats):
        logits.grad = None
        start = time.perf_counter()
        fn(logits, ids, advantages, mask).backward()
        times.append(time.perf_counter() - start)
    return {"peak_mb": peak, "seconds": statistics.median(times)}


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
    cmd += ["--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.tokens, args.vocab, args.repeats)))
        return
    naive, chunked = measure("naive", args), measure("chunked", args)
    logits_mb = args.tokens * args.vocab * 2 / 2**20
    print(f"advantage-weighted CE, B*T={args.tokens}, V={args.vocab}, bf16 logits ({logits_mb:.0f} MB), fwd+bwd")
    print(f"  naive   : peak +{naive['peak_mb']:.0f} MB, {naive['seconds']:.3f} s")
    print(f"  chunked : peak +{chunked['peak_mb']:.0f} MB, {chunked['seconds']:.3f} s")
    print(f"  memory ratio chunked/naive: {chunked['peak_mb'] / naive['peak_mb']:.2f}x (target <= 0.35x)")
    print(f"  time ratio   chunked/naive: {chunked['seconds'] / naive['seconds']:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
