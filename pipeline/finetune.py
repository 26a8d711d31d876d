"""`finetune` stage: supervised fine-tuning on the pretrain engine (DeepSpeed ZeRO, precision, Trainer).

Weights come from `finetune.init`: `pretrain` (this run's newest complete pretrain checkpoint, consolidated
to fp32 with DeepSpeed's zero_to_fp32, so any ZeRO stage loads into any other) or an HF LlamaForCausalLM
folder (config.json + safetensors, never pickle). Only weights: the optimizer starts fresh. An interrupted
fine-tune resumes from its own checkpoints (`finetune.resume=auto`), which takes precedence over init.

Before and after training, held-out questions are answered greedily and compared exactly with their
reference answers; both accuracies go to metrics.jsonl and the log.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import autobatch
from .config import ModelConfig, PipelineConfig
from .errors import PipelineError
from .metrics import MetricsLogger
from .tokenizer import load_tokenizer
from .train import Trainer, build_engine, grad_accumulation, init_distributed, model_for_tokenizer

log = logging.getLogger(__name__)

GENERATION_BATCH = 32  # questions answered per forward pass (grouped by prompt length: no padding)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "finetune" / "checkpoints"


def default_instructions_dir(run_dir: Path) -> Path:
    return run_dir / "data" / "default"


# -- where the weights come from ----------------------------------------------------------------

@dataclass
class InitSource:
    kind: str  # "pretrain" | "hf"
    path: Path  # the pretrain checkpoint folder, or the HF folder
    model: ModelConfig  # vocab_size None: taken from the tokenizer
    tokenizer: Path


def resolve_init(cfg: PipelineConfig, run_dir: Path, need_weights: bool = True) -> InitSource:
    """What finetune.init names, checked before any work. With need_weights=False (resuming) a missing
    pretrain checkpoint is no error: only the architecture is needed then."""
    from .checkpoint import find_resumable
    from .pretrain import checkpoint_root as pretrain_root

    init = cfg.finetune.init
    run_tokenizer = run_dir / "tokenizer" / "tokenizer.model"
    if init == "pretrain":
        # the weights are unpickled next: inside the ranks (collective) every file's sha256 must verify
        found = find_resumable(pretrain_root(run_dir), digests=need_weights and dist.is_initialized(), collective=True)
        if found is None and need_weights:
            raise PipelineError(f"finetune.init=pretrain: no complete pretrain checkpoint under "
                                f"{pretrain_root(run_dir)}: run stages=[pretrain] first, or set "
                                f"finetune.init=/path/to/hf/folder")
        return InitSource("pretrain", found[0] if found else pretrain_root(run_dir), cfg.model, run_tokenizer)
    folder = Path(init).expanduser().resolve()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"finetune.init={init!r}: {config_path} does not exist; give `pretrain` or an HF "
                            f"LlamaForCausalLM export folder")
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"finetune.init={init!r}: {config_path} is unreadable ({exc})") from None
    from .hf_llama import model_config_from_hf

    try:
        model = model_config_from_hf(hf_config)
    except ValueError as exc:
        raise PipelineError(f"finetune.init={init!r} is not a LlamaForCausalLM export this pipeline can load: "
                            f"{exc}") from None
    model = replace(model, dropout=cfg.model.dropout, activation_checkpointing=cfg.model.activation_checkpointing,
                    compile=cfg.model.compile)
    if need_weights:
        _safetensors_files(folder)  # fail now, not after the data is built
    tokenizer = folder / "tokenizer.model"  # the export ships its SentencePiece model; else this run's
    return InitSource("hf", folder, model, tokenizer if tokenizer.is_file() else run_tokenizer)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise PipelineError(f"{index} is unreadable ({exc!r})") from None
        files = [folder / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PipelineError(f"{index} lists missing shard(s) {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise PipelineError(f"{folder} has no model.safetensors (or model.safetensors.index.json); only safetensors "
                        f"weights are loaded, never pickled .bin files")


def init_state_dict(source: InitSource, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The init weights as our state dict, on the CPU."""
    if source.kind == "hf":
        from safetensors.torch import load_file

        from .hf_llama import from_hf_state_dict

        hf_state: dict[str, torch.Tensor] = {}
        for path in _safetensors_files(source.path):
            hf_state.update(load_file(str(path)))
        try:
            return from_hf_state_dict(hf_state, model_cfg)
        except ValueError as exc:
            raise PipelineError(f"{source.path}: {exc}") from None
    return pretrain_state_dict(source.path)


def pretrain_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of one of our DeepSpeed checkpoints, whatever its ZeRO stage and rank count (the
    export stage's reader: ZeRO 1-3 give their fp32 master weights; ZeRO 0 with bf16 only holds the
    bf16 module, which is then used as it is)."""
    from .export import checkpoint_tensors

    try:
        tensors = checkpoint_tensors(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise PipelineError(f"cannot read the weights of {folder} ({exc})") from None
    weights = {name: t.load() for name, t in tensors.items()}
    return {name: t.float() if t.is_floating_point() else t for name, t in weights.items()}


def load_init_weights(model: torch.nn.Module, source: InitSource) -> None:
    state = init_state_dict(source, model.cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        hint = "model= must be the pretrain stage's" if source.kind == "pretrain" else "the folder's config.json " \
                                                                                        "disagrees with its weights"
        raise PipelineError(f"the weights of {source.path} do not fit the model ({hint}): {detail}") from None


# -- exact match --------------------------------------------------------------------------------

@torch.no_grad()
def greedy(module: torch.nn.Module, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """The `steps` greedy continuations [B, steps] of equal-length prompts [B, T], with the model's KV cache:
    always `steps` forward calls. Unlike `model.generate` this runs under no_grad, not inference_mode: ZeRO 3
    keeps small parameters gathered across calls, and tensors made in inference mode would then break the
    next training step's backward."""
    batch, length = prompts.shape
    cache = module.new_kv_cache(batch, length + steps)
    logits = module(prompts, kv_cache=cache, start_pos=0)[:, -1]
    out = []
    for i in range(steps):
        out.append(logits.argmax(dim=-1))
        if i + 1 < steps:
            logits = module(out[-1][:, None], kv_cache=cache, start_pos=length + i)[:, -1]
    return torch.stack(out, dim=1)


@torch.no_grad()
def exact_match(module: torch.nn.Module, questions: list, sp, max_new_tokens: int, device: torch.device,
                batch_size: int = GENERATION_BATCH) -> tuple[int, int, list[str] | None]:
    """(correct, total, answers) over all ranks; `answers` (in question order) on rank 0 only, else None.

    Each rank answers a disjoint slice greedily; every rank makes the same number of forward calls (ZeRO 3
    gathers parameters collectively): prompts of equal length are batched, ranks with fewer batches run
    dummy ones, and every generation runs all max_new_tokens steps. The answer is the text before
    <|im_end|> (or </s>), stripped; it must equal the reference stripped."""
    from .chat import IM_END

    rank, world = dist.get_rank(), dist.get_world_size()
    limit = module.cfg.max_seq_len - max_new_tokens
    if limit < 1:
        raise PipelineError(f"finetune.max_new_tokens={max_new_tokens} leaves no room for a prompt within "
                            f"max_seq_len={module.cfg.max_seq_len}")
    by_length: dict[int, list[int]] = {}
    for index in range(rank, len(questions), world):
        by_length.setdefault(len(questions[index].prompt_ids[-limit:]), []).append(index)
    batches = [group[i:i + batch_size] for _, group in sorted(by_length.items())
               for i in range(0, len(group), batch_size)]
    count = torch.tensor([len(batches)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    stops = {sp.piece_to_id(IM_END), sp.eos_id()}
    was_training = module.training
    module.eval()
    answers: dict[int, str] = {}
    try:
        for b in range(int(count.item())):
            if b >= len(batches):  # keeps this rank's forward calls in step with the others
                greedy(module, torch.zeros((1, 1), dtype=torch.long, device=device), max_new_tokens)
                continue
            # a prompt too long for the context keeps its end
            prompts = torch.tensor([questions[i].prompt_ids[-limit:] for i in batches[b]], device=device)
            for index, new_ids in zip(batches[b], greedy(module, prompts, max_new_tokens).tolist()):
                cut = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
                answers[index] = sp.decode(new_ids[:cut]).strip()
    finally:
        module.train(was_training)
    correct = sum(answer == questions[i].reference.strip() for i, answer in answers.items())
    totals = torch.tensor([correct, len(answers)], device=device, dtype=torch.int64)
    dist.all_reduce(totals)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(answers, gathered, dst=0)
    ordered = None
    if rank == 0:
        merged = {i: a for part in gathered for i, a in part.items()}
        ordered = [merged[i] for i in range(len(questions))]
    return int(totals[0]), int(totals[1]), ordered


def answers_path(run_dir: Path, when: str) -> Path:
    return run_dir / "finetune" / f"exact_match_{when}.jsonl"


def log_exact_match(metrics: MetricsLogger, module, data, sp, cfg: PipelineConfig, run_dir: Path,
                    device: torch.device, step: int, when: str) -> dict[str, float] | None:
    """Exact match on the held-out questions: a metrics record (overall, and per task where the records
    name one), and every answer in run_dir/finetune/exact_match_<when>.jsonl (rank 0) to read what the
    model says. Returns {"all": accuracy, task: accuracy, ...} on rank 0."""
    if not data.questions:
        return None
    started = time.perf_counter()
    correct, total, answers = exact_match(module, data.questions, sp, cfg.finetune.max_new_tokens, device)
    record = {"step": step, "exact_match": correct / total, "exact_match_correct": correct,
              "exact_match_total": total, "exact_match_when": when}
    if answers is None:  # not rank 0
        return None
    right = [a == q.reference.strip() for q, a in zip(data.questions, answers)]
    accuracy = {"all": correct / total}
    for task in sorted({q.task for q in data.questions if q.task}):
        marks = [r for r, q in zip(right, data.questions) if q.task == task]
        accuracy[task] = record[f"exact_match_{task}"] = sum(marks) / len(marks)
    metrics.log({**record, "exact_match_s": round(time.perf_counter() - started, 2)})
    from .fsutil import atomic_write_bytes

    rows = [{"step": step, "prompt": q.prompt, "reference": q.reference, "answer": a, "correct": r,
             "task": q.task, "source": q.source} for q, a, r in zip(data.questions, answers, right)]
    path = answers_path(run_dir, when)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
    return accuracy


def describe_accuracy(accuracy: dict[str, float] | None) -> str:
    if accuracy is None:
        return "not measured (resumed run)"
    tasks = ", ".join(f"{task} {value:.3f}" for task, value in accuracy.items() if task != "all")
    return f"{accuracy['all']:.3f}" + (f" ({tasks})" if tasks else "")


# -- the stage ----------------------------------------------------------------------------------

def will_resume(cfg: PipelineConfig, run_dir: Path) -> bool:
    from .checkpoint import find_resumable

    choice = cfg.finetune.resume
    if choice == "none":
        return False
    return choice != "auto" or find_resumable(checkpoint_root(run_dir)) is not None


def main(cfg: PipelineConfig, run_dir: Path, resolved_config: dict) -> None:
    from . import sft_data
    from .model import flops_per_token

    ft = cfg.finetune
    device = init_distributed(cfg.launch)
    rank, world = dist.get_rank(), dist.get_world_size()
    resuming = will_resume(cfg, run_dir)
    source = resolve_init(cfg, run_dir, need_weights=not resuming)
    sp = load_tokenizer(source.tokenizer)
    model_cfg = model_for_tokenizer(source.model, sp.get_piece_size(), ft.seq_len, "finetune", source.tokenizer)
    if not ft.data.paths:  # the built-in instruction set: written with the default corpus (rank 0 only)
        if rank == 0:
            from .default_corpus import write_default_corpus

            write_default_corpus(default_instructions_dir(run_dir), seed=cfg.data.seed,
                                 num_documents=cfg.data.default_num_documents)
        dist.barrier()
    data = sft_data.build(ft.data, default_instructions_dir(run_dir), sp, ft.seq_len, ft.pack, ft.eval_exact_match,
                          ft.pack_isolate)
    # micro_batch_size=auto: probed now, before the loaders and the engine are built from it
    ft = autobatch.resolve(ft, "finetune", model_cfg, cfg.deepspeed, cfg.precision, device)
    grad_accum = grad_accumulation(ft, world)
    pin = device.type == "cuda"
    loader = sft_data.SFTLoader(data.train, ft.micro_batch_size, ft.global_batch_size, dp_rank=rank, dp_world=world,
                                seed=ft.seed, pin_memory=pin)
    if not ft.pack:
        data.train.stats.padding_fraction = loader.epoch_padding_fraction()
    eval_set = sft_data.SFTEvalBatches(data.held_out, ft.micro_batch_size, ft.eval_batches, rank, world, pin)

    engine, num_parameters = build_engine(model_cfg, ft, cfg.deepspeed, cfg.precision, device, grad_accum,
                                          None if resuming else lambda model: load_init_weights(model, source))
    metrics = MetricsLogger(run_dir, "finetune", rank == 0, cfg.logging.wandb, resolved_config)
    trainer = Trainer(stage="finetune", engine=engine, loader=loader, eval_batches=eval_set, train=ft,
                      run_dir=run_dir, checkpoint_root=checkpoint_root(run_dir), metrics=metrics,
                      flops_per_token=flops_per_token(model_cfg, ft.seq_len),
                      tokens_per_step=ft.global_batch_size * ft.seq_len, device=device,
                      model_config=asdict(model_cfg))
    if rank == 0:
        held = data.held_out.stats.describe() if data.held_out else "none"
        log.info("finetune: %s from %s; train: %s; held-out: %s; %d exact-match questions", data.description,
                 "its last checkpoint (resume)" if resuming else f"{source.kind} weights {source.path}",
                 data.train.stats.describe(), held, len(data.questions))
        log.info("finetune: model %.2fM parameters, %d ranks × micro batch %d × %d accumulation, ZeRO %d, %s, "
                 "%s sequences of %d tokens", num_parameters / 1e6, world,
                 ft.micro_batch_size, grad_accum, cfg.deepspeed.stage, cfg.precision.name,
                 "packed" if ft.pack else "unpacked", ft.seq_len)
    trainer.resume()
    before = None
    if trainer.state.step == 0:
        before = log_exact_match(metrics, engine.module, data, sp, cfg, run_dir, device, 0, "before")
    if trainer.state.step >= ft.max_steps:
        log.info("finetune: already at step %d of finetune.max_steps=%d", trainer.state.step, ft.max_steps)
    else:
        trainer.fit()
    after = log_exact_match(metrics, engine.module, data, sp, cfg, run_dir, device, trainer.state.step, "after")
    if after is not None:  # rank 0
        log.info("finetune: exact match on %d held-out questions: before %s, after %s", len(data.questions),
                 describe_accuracy(before), describe_accuracy(after))
    metrics.finish()


def stage_inputs(cfg: PipelineConfig, run_dir: Path) -> dict:
    """Everything the finetune stage's outputs depend on, for the runner's skip record."""
    from .checkpoint import find_resumable
    from .corpus import files_fingerprint, resolve_paths
    from .fsutil import sha256_file
    from .pretrain import checkpoint_root as pretrain_root

    ft = cfg.finetune
    if ft.init == "pretrain":
        found = find_resumable(pretrain_root(run_dir))
        init = {"pretrain": sha256_file(found[0] / "complete.json") if found else "missing"}
    else:
        folder = Path(ft.init).expanduser()
        init = {"hf": files_fingerprint(sorted(p for p in folder.glob("*") if p.is_file())) if folder.is_dir()
                else "missing"}
    if ft.data.paths:
        try:
            data = files_fingerprint(resolve_paths(list(ft.data.paths)))
        except PipelineError:
            data = "missing"  # the stage itself reports it
    else:
        data = {"default": {"seed": cfg.data.seed, "documents": cfg.data.default_num_documents}}
    tokenizer = run_dir / "tokenizer" / "tokenizer.model"
    return {"model": asdict(cfg.model), "finetune": asdict(ft), "deepspeed": asdict(cfg.deepspeed),
            "precision": asdict(cfg.precision), "init": init, "data": data,
            "tokenizer": sha256_file(tokenizer) if tokenizer.is_file() else "missing"}
