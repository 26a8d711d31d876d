"""Peak memory of one training forward + backward: the loss over the whole logits against the chunked loss.

"full logits" is the formula the model used before `pipeline.train.model.linear_cross_entropy`: the output
projection of every position, `logits.float()` over [B, T, vocab] and F.cross_entropy on that (4.2 GB of
fp32 logits at micro batch 16, seq 2048, vocab 32k, and as much again for log_softmax and the gradient).
"chunked" is the model's own loss, `model(inputs, labels)`, which holds the logits of LOSS_CHUNK_TOKENS
positions at a time. Each variant runs in a fresh process (so neither inherits the other's heap): it
builds the --model preset in --dtype (bf16: the parameters cast as DeepSpeed's bf16 mode casts them),
makes one random batch, measures the resident memory at rest (baseline), then runs one forward and
backward with `bench.common.MemorySampler` sampling VmRSS (CPU) or reads torch.cuda.max_memory_allocated
(--device cuda). On CPU the children run with MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every block
of 64 KiB or more on its own and unmaps it when freed, so RSS follows the live tensors (with its default,
freed heap stays resident by chance, and the same run's peak varied by 800 MiB). Reported: baseline,
peak, the step's own part (peak − baseline), seconds and the loss, which should agree between the variants.

Prints a table and appends one dated row to bench/RESULTS.md.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/memory.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from bench.common import MemorySampler, hardware, print_table, record  # noqa: E402

VARIANTS = ("full logits", "chunked")


def malloc_trim() -> None:
    """Hand glibc's freed heap back, so the baseline is what is live, not what the build left behind."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline is then higher and the step's part smaller


def child(args) -> dict:
    """One variant in this process; returns its figures (MiB, seconds, loss)."""
    import torch
    import torch.nn.functional as F

    from bench.train import load_model_config
    from pipeline.data.batching import IGNORE_INDEX
    from pipeline.train.model import LOSS_CHUNK_TOKENS, Transformer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_model_config(args.model, args.vocab)
    if args.seq_len > cfg.max_seq_len:
        raise SystemExit(f"error: --seq-len {args.seq_len} exceeds max_seq_len={cfg.max_seq_len} of {args.model}")
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device).train()
    if args.dtype == "bf16":
        for p in model.parameters():  # parameters only, buffers stay fp32: DeepSpeed's bf16 mode
            p.data = p.data.to(torch.bfloat16)
    tokens = torch.randint(3, args.vocab, (args.micro_batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(args.seed))
    inputs, labels = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)

    gc.collect()
    malloc_trim()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**20
    sampler = MemorySampler("VmRSS", interval=0.002) if device.type == "cpu" else None
    if sampler is not None:
        baseline = sampler.sample()
    started = time.perf_counter()
    if args.variant == "full logits":
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        del logits  # the trainer keeps only the loss (pipeline.train.trainer drops the logits before backward)
    else:
        _, loss = model(inputs, labels)
    if sampler is not None:
        sampler.sample()  # the end of the forward: activations at their largest
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        sampler.sample()
        peak = sampler.stop()
    seconds = time.perf_counter() - started
    return {"baseline": baseline, "peak": peak, "seconds": seconds, "loss": loss.item(),
            "chunk_tokens": LOSS_CHUNK_TOKENS, "threads": torch.get_num_threads(), "torch": torch.__version__}


def run_variant(variant: str, args) -> dict:
    """The variant in a fresh process (this script with --child); its last stdout line is its JSON."""
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, "--model", args.model,
               "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--vocab", str(args.vocab),
               "--dtype", args.dtype, "--device", args.device, "--seed", str(args.seed), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS = live tensors (see the docstring)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: the {variant} process exited with {done.returncode}"
                         + (" (killed: out of memory?)" if done.returncode < 0 else ""))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="350m", help="conf/model preset (default 350m)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="default 4: 13 GB at 350m, seq 2048 on CPU")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="parameter dtype (default bf16, as DeepSpeed's bf16 mode trains)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu: peak VmRSS; cuda: torch.cuda.max_memory_allocated")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--child", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("seq_len", "micro_batch", "vocab"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.variant:
        print(json.dumps(child(args)), flush=True)
        return

    command = shlex.join(["python", *sys.argv])
    load_start = os.getloadavg()[0]
    results = {}
    for variant in VARIANTS:
        results[variant] = run_variant(variant, args)
        r = results[variant]
        print(f"{variant}: peak {r['peak']:.0f} MiB, baseline {r['baseline']:.0f} MiB, {r['seconds']:.1f} s, "
              f"loss {r['loss']:.4f}", flush=True)
    full, chunked = results["full logits"], results["chunked"]
    logits_mib = args.micro_batch * args.seq_len * args.vocab * 4 / 2**20
    unit = "RSS" if args.device == "cpu" else "allocated"
    rows = [{"variant": variant, f"peak {unit} MiB": f"{r['peak']:.0f}", "baseline MiB": f"{r['baseline']:.0f}",
             "step MiB": f"{r['peak'] - r['baseline']:.0f}", "s": f"{r['seconds']:.1f}", "loss": f"{r['loss']:.4f}"}
            for variant, r in results.items()]
    print()
    print_table(rows)
    saved = full["peak"] - chunked["peak"]
    print(f"{args.model}, {args.dtype} params, micro batch {args.micro_batch} × seq {args.seq_len}, "
          f"vocab {args.vocab} (fp32 logits of all positions: {logits_mib:.0f} MiB); chunked: {chunked['chunk_tokens']} positions at a "
          f"time; peak lower by {saved:.0f} MiB ({saved / full['peak']:.1%}); step MiB: peak − baseline (model, "
          f"batch); |loss difference| {abs(full['loss'] - chunked['loss']):.2e}")
    load = f"{load_start:.2f}→{os.getloadavg()[0]:.2f}"
    print(f"load average {load} ({os.cpu_count()} CPUs); torch {full['torch']}, {full['threads']} threads")
    if args.no_record:
        return
    if args.device == "cuda":
        import torch  # noqa: F401  (hardware() names the GPUs and torch's version once torch is imported)
    hw = hardware()
    figures = {"dtype": args.dtype, "micro batch": args.micro_batch, "seq_len": args.seq_len, "vocab": args.vocab,
               "fp32 logits MiB": f"{logits_mib:.0f}", "chunk tokens": full["chunk_tokens"]}
    for variant, r in results.items():
        figures[f"{variant} peak {unit} MiB"] = f"{r['peak']:.0f}"
        figures[f"{variant} step MiB"] = f"{r['peak'] - r['baseline']:.0f}"
        figures[f"{variant} s"] = f"{r['seconds']:.1f}"
    figures["peak saved MiB"] = f"{saved:.0f}"
    figures["loss full/chunked"] = f"{full['loss']:.4f}/{chunked['loss']:.4f}"
    figures["load"] = load
    record(command, {"model": args.model, **figures}, hw)


if __name__ == "__main__":
    main()
