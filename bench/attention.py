"""Masked attention: the step time of a forward + backward with segment ids (a block-diagonal causal
mask) against the same model and tokens without them (plain causal attention).

`attention_mask.build(segments, kind)` is how training isolates packed fine-tuning examples and documents
(train.document_mask): each position attends only to earlier positions of its own segment. The mask is
built every step, as the trainer does. Kinds: "dense", a [B, 1, T, T] mask that takes
scaled_dot_product_attention off the flash kernel (which takes only is_causal), and on CUDA "flex", a
FlexAttention block mask with compiled flex_attention; this measures what each costs at a given shape. The --model preset is built with bf16 parameters (as
DeepSpeed's bf16 mode trains) on --device; each row of the batch is cut into documents whose lengths
are drawn uniformly from 1 to 2 × --doc-len − 1 (mean --doc-len). The two variants alternate step by
step (after --warmup steps each), each step timed with time.perf_counter() after a device synchronize;
the optimizer is left out, since the mask changes only attention. Reported per variant: median step
time, tokens/s and (CUDA) the peak of allocated memory; for the mask, the median of the per-step
ratios masked / causal − 1 with a 90% bootstrap interval.

Prints a table and appends one dated row per variant to bench/RESULTS.md.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/attention.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.common import hardware, print_table, record  # noqa: E402
from bench.train import load_model_config, paired_overhead, quantile, sync  # noqa: E402
from pipeline.train import attention_mask  # noqa: E402
from pipeline.train.model import Transformer  # noqa: E402


def document_segments(batch: int, seq_len: int, doc_len: int, generator: torch.Generator) -> torch.Tensor:
    """Segment ids [batch, seq_len]: 0, 0, ..., 1, 1, ... per row, documents of random length (mean doc_len)."""
    segments = torch.empty(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        position, segment = 0, 0
        while position < seq_len:
            length = int(torch.randint(1, 2 * doc_len, (1,), generator=generator))
            segments[row, position:position + length] = segment
            position, segment = position + length, segment + 1
    return segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="125m", help="conf/model preset (default 125m)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--doc-len", type=int, default=256, help="mean document length in tokens (default 256)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    for name in ("seq_len", "micro_batch", "doc_len", "vocab", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"error: --warmup must be at least 0, got {args.warmup}")
    command = shlex.join(["python", *sys.argv])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cfg = load_model_config(args.model, args.vocab)
    if args.seq_len > cfg.max_seq_len:
        raise SystemExit(f"error: --seq-len {args.seq_len} exceeds max_seq_len={cfg.max_seq_len} of {args.model}")

    load_start = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device).train()
    for p in model.parameters():  # parameters only, buffers stay fp32: DeepSpeed's bf16 mode
        p.data = p.data.to(torch.bfloat16)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(3, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g)
    inputs, labels = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    segments = document_segments(args.micro_batch, args.seq_len, args.doc_len, g).to(device)
    variants = {"causal": None, "dense": attention_mask.DENSE}
    if device.type == "cuda":  # FlexAttention has no backward on CPU
        variants["flex"] = attention_mask.FLEX
    times = {name: [] for name in variants}
    peaks = {}
    for i in range(args.warmup + args.steps):
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):  # neither always runs first
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            kind = variants[name]
            mask = None if kind is None else attention_mask.build(segments, kind)
            _, loss = model(inputs, labels, mask=mask)
            loss.backward()
            sync(device)
            seconds = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(seconds)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30

    tokens_per_step = args.micro_batch * args.seq_len
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        paired, low, high = paired_overhead(seconds, times["causal"]) if name != "causal" else (0, 0, 0)
        what = {"causal": "causal (no mask)", "dense": "segments, dense [B,1,T,T] mask (SDPA)",
                "flex": "segments, FlexAttention block mask"}[name]
        row = {"model": args.model, "seq_len": str(args.seq_len), "micro batch": str(args.micro_batch),
               "attention": what,
               "step ms": f"{median * 1e3:.1f}",
               "p10-p90 ms": f"{quantile(seconds, 0.1) * 1e3:.1f}-{quantile(seconds, 0.9) * 1e3:.1f}",
               "tok/s": f"{tokens_per_step / median:,.0f}",
               "peak GiB": f"{peaks[name]:.1f}" if name in peaks else "-",
               "vs causal": "-" if name == "causal" else f"{paired * 100:+.1f}% [{low * 100:+.1f}, {high * 100:+.1f}]"}
        rows.append(row)
    print(f"# {hardware()}")
    print_table(rows)
    docs = int(segments.max(dim=1).values.float().mean().item()) + 1
    print(f"forward + backward with the loss, bf16 params, {args.steps} steps after {args.warmup} warmup each, "
          f"alternated; ~{docs} documents per row (mean length {args.doc_len}); vs causal: median of per-step "
          f"ratios − 1 [90% bootstrap interval]")
    if args.no_record:
        return
    setup = {"doc_len": args.doc_len, "docs per row": docs, "steps": f"{args.steps} (+{args.warmup} warmup)"}
    load = f"{load_start:.2f}→{os.getloadavg()[0]:.2f}"
    record(command, [{**row, **setup, "load": load} for row in rows])


if __name__ == "__main__":
    main()
