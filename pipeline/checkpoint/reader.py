"""The one reader of our DeepSpeed checkpoints' weights, whatever their ZeRO stage and rank count.

Export streams them into safetensors; finetune starts from them. Tensors are gathered lazily, one at a
time, from memory-mapped per-rank files, so neither the optimizer state nor the whole model is held in
memory, and the world size that wrote the checkpoint does not matter.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LazyTensor:
    """A checkpoint tensor that is gathered (in fp32 for ZeRO) only when `load()` is called."""
    shape: torch.Size
    load: Callable[[], torch.Tensor]


def _load_trusted(path: Path) -> dict:
    # DeepSpeed checkpoints pickle DeepSpeed objects, so weights_only=False: acceptable only because
    # these are our own files, written by our training stages. mmap: tensors are paged in on use.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def checkpoint_tensors(folder: Path) -> dict[str, LazyTensor]:
    """Our state-dict keys → lazy tensors, for a DeepSpeed checkpoint folder of any ZeRO stage."""
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    if not optim_files:  # ZeRO 0: no partitions, the module holds the weights
        module = _load_trusted(folder / "mp_rank_00_model_states.pt")["module"]
        if any(t.dtype != torch.float32 for t in module.values()):
            log.warning("%s holds 16-bit weights (ZeRO 0 keeps its fp32 masters in the optimizer state): "
                        "used as they are", folder)
        return {name: LazyTensor(t.shape, lambda t=t: t) for name, t in module.items()}
    from deepspeed.utils import zero_to_fp32 as z

    if _load_trusted(optim_files[0])["optimizer_state_dict"].get("zero_stage") == 3:
        # lazy: each GatheredTensor concatenates one parameter's slices from all ranks when asked
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            state = z.get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=True)
        return {name: LazyTensor(t.shape, t.contiguous) for name, t in state.items()}
    # ZeRO 1/2, and bf16 ZeRO 1 (BF16_Optimizer, which zero_to_fp32 rejects): each rank holds an equal
    # slice of every flattened fp32 group. zero_to_fp32 concatenates whole groups; we slice lazily.
    states = [_load_trusted(Path(f))["optimizer_state_dict"] for f in z.get_optim_files(str(folder))]
    counts = states[0]["partition_count"]
    world = max(counts) if isinstance(counts, list) else counts
    if world != len(states):
        raise PipelineError(f"checkpoint {folder} has {len(states)} optimizer files, written by {world} ranks")
    flat_groups = [s["single_partition_of_fp32_groups"] for s in states]
    paddings = states[0].get("param_alignment_paddings")
    model_state = _load_trusted(folder / "mp_rank_00_model_states.pt")
    tensors: dict[str, LazyTensor] = {}
    for group, shapes in enumerate(model_state["param_shapes"]):
        partitions = [rank_groups[group] for rank_groups in flat_groups]  # rank order = flat order
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            tensors[name] = LazyTensor(torch.Size(shape), lambda p=partitions, o=offset, n=numel, s=shape:
                                       _slice_partitions(p, o, n).view(s))
            offset += numel + (paddings[group][index] if paddings else 0)
        available, align = sum(p.numel() for p in partitions), 2 * world  # as zero_to_fp32 checks it
        if math.ceil(offset / align) != math.ceil(available / align):
            raise PipelineError(f"checkpoint {folder}: group {group} holds {available} values, its parameters "
                                f"{offset}; the checkpoint is damaged or not from this DeepSpeed version")
    for alias, target in model_state.get("shared_params", {}).items():
        tensors[alias] = tensors[target]
    return tensors


def _slice_partitions(partitions: list[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Values [start, start + numel) of the concatenation of `partitions`, without concatenating them."""
    chunks, base = [], 0
    for part in partitions:
        low, high = max(start, base), min(start + numel, base + part.numel())
        if low < high:
            chunks.append(part[low - base:high - base])
        base += part.numel()
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)




def consolidated_weights(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint as our state dict, on the CPU (ZeRO 1-3 give their fp32 master weights;
    ZeRO 0 with bf16 holds only the bf16 module, which is then used as it is)."""
    try:
        tensors = checkpoint_tensors(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise PipelineError(f"cannot read the weights of {folder} ({exc})") from None
    weights = {name: t.load() for name, t in tensors.items()}
    return {name: t.float() if t.is_floating_point() else t for name, t in weights.items()}
