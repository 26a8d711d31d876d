"""Time of the loss's forward and backward: the model's chunked loss against the formula it replaced.

"before" is `pipeline.train.model`'s chunked loss as it was until 2026-12-02 (kept here for this): a fresh
[chunk, vocab] logits tensor per chunk from F.linear, torch.logsumexp over it (which makes a second one)
and a second exponential pass for the gradient's softmax. "after" is `pipeline.train.model.linear_cross_entropy`:
one fp32 buffer for every chunk's logits, exponentiated once in place. Both take LOSS_CHUNK_TOKENS positions
at a time and compute the gradients in the forward. The two run alternately, call by call, on the same
random hidden states and labels (a seventh of them ignored, as prompt positions are); reported: the median
time of each, the median of the per-call ratios after / before − 1 with a 90% bootstrap interval, the minor
page faults per call (CPU), and the largest difference of the loss and of the gradients between the two.
Defaults: the shape of one micro batch of the built-in run (model=tiny, micro batch 8 × seq 256, vocab 4096).

Prints a table and appends one dated row to bench/RESULTS.md.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/loss.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import hardware, print_table, record  # noqa: E402
from bench.train import paired_overhead, sync  # noqa: E402
from pipeline.data.batching import IGNORE_INDEX  # noqa: E402
from pipeline.train.model import LOSS_CHUNK_TOKENS, linear_cross_entropy  # noqa: E402


def loss_before(h, weight, labels, chunk_tokens):
    """The former pipeline.train.model._chunked_cross_entropy with its gradients (the autograd Function's forward)."""
    grad_h, grad_w = torch.empty_like(h), torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    valid = labels != IGNORE_INDEX
    count = valid.sum()
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        counted = valid[rows]
        target = labels[rows].masked_fill(~counted, 0)[:, None]
        logits = F.linear(h[rows], weight)
        dtype, logits = logits.dtype, logits.float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        total += torch.where(counted, (lse - logits.gather(1, target)).squeeze(1), 0.0).sum()
        grad = logits.sub_(lse).exp_().scatter_add_(1, target, torch.full_like(target, -1, dtype=logits.dtype))
        grad = grad.mul_(torch.where(counted, 1.0 / count, 0.0)[:, None]).to(dtype)
        grad_h[rows] = grad @ weight
        grad_w += grad.t() @ h[rows]
    return total / count, grad_h, grad_w.to(weight.dtype)


def loss_after(h, weight, labels, chunk_tokens):
    h, weight = h.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels, chunk_tokens)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


VARIANTS = {"before": loss_before, "after": loss_after}


def timed(fn, args, device) -> tuple[float, int, tuple]:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="positions per call: micro batch × seq_len")
    parser.add_argument("--dim", type=int, default=64, help="model width (default 64, model=tiny)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="hidden states and weight")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per variant (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    for name in ("tokens", "dim", "vocab", "calls"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.dim, generator=generator).to(device, dtype)
    weight = (torch.randn(args.vocab, args.dim, generator=generator) / args.dim ** 0.5).to(device, dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    labels[::7] = IGNORE_INDEX
    inputs = (h, weight, labels, LOSS_CHUNK_TOKENS)

    for _ in range(args.warmup):
        for fn in VARIANTS.values():
            fn(*inputs)
    seconds = {name: [] for name in VARIANTS}
    faults = {name: [] for name in VARIANTS}
    outputs = {}
    for _ in range(args.calls):
        for name, fn in VARIANTS.items():
            took, faulted, outputs[name] = timed(fn, inputs, device)
            seconds[name].append(took)
            faults[name].append(faulted)
    paired, low, high = paired_overhead(seconds["after"], seconds["before"])
    (loss_b, gh_b, gw_b), (loss_a, gh_a, gw_a) = outputs["before"], outputs["after"]

    def relative(a, b) -> float:
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    rows = [{"variant": name, "ms per call": f"{statistics.median(seconds[name]) * 1000:.1f}",
             "page faults per call": f"{statistics.median(faults[name]):.0f}"} for name in VARIANTS]
    print(f"loss forward + backward, {args.tokens} positions × vocab {args.vocab}, dim {args.dim}, {args.dtype}, "
          f"{args.device}, chunks of {LOSS_CHUNK_TOKENS}, {args.calls} calls each, alternated")
    print_table(rows)
    summary = {
        "shape": f"{args.tokens} × {args.vocab}, dim {args.dim}, {args.dtype}, {args.device}",
        "threads": str(torch.get_num_threads()),
        "before ms": rows[0]["ms per call"], "after ms": rows[1]["ms per call"],
        "after/before − 1": f"{paired:+.1%} [{low:+.1%}, {high:+.1%}]",
        "faults before": rows[0]["page faults per call"], "faults after": rows[1]["page faults per call"],
        "loss equal": str(bool(torch.equal(loss_a, loss_b))),
        "grad max rel diff": f"{max(relative(gh_a, gh_b), relative(gw_a, gw_b)):.1e}",
    }
    print("; ".join(f"{k} {v}" for k, v in summary.items()))
    if not args.no_record:
        record(shlex.join(["python", *sys.argv]), summary, hardware())


if __name__ == "__main__":
    main()
