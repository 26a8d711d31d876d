"""Training step throughput: the DeepSpeed engine (`pipeline.train.engine`) against a plain PyTorch loop.

For every --model preset, --precision and --zero stage, a fresh plain-PyTorch trainer and a fresh
DeepSpeed engine are built from the same initial weights (same seed) and stepped on the same random
token batches, interleaved step by step (plain, zero, zero, plain, plain, zero, ...: the order flips
every step so neither side always runs first), one rank; then both are freed and the next stage's
pair is built. After --warmup steps each, --steps steps of each are timed with time.perf_counter()
(after torch.cuda.synchronize() on a GPU). Reported per variant: median step time, its update part
(after the last backward), tokens/s, MFU (PaLM FLOPs per token, `pipeline.train.model.flops_per_token`, over
`pipeline.observe.metrics.peak_flops`; null on CPU), the overhead of the engine over the plain loop it was
paired with (ratio of median step times) and the median of the per-step ratios with a bootstrap
interval (adjacent steps saw about the same machine load: on a shared machine this is the figure to
trust), process CPU time per step on CPU, and the final loss of both sides as a check that they
trained the same model the same way.

What each side does, so the comparison is like for like:
  DeepSpeed  pipeline.train.engine.initialize_engine(model, build_optimizer(...), deepspeed_config(...)) on a
             world of one (gloo on CPU, nccl on GPU), engine(x, y) / engine.backward(loss) / engine.step().
  plain      the same Transformer, torch AdamW over `pipeline.train.engine.param_groups` (fused=True on CUDA;
             DeepSpeed gets FusedAdam there from build_optimizer), clip_grad_norm_ to train.grad_clip,
             torch's own F.linear (a ZeRO 3 engine swaps in its zero3_linear_wrap process-wide; here
             only the ZeRO 3 engine steps with it).
  bf16       DeepSpeed's bf16 mode casts the parameters (not the buffers) to bf16, so forward and
             backward run in bf16 with bf16 gradients, and keeps fp32 master weights and AdamW state
             in its optimizer wrapper (ZeRO 0: FP16_UnfusedOptimizer/FP16_Optimizer in bf16 mode,
             ZeRO 1/2: DeepSpeedZeroOptimizer, ZeRO 3: DeepSpeedZeroOptimizer_Stage3). The plain
             baseline does the same by default (--plain-bf16 master): bf16 parameters, fp32 master
             copies, grads upcast to fp32, clipped, AdamW on the masters, copied back to bf16.
             --plain-bf16 autocast instead keeps fp32 weights and runs the forward under torch.autocast
             (a different numerical scheme, and on CPU a slower one: shown for reference only).

Prints a table and appends one dated row per variant to bench/RESULTS.md (with the load average:
other work on the machine is the noise), each pair's rows as soon as the pair finishes. --json PATH
keeps every step's times.
--profile N runs cProfile over N more steps of each pair: own time by source (DeepSpeed's Python, the
model's, torch ops) for both sides, and the engine's top functions.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/train.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bench.common import hardware, print_table, quiet_logs, record  # noqa: E402
from pipeline.config import DeepSpeedConfig, LaunchConfig, ModelConfig, PrecisionConfig, TrainConfig  # noqa: E402
from pipeline.data.batching import BatchLayout  # noqa: E402
from pipeline.observe.metrics import peak_flops  # noqa: E402
from pipeline.train.engine import build_optimizer, deepspeed_config, init_distributed, initialize_engine, param_groups  # noqa: E402
from pipeline.train.model import Transformer, compile_blocks, flops_per_token, num_params  # noqa: E402

# Building a ZeRO 3 engine replaces torch.nn.functional.linear process-wide with DeepSpeed's
# zero3_linear_wrap (zero_optimization.memory_efficient_linear, on by default) and leaves it so.
# Each runner steps with the F.linear it was built under: the plain loop always with torch's own.
TORCH_LINEAR = torch.nn.functional.linear
GOALS = {0: 0.03, 1: 0.03, 2: 0.03, 3: 0.10}  # allowed overhead of the engine over the plain loop


def load_model_config(name: str, vocab: int) -> ModelConfig:
    """conf/model/<name>.yaml over the ModelConfig defaults, as Hydra composes it (minus the defaults list)."""
    path = Path(ROOT) / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"--model {name}: no {path}; presets: {', '.join(presets)}")
    preset = OmegaConf.load(path)
    preset.pop("defaults", None)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), preset))
    return replace(cfg, vocab_size=vocab)


def join_world_of_one() -> torch.device:
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    return init_distributed(LaunchConfig())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Plain:
    """One rank, no DeepSpeed: what a hand-written loop does with the same model, optimizer and clip."""

    def __init__(self, model: Transformer, train: TrainConfig, precision: str, bf16_mode: str,
                 device: torch.device, grad_accum: int):
        self.model, self.train, self.device, self.grad_accum = model.to(device), train, device, grad_accum
        self.linear = TORCH_LINEAR
        self.autocast = precision == "bf16" and bf16_mode == "autocast"
        groups = param_groups(model, train.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.masters = None
        if precision == "bf16" and not self.autocast:
            # DeepSpeed's scheme: the module's parameters in bf16 (buffers stay fp32), fp32 masters in the optimizer.
            for p in self.params:
                p.data = p.data.to(torch.bfloat16)
            master_of = {id(p): p.detach().float().clone() for p in self.params}
            groups = [{**g, "params": [master_of[id(p)] for p in g["params"]]} for g in groups]
            self.masters = [master_of[id(p)] for p in self.params]
        elif precision == "fp16":
            raise SystemExit("--precision fp16: the plain loop has no loss scaler here; use bf16 or fp32")
        kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
        if device.type == "cuda":
            kwargs["fused"] = True
        self.optimizer = torch.optim.AdamW(groups, **kwargs)

    def step(self, batches) -> torch.Tensor:
        for inputs, labels in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                _, loss = self.model(inputs, labels)
            (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()
        self.update_started = now(self.device)
        if self.masters is None:
            torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for master, p in zip(self.masters, self.params):
                master.grad = p.grad.float()
                p.grad = None
            torch.nn.utils.clip_grad_norm_(self.masters, self.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        return loss.detach()

    def close(self) -> None:
        pass


class Engine:
    """The DeepSpeed path exactly as pipeline.stages.pretrain builds and steps it."""

    def __init__(self, model: Transformer, train: TrainConfig, ds: DeepSpeedConfig, precision: PrecisionConfig,
                 device: torch.device, grad_accum: int):
        optimizer = build_optimizer(model, train, ds, device)
        config = deepspeed_config(train, ds, precision, train.micro_batch_size, grad_accum)
        torch.nn.functional.linear = TORCH_LINEAR
        self.engine = initialize_engine(model, optimizer, config, ds.stage)
        self.linear = torch.nn.functional.linear  # zero3_linear_wrap at ZeRO 3
        torch.nn.functional.linear = TORCH_LINEAR
        self.engine.train()
        self.device = device
        self.final_optimizer = type(self.engine.optimizer).__name__

    def step(self, batches) -> torch.Tensor:
        for i, (inputs, labels) in enumerate(batches):
            _, loss = self.engine(inputs, labels)
            self.engine.backward(loss)
            if i == len(batches) - 1:
                self.update_started = now(self.device)
            self.engine.step()
        return loss.detach()

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def timed_step(runner, batches, device) -> tuple[dict, torch.Tensor]:
    """Seconds of one optimizer step: wall (perf_counter), of which the update (clip, optimizer step and
    the engine's bookkeeping after the last backward), and CPU seconds of this process (all its threads)."""
    torch.nn.functional.linear = runner.linear
    cpu, started = time.process_time(), now(device)
    loss = runner.step(batches)
    ended = now(device)
    return {"wall": ended - started, "update": ended - runner.update_started, "cpu": time.process_time() - cpu}, loss


def make_batches(n: int, micro: int, seq_len: int, vocab: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (n, micro, seq_len + 1), generator=g)
    return [(t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)) for t in tokens]


def profile_runner(runner, steps: list, device, top: int) -> str:
    prof = cProfile.Profile()
    torch.nn.functional.linear = runner.linear
    sync(device)
    prof.enable()
    for batches in steps:
        runner.step(batches)
    sync(device)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    # Own time (tottime) by where it is spent: DeepSpeed's Python, the model's Python, torch ops (C), the rest.
    by_source = {"deepspeed/*.py": 0.0, "pipeline/*.py": 0.0, "torch/*.py": 0.0, "built-ins (ops, comm)": 0.0,
                 "other": 0.0}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
        key = ("deepspeed/*.py" if "/deepspeed/" in filename else "pipeline/*.py" if "/pipeline/" in filename
               else "torch/*.py" if "/torch/" in filename else "built-ins (ops, comm)" if filename == "~"
               else "other")
        by_source[key] += tottime
    total = sum(by_source.values())
    out.write(f"own time per step by source ({len(steps)} steps): " + ", ".join(
        f"{k} {v / len(steps) * 1e3:.1f} ms ({v / total:.1%})" for k, v in by_source.items()) + "\n")
    if not top:
        return out.getvalue()
    stats.sort_stats("tottime").print_stats(top)
    out.write("\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def measure_pair(model_cfg: ModelConfig, stage: int, precision: str, args, device) -> dict:
    train = TrainConfig(seq_len=args.seq_len, micro_batch_size=args.micro_batch,
                        global_batch_size=args.micro_batch * args.grad_accum, lr=3e-4)
    grad_accum = BatchLayout.of(train, "train", 1).accumulation
    ds = DeepSpeedConfig(name=f"zero{stage}", stage=stage, extra=args.ds_extra)
    prec = PrecisionConfig(name=precision)
    def fresh_model() -> Transformer:
        torch.manual_seed(args.seed)
        model = Transformer(model_cfg)
        if model_cfg.compile:  # as pipeline.train.engine.build_engine does, before wrapping
            compile_blocks(model)
        return model

    plain = Plain(fresh_model(), train, precision, args.plain_bf16, device, grad_accum)
    engine = Engine(fresh_model(), train, ds, prec, device, grad_accum)
    pool = make_batches(max(2, 2 * grad_accum), args.micro_batch, args.seq_len, model_cfg.vocab_size, device, args.seed)

    def batches(i):
        return [pool[(i * grad_accum + k) % len(pool)] for k in range(grad_accum)]

    runners = {"plain": plain, f"zero{stage}": engine}
    times = {name: {"wall": [], "update": [], "cpu": []} for name in runners}
    losses = {}
    names = list(runners)
    for i in range(args.warmup + args.steps):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            seconds, losses[name] = timed_step(runners[name], batches(i), device)
            if i >= args.warmup:
                for key, value in seconds.items():
                    times[name][key].append(value)
    profile = None
    if args.profile:
        steps = [batches(i) for i in range(args.profile)]
        profile = (f"plain: {profile_runner(plain, steps, device, 0)}"
                   f"zero{stage}: {profile_runner(engine, steps, device, args.profile_top)}")
    result = {"times": times, "order": names, "loss": {k: float(v) for k, v in losses.items()},
              "optimizer": engine.final_optimizer, "profile": profile}
    for runner in runners.values():
        runner.close()
    del plain, engine, runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def paired_overhead(engine: list[float], plain: list[float], level: float = 0.9,
                    n: int = 2000) -> tuple[float, float, float]:
    """Median of the per-step ratios engine[i] / plain[i] - 1 (the two ran back to back, so both saw about the
    same load), and its bootstrap interval over the pairs: how much of an overhead is machine noise."""
    ratios = [e / p for e, p in zip(engine, plain)]
    rng = random.Random(0)
    medians = [statistics.median(rng.choices(ratios, k=len(ratios))) - 1 for _ in range(n)]
    return statistics.median(ratios) - 1, quantile(medians, (1 - level) / 2), quantile(medians, (1 + level) / 2)


def summarize(r: dict, model_name: str, n_params: int, precision: str, stage: int, tokens_per_step: int,
              fpt: int, peak, device, args) -> list[dict]:
    """Rows for the plain loop and the engine of one pair; the overheads are against that same plain loop."""
    wall = {k: statistics.median(v["wall"]) for k, v in r["times"].items()}
    update = {k: statistics.median(v["update"]) for k, v in r["times"].items()}
    cpu = {k: statistics.median(v["cpu"]) for k, v in r["times"].items()}
    if precision == "bf16":
        plain_scheme = "bf16 params, fp32 masters" if args.plain_bf16 == "master" else "fp32 params, autocast bf16"
    else:
        plain_scheme = "fp32"
    rows = []
    for name, seconds in wall.items():
        is_plain = name == "plain"
        tok_s = tokens_per_step / seconds
        overhead = None if is_plain else seconds / wall["plain"] - 1
        cpu_overhead = None if is_plain else cpu[name] / cpu["plain"] - 1
        row = {
            "model": model_name, "params M": f"{n_params / 1e6:.1f}", "precision": precision,
            "variant": f"plain@z{stage}" if is_plain else name,
            "optimizer": f"torch AdamW ({plain_scheme})" if is_plain else r["optimizer"],
            "step ms": f"{seconds * 1e3:.1f}",
            "p10-p90 ms": f"{quantile(r['times'][name]['wall'], 0.1) * 1e3:.0f}-"
                          f"{quantile(r['times'][name]['wall'], 0.9) * 1e3:.0f}",
            "update ms": f"{update[name] * 1e3:.1f}",
            "tok/s": f"{tok_s:,.0f}",
            "MFU": "null" if peak is None else f"{tok_s * fpt / peak:.3f}",
            "overhead": "-" if overhead is None else f"{overhead * 100:+.1f}%",
            "paired": "-",
            "goal": "-",
        }
        if not is_plain:
            paired, low, high = paired_overhead(r["times"][name]["wall"], r["times"]["plain"]["wall"])
            goal = GOALS[stage]
            row["paired"] = f"{paired * 100:+.1f}% [{low * 100:+.1f}, {high * 100:+.1f}]"
            row["goal"] = f"≤{goal:.0%} " + ("met" if overhead <= goal else "missed") + (
                " (noise)" if low <= goal < high else "")
        if device.type == "cpu":  # CPU seconds of the process: less disturbed by other load on the machine
            row["cpu ms"] = f"{cpu[name] * 1e3:.1f}"
            row["cpu overhead"] = "-" if cpu_overhead is None else f"{cpu_overhead * 100:+.1f}%"
        row["final loss"] = f"{r['loss'][name]:.4f}"
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    gap = abs(r["loss"][f"zero{stage}"] - r["loss"]["plain"])
    if gap > (1e-4 if precision == "fp32" else 2e-3):
        print(f"note: {precision} zero{stage} ended at loss {r['loss'][f'zero{stage}']:.4f}, its plain twin at "
              f"{r['loss']['plain']:.4f} (same weights, batches and steps): the two did not train the same way",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny"], help="conf/model presets (default tiny)")
    parser.add_argument("--zero", nargs="+", type=int, default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", "fp32"],
                        help="default bf16; add fp32 for the full-precision pairs (doubles the run time)")
    parser.add_argument("--plain-bf16", default="master", choices=["master", "autocast"],
                        help="bf16 scheme of the plain loop: master (DeepSpeed's: bf16 params, fp32 master "
                             "weights; default) or autocast (fp32 params under torch.autocast)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimizer step (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--compile", action="store_true",
                        help="model.compile: torch.compile every block of both sides (the first steps compile)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--ds-extra", type=json.loads, default={}, metavar="JSON",
                        help="merged into the DeepSpeed config (DeepSpeedConfig.extra), e.g. "
                             "'{\"zero_optimization\": {\"memory_efficient_linear\": false}}'")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile N more steps of each pair: own time by source (DeepSpeed's Python, the "
                             "model's, torch ops) for both, the top functions of the engine")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--json", type=Path, help="also write every step's times here")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    command = shlex.join(["python", *sys.argv])

    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    device = join_world_of_one()
    peak = peak_flops(device)
    hw = hardware()
    print(f"# {hw}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"deepspeed {__import__('deepspeed').__version__}")

    setup = {"seq_len": args.seq_len, "micro batch": args.micro_batch, "grad accum": args.grad_accum,
             "steps": f"{args.steps} (+{args.warmup} warmup)", "compile": "on" if args.compile else "off"}
    rows, raw = [], []
    for model_name in args.model:
        model_cfg = replace(load_model_config(model_name, args.vocab), compile=args.compile)
        if args.seq_len > model_cfg.max_seq_len:
            raise SystemExit(f"--seq-len {args.seq_len} exceeds max_seq_len={model_cfg.max_seq_len} of {model_name}")
        fpt = flops_per_token(model_cfg, args.seq_len)
        tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
        n_params = num_params(model_cfg, exclude_embedding=False)
        for precision in args.precision:
            for stage in args.zero:
                r = measure_pair(model_cfg, stage, precision, args, device)
                pair = summarize(r, model_name, n_params, precision, stage, tokens_per_step, fpt, peak, device, args)
                rows += pair
                if not args.no_record:  # as each pair finishes: a run cut short still leaves its rows
                    load = f"{load_start:.2f}→{os.getloadavg()[0]:.2f}"  # other work on the machine: the noise
                    record(command, [{**setup, **row, "load": load} for row in pair], hw)
                raw.append({"model": model_name, "precision": precision, "stage": stage, "times": r["times"],
                             "loss": r["loss"], "optimizer": r["optimizer"]})
                if r["profile"]:
                    print(f"\n## cProfile, zero{stage} {precision}, {args.profile} steps\n{r['profile']}", flush=True)

    print()
    print_table(rows)
    print(f"tokens/step {tokens_per_step:,} (micro batch {args.micro_batch} × seq {args.seq_len} × accum "
          f"{args.grad_accum}); step ms: median of {args.steps} steps after {args.warmup} warmup; paired: median of the "
          f"per-step ratios zeroN/plain@zN - 1 [90% bootstrap interval]; goal: by overhead, '(noise)' where the "
          f"paired interval straddles it; "
          f"plain@zN: the plain loop interleaved with zeroN, overhead = zeroN / plain@zN - 1"
          + "; update ms: the part after the last backward (clip, optimizer, copies; engine.step() for DeepSpeed)"
          + ("; cpu ms: process CPU time per step (all threads)" if device.type == "cpu" else ""))
    print(f"load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} now ({os.cpu_count()} CPUs)")
    if "bf16" in args.precision:
        plain_bf16 = ("the same (bf16 params, fp32 masters)" if args.plain_bf16 == "master"
                      else "fp32 params under torch.autocast(bf16): not DeepSpeed's scheme")
        print(f"bf16: DeepSpeed casts params to bf16, fp32 master weights + AdamW state in its optimizer wrapper; "
              f"plain: {plain_bf16}")
    print(f"MFU = tok/s × flops_per_token ({fpt:,}/token) / peak ({'none on CPU' if peak is None else f'{peak:.3g}'})")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "hardware": hw, "tokens_per_step": tokens_per_step,
                                         "pairs": raw}, indent=1))


if __name__ == "__main__":
    main()
