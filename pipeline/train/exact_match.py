"""Exact match on held-out questions: each answered greedily with the KV cache, compared with its reference.

Every rank answers a disjoint slice; answers and accuracies (overall and per task where the records name
one) go to metrics.jsonl, and every answer to a file under the run folder to read what the model says.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.vocab import IM_END
from ..errors import PipelineError
from ..fsutil import atomic_write_bytes
from ..observe.metrics import MetricsLogger
from .model import generate

GENERATION_BATCH = 32  # questions answered per forward pass (grouped by prompt length: no padding)


@torch.no_grad()
def exact_match(module: torch.nn.Module, questions: list, sp, max_new_tokens: int, device: torch.device,
                batch_size: int = GENERATION_BATCH) -> tuple[int, int, list[str] | None]:
    """(correct, total, answers) over all ranks; `answers` (in question order) on rank 0 only, else None.

    Each rank answers a disjoint slice greedily; every rank makes the same number of forward calls (ZeRO 3
    gathers parameters collectively): prompts of equal length are batched, ranks with fewer batches run
    dummy ones, and every generation runs all max_new_tokens steps. The answer is the text before
    <|im_end|> (or </s>), stripped; it must equal the reference stripped."""
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
                generate(module, torch.zeros((1, 1), dtype=torch.long, device=device), max_new_tokens,
                         stop_early=False)
                continue
            # a prompt too long for the context keeps its end
            prompts = torch.tensor([questions[i].prompt_ids[-limit:] for i in batches[b]], device=device)
            continuations = generate(module, prompts, max_new_tokens, stop_early=False)[:, prompts.shape[1]:]
            for index, new_ids in zip(batches[b], continuations.tolist()):
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


def log_exact_match(metrics: MetricsLogger, module, questions: list, sp, max_new_tokens: int, answers_file: Path,
                    device: torch.device, step: int, when: str) -> dict[str, float] | None:
    """Exact match on the held-out questions: a metrics record (overall, and per task where the records
    name one), and every answer in run_dir/finetune/exact_match_<when>.jsonl (rank 0) to read what the
    model says. Returns {"all": accuracy, task: accuracy, ...} on rank 0."""
    if not questions:
        return None
    started = time.perf_counter()
    correct, total, answers = exact_match(module, questions, sp, max_new_tokens, device)
    record = {"step": step, "exact_match": correct / total, "exact_match_correct": correct,
              "exact_match_total": total, "exact_match_when": when}
    if answers is None:  # not rank 0
        return None
    right = [a == q.reference.strip() for q, a in zip(questions, answers)]
    accuracy = {"all": correct / total}
    for task in sorted({q.task for q in questions if q.task}):
        marks = [r for r, q in zip(right, questions) if q.task == task]
        accuracy[task] = record[f"exact_match_{task}"] = sum(marks) / len(marks)
    metrics.log({**record, "exact_match_s": round(time.perf_counter() - started, 2)})
    rows = [{"step": step, "prompt": q.prompt, "reference": q.reference, "answer": a, "correct": r,
             "task": q.task, "source": q.source} for q, a, r in zip(questions, answers, right)]
    path = answers_file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
    return accuracy


def describe_accuracy(accuracy: dict[str, float] | None) -> str:
    if accuracy is None:
        return "not measured (resumed run)"
    tasks = ", ".join(f"{task} {value:.3f}" for task, value in accuracy.items() if task != "all")
    return f"{accuracy['all']:.3f}" + (f" ({tasks})" if tasks else "")
