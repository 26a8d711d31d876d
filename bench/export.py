"""Export cost: `pipeline.stages.export.export_model` against a plain `LlamaForCausalLM.save_pretrained`.

For each --model preset, a child process builds a real DeepSpeed checkpoint of randomly initialised
weights (1 CPU rank, ZeRO --zero, bf16, one optimizer step so the Adam moments exist) plus a small
SentencePiece tokenizer. Then, each in its own fresh process:
  export    export_model(): streams the fp32 masters from the checkpoint into safetensors (--dtype),
            plus tokenizer files, configs and the model card;
  baseline  the usual recipe: DeepSpeed's zero_to_fp32 consolidates the whole state dict in memory,
            it is loaded into an HF LlamaForCausalLM (--dtype), and save_pretrained writes it
            ("save s" is save_pretrained alone: the floor for writing weights already in memory).
Peak RSS is the process's ru_maxrss, which counts memory-mapped checkpoint pages it touched (page
cache, reclaimable); peak anon samples RssAnon every 5 ms: the memory the process really allocated.
The checkpoint was just written, so it is in the page cache: this is CPU and memory cost, not disk.
Prints a table and appends a dated row to bench/RESULTS.md (--no-record: not).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/export.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import MemorySampler, figures, hardware, peak_rss_mib, print_table  # noqa: E402
from bench.common import record as record_row  # noqa: E402  (`record` names checkpoint records below)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


# -- children ---------------------------------------------------------------------------------------------
def build(run_dir: Path, model_name: str, vocab: int, zero: int) -> None:
    """run_dir/tokenizer/tokenizer.model and run_dir/pretrain/checkpoints/step_00000001 (complete)."""
    import torch
    from omegaconf import OmegaConf

    from pipeline.checkpoint.store import save_checkpoint
    from pipeline.checkpoint.writer import BackgroundWriter
    from pipeline.config import DeepSpeedConfig, LaunchConfig, ModelConfig, PrecisionConfig, TrainConfig
    from pipeline.train.engine import build_optimizer, deepspeed_config, init_distributed
    from pipeline.train.model import Transformer

    proc = subprocess.run([sys.executable, "-m", "pipeline", f"run_dir={run_dir}", "stages=[tokenize]",
                           "tokenizer.vocab_size=1024", "data.default_num_documents=2000"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    import deepspeed

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    device = init_distributed(LaunchConfig())
    preset = OmegaConf.load(Path(ROOT) / "conf" / "model" / f"{model_name}.yaml")  # as Hydra composes it
    preset.pop("defaults", None)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), preset))
    model_cfg.vocab_size = vocab
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    train = TrainConfig(micro_batch_size=1, global_batch_size=1, seq_len=32)
    ds = DeepSpeedConfig(name=f"zero{zero}", stage=zero)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, train, ds, device),
                                      config=deepspeed_config(train, ds, PrecisionConfig(name="bf16"), 1, 1))
    engine.checkpoint_engine = BackgroundWriter(background=False)  # what save_checkpoint writes through
    ids = torch.randint(4, vocab, (1, 33))
    _, loss = engine(ids[:, :-1], ids[:, 1:])
    engine.backward(loss)
    engine.step()
    save_checkpoint(engine, run_dir / "pretrain" / "checkpoints", 1,
                    {"step": 1, "tokens_seen": 32, "loader": None, "model": asdict(model_cfg)}, keep_last=1)


def run_export(run_dir: Path, dtype: str, out: Path) -> dict:
    import deepspeed  # noqa: F401  imported before the clock starts, as in the baseline
    import tokenizers  # noqa: F401

    from pipeline.config import ExportConfig, ModelConfig
    from pipeline.layout import RunLayout
    from pipeline.stages.export import export_model

    start = time.perf_counter()
    folder = export_model(ExportConfig(dtype=dtype), ModelConfig(), RunLayout.of(run_dir), "pretrain")
    seconds = time.perf_counter() - start
    shutil.move(str(folder), out)
    return {"seconds": seconds, "save_seconds": None}


def run_baseline(run_dir: Path, dtype: str, out: Path) -> dict:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.checkpoint.store import find_resumable
    from pipeline.config import ModelConfig
    from pipeline.hf.llama import to_hf_config, to_hf_state_dict

    start = time.perf_counter()
    folder, record = find_resumable(run_dir / "pretrain" / "checkpoints")
    model_cfg = ModelConfig(**record["trainer_state"]["model"])
    if list(folder.glob("*_optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    config = LlamaConfig(**to_hf_config(model_cfg))
    model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(to_hf_state_dict(state, model_cfg), strict=not model_cfg.tie_embeddings)
    del state
    save_start = time.perf_counter()
    model.save_pretrained(out)
    end = time.perf_counter()
    return {"seconds": end - start, "save_seconds": end - save_start}


def child(args) -> None:
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.child == "build":
        build(args.run_dir, args.model[0], args.vocab, args.zero)
        return
    baseline_rss = peak_rss_mib()  # the interpreter alone, before the heavy imports
    anon = MemorySampler("RssAnon")
    result = (run_export if args.child == "export" else run_baseline)(args.run_dir, args.dtype, args.out)
    result.update(peak_rss=peak_rss_mib(), peak_anon=anon.stop(), start_rss=baseline_rss,
                  output_mb=folder_mb(args.out))
    print("RESULT " + json.dumps(result))


def spawn(role: str, run_dir: Path, args, out: Path | None = None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", role, "--run-dir", str(run_dir),
               "--model", args.model[0] if role == "build" else "x", "--vocab", str(args.vocab),
               "--zero", str(args.zero), "--dtype", args.dtype]
    if out is not None:
        command += ["--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ROOT}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{role} failed:\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["tiny", "125m"], help="conf/model presets")
    parser.add_argument("--vocab", type=int, default=32000, help="model vocabulary (the tokenizer has 1024 pieces)")
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage of the checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method; the fastest is shown")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one, deleted after)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--child", choices=["build", "export", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    command = shlex.join(["python", *sys.argv])
    hw = hardware()
    load_start = os.getloadavg()[0]
    print(f"# {hw}")
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = []
    try:
        for model_name in args.model:
            run_dir = work / model_name
            shutil.rmtree(run_dir, ignore_errors=True)
            spawn("build", run_dir, replace_model(args, model_name))
            checkpoint = next((run_dir / "pretrain" / "checkpoints").glob("step_*"))
            ckpt_gb = sum(p.stat().st_size for p in checkpoint.iterdir()) / 1e9
            record = json.loads((checkpoint / "complete.json").read_text())
            from pipeline.config import ModelConfig
            from pipeline.train.model import num_params

            params = num_params(ModelConfig(**record["trainer_state"]["model"]), exclude_embedding=False) / 1e6
            for method in ("export", "baseline"):
                best = None
                for _ in range(args.repeats):
                    out = work / f"{model_name}-{method}"
                    shutil.rmtree(out, ignore_errors=True)
                    result = spawn(method, run_dir, args, out)
                    best = result if best is None or result["seconds"] < best["seconds"] else best
                    shutil.rmtree(out, ignore_errors=True)
                rows.append({"model": model_name, "params M": f"{params:.1f}", "ckpt GB": f"{ckpt_gb:.2f}",
                             "method": method if method == "export" else "save_pretrained",
                             "s": f"{best['seconds']:.2f}",
                             "save s": "-" if best["save_seconds"] is None else f"{best['save_seconds']:.2f}",
                             "peak RSS MiB": f"{best['peak_rss']:.0f}", "peak anon MiB": f"{best['peak_anon']:.0f}",
                             "out MB": f"{best['output_mb']:.1f}"})
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print_table(rows)
    print(f"checkpoint: 1 CPU rank, ZeRO {args.zero}, bf16, vocab {args.vocab}; output dtype {args.dtype}; "
          f"save_pretrained: zero_to_fp32 + load into LlamaForCausalLM + save_pretrained ('save s': that call alone); "
          f"s: best of {args.repeats}; peak RSS counts touched mmap'd checkpoint pages, peak anon does not")
    if args.no_record:
        return
    load = f"load {load_start:.2f}→{os.getloadavg()[0]:.2f}"
    per_model = " / ".join(figures(row) for row in rows)
    record_row(command, f"ZeRO {args.zero} bf16 checkpoint, 1 rank; vocab {args.vocab}; dtype {args.dtype}; "
               f"{per_model}; {load}", hw)


def replace_model(args, model_name: str):
    return argparse.Namespace(**{**vars(args), "model": [model_name]})


if __name__ == "__main__":
    main()
