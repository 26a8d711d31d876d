"""Fine-tuning data: instruction records → ChatML token sequences with loss on the assistant turns only.

Records are read through HF `datasets` from jsonl/json/parquet files, each in one of three shapes
(detected per record): {"prompt", "response"}, Alpaca {"instruction", "input", "output"} or chat
{"messages": [{"role", "content"}, ...]}. Each becomes a list of messages, rendered with the one chat
template (`pipeline.data.chat`) and encoded as a WHOLE text by SentencePiece, so the ids equal what HF
`apply_chat_template` + the exported tokenizer give. The tokens inside the template's target spans
(each assistant content and its closing <|im_end|>) are the targets, located through SentencePiece's
piece byte offsets; labels are shifted (labels[t] = ids[t + 1]) and -100 wherever the next token is
not a target, so prompts and padding carry no loss.

Sequences: with packing, examples are placed first-fit (longest first, deterministic) into windows
of seq_len + 1 tokens; without, one example per sequence and each micro batch padded to its longest
member (the global batch is sorted by length before it is dealt out, so neighbours are alike).
Order and data-parallel split are `batching.GlobalOrder`'s, as for pretraining: seeded permutation per
epoch, global positions, contiguous slices per rank, exact resume from `samples_consumed`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..config import FinetuneDataConfig
from ..errors import PipelineError
from .batching import IGNORE_INDEX, BatchLayout, FixedBatches, GlobalOrder
from .chat import ROLES, render
from .stream import Batch, _alloc, _check_pin, check_rank

log = logging.getLogger(__name__)

ACCEPTED_SHAPES = ('{"prompt": ..., "response": ...}, Alpaca {"instruction": ..., "input": ... (optional), '
                   '"output": ...}, or chat {"messages": [{"role": "system|user|assistant", "content": ...}, ...]}')
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_TRAIN, DEFAULT_EVAL = "instructions_train.jsonl", "instructions_eval.jsonl"


# -- records -------------------------------------------------------------------------------------

@dataclass
class Conversation:
    messages: list[dict]  # [{"role", "content"}], at least one assistant turn
    source: str  # "file, record i": where errors and logs point
    task: str = ""  # a record's optional "task" field: exact match is also reported per task

    def question(self) -> tuple[list[dict], str]:
        """(the messages before the last assistant turn, that turn's content): an exact-match item."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last], self.messages[last]["content"]


def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise PipelineError(f"{where}: {what} is {type(value).__name__}, not text")
    # lone surrogates (possible in JSON) cannot be encoded: the same U+FFFD the corpus reader uses
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if not value.isascii() else value


def to_messages(record: dict, where: str) -> list[dict]:
    """One record (any accepted shape; absent fields may be None) as chat messages."""
    present = {k for k, v in record.items() if v is not None}
    system = [{"role": "system", "content": _text(record["system"], "system", where)}] if "system" in present else []
    if "messages" in present:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise PipelineError(f"{where}: messages is {type(messages).__name__}, not a list of turns")
        out = []
        for turn in messages:
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or turn.get("content") is None:
                raise PipelineError(f"{where}: every turn of messages needs a role in {list(ROLES)} and a content; "
                                    f"got {turn!r:.120}")
            out.append({"role": turn["role"], "content": _text(turn["content"], "a turn's content", where)})
        messages = system + out
    elif present & {"instruction", "output"}:
        user = _text(record["instruction"], "instruction", where) if "instruction" in present else ""
        if record.get("input"):
            user = f"{user}\n\n{_text(record['input'], 'input', where)}" if user else _text(record["input"], "input",
                                                                                                where)
        messages = system + [{"role": "user", "content": user}]
        if "output" in present:
            messages.append({"role": "assistant", "content": _text(record["output"], "output", where)})
    elif present & {"prompt", "response"}:
        messages = system + [{"role": "user", "content": _text(record.get("prompt") or "", "prompt", where)}]
        if "response" in present:
            messages.append({"role": "assistant", "content": _text(record["response"], "response", where)})
    else:
        raise PipelineError(f"{where} has an unknown shape (fields: {sorted(present) or 'none'}); accepted shapes: "
                            f"{ACCEPTED_SHAPES}")
    if not any(m["role"] == "assistant" for m in messages):
        raise PipelineError(f"{where} has no assistant turn: every record needs a response/output or an "
                            f"assistant message to learn from")
    return messages


def read_records(path: Path) -> Iterator[dict]:
    """The rows of one jsonl/json/parquet file, through HF datasets (streamed: nothing is cached)."""
    import datasets

    from .corpus import _no_torch_in_datasets

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise PipelineError(f"finetune.data.paths: {str(path)!r} is not {'/'.join(BUILDERS)}; fine-tuning needs "
                            f"records ({ACCEPTED_SHAPES})")
    try:
        with _no_torch_in_datasets(datasets):
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        yield from ds
    except PipelineError:
        raise
    except Exception as exc:  # parse errors from pyarrow / datasets
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"{path}: cannot read as {builder}: {message}") from exc


def load_conversations(paths: Iterable[Path]) -> list[Conversation]:
    out = []
    for path in paths:
        before = len(out)
        for index, record in enumerate(read_records(path)):
            where = f"{path}, record {index} (counting from 0)"
            task = record.get("task")
            out.append(Conversation(to_messages(record, where), f"{path}#{index}", task if isinstance(task, str) else ""))
        if len(out) == before:
            log.warning("%s holds no record", path)
    return out


@dataclass
class Splits:
    train: list[Conversation]
    held_out: list[Conversation]
    description: str


def load_splits(data: FinetuneDataConfig, default_dir: Path) -> Splits:
    """finetune.data.paths, split by val_fraction (seeded); empty paths: the built-in instruction set,
    whose own eval file is the held-out split (run_dir/data/default, written by the tokenize stage)."""
    if not data.paths:
        files = [Path(default_dir) / DEFAULT_TRAIN, Path(default_dir) / DEFAULT_EVAL]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PipelineError(f"the built-in instruction set {missing} is missing: run with data=default "
                                f"(stages tokenize) or give finetune.data.paths=[...]")
        return Splits(load_conversations(files[:1]), load_conversations(files[1:]), "the built-in instruction set")
    from .corpus import resolve_paths

    if not 0 <= data.val_fraction < 1:
        raise PipelineError(f"finetune.data.val_fraction={data.val_fraction} must lie in [0, 1)")
    try:
        paths = resolve_paths(list(data.paths))
    except PipelineError as exc:
        raise PipelineError(str(exc).replace("data.paths", "finetune.data.paths", 1)) from None
    conversations = load_conversations(paths)
    if not conversations:
        raise PipelineError(f"finetune.data.paths={list(data.paths)} holds no record")
    order = np.random.default_rng([data.seed, 7]).permutation(len(conversations))
    n_val = min(len(conversations) - 1, int(round(data.val_fraction * len(conversations))))
    if data.val_fraction > 0 and len(conversations) > 1:
        n_val = max(1, n_val)
    held = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return Splits([conversations[i] for i in train], [conversations[i] for i in held],
                  f"{len(paths)} file(s), val_fraction={data.val_fraction}")


# -- tokens --------------------------------------------------------------------------------------

def _encode_protos(sp, texts: list[str]) -> list:
    """SentencePiece results with per-piece byte offsets (the proto API's name changed across versions)."""
    try:
        return sp.encode(texts, return_type="proto")
    except (TypeError, ValueError):
        return sp.encode(texts, out_type="immutable_proto")


def _byte_spans(text: str, char_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    def to_byte(position: int) -> int:
        return len(text[:position].encode("utf-8"))

    return [(to_byte(start), to_byte(end)) for start, end in char_spans]


def encode_many(sp, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    rendered = [render(messages) for messages in conversations]
    protos = _encode_protos(sp, [text for text, _ in rendered])
    out = []
    for (text, char_spans), proto in zip(rendered, protos):
        spans = _byte_spans(text, char_spans)
        pieces = proto.pieces
        n = len(pieces)
        ids = np.fromiter((piece.id for piece in pieces), np.int32, n)
        begin = np.fromiter((piece.begin for piece in pieces), np.int64, n)
        # byte-fallback pieces of one character share its start (all but the last are empty ranges):
        # a piece is a target when its range (at least its first byte) overlaps a target span
        end = np.maximum(np.fromiter((piece.end for piece in pieces), np.int64, n), begin + 1)
        target = np.zeros(n, bool)
        for s, e in spans:
            target |= np.maximum(begin, s) < np.minimum(end, e)
        out.append((ids, target))
    return out


@dataclass
class SequenceStats:
    examples: int = 0  # conversations tokenized
    kept: int = 0
    truncated: int = 0  # longer than seq_len + 1 tokens: cut to it
    dropped: int = 0  # truncated so far that no target token remained
    tokens: int = 0  # tokens of the kept examples, after truncation
    target_tokens: int = 0
    sequences: int = 0
    padding_fraction: float = 0.0  # share of input positions that are padding (as batched)

    def describe(self) -> str:
        return (f"{self.examples} examples → {self.sequences} sequences, {self.target_tokens} target tokens of "
                f"{self.tokens}, padding {100 * self.padding_fraction:.1f}%, {self.truncated} truncated, "
                f"{self.dropped} dropped")


class SFTSequences:
    """Tokenized examples as training sequences of at most seq_len + 1 tokens.

    Storage is flat (ids, shifted label-of-each-token) plus each sequence's (start, length): a packed
    sequence is its examples laid out next to each other, so it is one contiguous range too.
    """

    def __init__(self, conversations: list[Conversation], sp, seq_len: int, pack: bool, name: str = "train",
                 pad_id: int | None = None, isolate: bool = False):
        if seq_len < 2:
            raise PipelineError(f"finetune.seq_len={seq_len} is too short for a conversation")
        self.seq_len, self.pack, self.name = seq_len, pack, name
        self.isolate = isolate and pack  # batches carry segment ids: a packed example attends only to itself
        self.pad_id = pad_id if pad_id is not None else (sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id())
        self.stats = SequenceStats(examples=len(conversations))
        examples = self._fit(encode_many(sp, [c.messages for c in conversations]), conversations)
        lengths = np.array([ids.size for ids, _ in examples], np.int64)
        if pack:
            bins = first_fit(lengths, seq_len + 1)
            order = [i for members in bins for i in members]
            seq_lengths = np.array([int(lengths[members].sum()) for members in bins], np.int64)
        else:
            order, seq_lengths = list(range(len(examples))), lengths
        ids = [examples[i][0] for i in order]
        # label_of[k] = ids[k] if token k is a target else -100: a window's labels are label_of[start+1 : end]
        label_of = [np.where(examples[i][1], examples[i][0], IGNORE_INDEX).astype(np.int32) for i in order]
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        self.label_of = np.concatenate(label_of) if label_of else np.zeros(0, np.int32)
        # isolate: segment_of[k] is which example of its packed sequence token k belongs to (0, 1, ...)
        self.segment_of = np.concatenate([np.full(lengths[i], j, np.int32) for members in bins
                                          for j, i in enumerate(members)]) if self.isolate and order else None
        self.lengths = seq_lengths
        self.starts = np.concatenate([[0], np.cumsum(seq_lengths)[:-1]]).astype(np.int64)
        self.stats.sequences = len(seq_lengths)
        if pack:
            self.stats.padding_fraction = self.padding_fraction(np.arange(len(self)))
        digest = hashlib.sha256(np.array([seq_len, int(pack)], np.int64).tobytes())
        for array in (self.ids, self.label_of, self.lengths):
            digest.update(array.tobytes())
        self.fingerprint = {"split": name, "sequences": len(self), "tokens": int(self.ids.size),
                            "sha256": digest.hexdigest()}

    def _fit(self, encoded, conversations) -> list[tuple[np.ndarray, np.ndarray]]:
        limit, kept, first_cut = self.seq_len + 1, [], None
        for (ids, target), conversation in zip(encoded, conversations):
            if ids.size > limit:
                self.stats.truncated += 1
                first_cut = first_cut or conversation.source
                ids, target = ids[:limit], target[:limit]
                if not target[1:].any():
                    self.stats.dropped += 1
                    continue
            kept.append((ids, target))
            self.stats.tokens += ids.size
            self.stats.target_tokens += int(target[1:].sum())
        self.stats.kept = len(kept)
        if self.stats.truncated:
            log.warning("finetune %s: %d of %d examples are longer than seq_len + 1 = %d tokens and were truncated "
                        "(%d of them lost every target token and were dropped), the first %s; raise finetune.seq_len "
                        "to keep them whole", self.name, self.stats.truncated, len(conversations), limit,
                        self.stats.dropped, first_cut)
        return kept

    def __len__(self) -> int:
        return len(self.lengths)

    def width(self, sequence_ids: np.ndarray) -> int:
        """Input positions of a batch of these sequences: seq_len when packed, else its longest member."""
        return self.seq_len if self.pack else int(self.lengths[sequence_ids].max()) - 1

    def padding_fraction(self, sequence_ids: np.ndarray, micro_batch_size: int | None = None) -> float:
        """Share of input positions that are padding when `sequence_ids` are batched in this order."""
        if len(sequence_ids) == 0:
            return 0.0
        chunks = [sequence_ids] if micro_batch_size is None else [
            sequence_ids[i:i + micro_batch_size] for i in range(0, len(sequence_ids), micro_batch_size)]
        if self.pack:
            slots = len(sequence_ids) * self.seq_len
        else:
            slots = sum(self.width(chunk) * len(chunk) for chunk in chunks)
        used = int((self.lengths[sequence_ids] - 1).sum())
        return 1.0 - used / slots

    def batch(self, sequence_ids: np.ndarray, pin_memory: bool = False) -> Batch:
        """(inputs, labels) int64 [len(sequence_ids), width]: padding has the pad id and label -100. With
        `isolate`, also segments: each position's example within its sequence (-1 for padding)."""
        shape = (len(sequence_ids), self.width(sequence_ids))
        inputs, labels = _alloc(shape, pin_memory), _alloc(shape, pin_memory)
        segments = _alloc(shape, pin_memory) if self.isolate else torch.empty(0, dtype=torch.int64)
        inputs.fill_(self.pad_id)
        labels.fill_(IGNORE_INDEX)
        segments.fill_(-1)
        inputs_np, labels_np, segments_np = inputs.numpy(), labels.numpy(), segments.numpy()
        for row, j in enumerate(np.asarray(sequence_ids).tolist()):
            start, n = int(self.starts[j]), int(self.lengths[j])
            inputs_np[row, :n - 1] = self.ids[start:start + n - 1]
            labels_np[row, :n - 1] = self.label_of[start + 1:start + n]
            if self.isolate:
                segments_np[row, :n - 1] = self.segment_of[start:start + n - 1]
        return (inputs, labels, segments) if self.isolate else (inputs, labels)


def first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Examples into bins of `capacity` tokens: longest first, each into the first bin it fits
    (first-fit decreasing; ties keep file order, so the result is deterministic). A max-tree over the
    bins' free space finds that bin in O(log n)."""
    n = len(lengths)
    if n == 0:
        return []
    size = 1
    while size < n:
        size *= 2
    free = np.zeros(2 * size, np.int64)  # leaves: free space of bin i (unopened bins: capacity)
    free[size:size + n] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for item in np.argsort(-lengths, kind="stable").tolist():
        need, node = int(lengths[item]), 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        index = node - size
        if index == len(bins):
            bins.append([])
        bins[index].append(item)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


# -- loaders -------------------------------------------------------------------------------------

class SFTLoader:
    """Train batches of SFT sequences, with the pretrain loader's interface and order (batching.GlobalOrder:
    a seeded permutation per epoch, chained; exact resume from samples_consumed); only how a micro batch
    is built differs. Unpacked sequences: the global batch is sorted by length and its micro batches are
    dealt to the ranks in turn, so each pads little and the ranks stay balanced."""

    def __init__(self, data: SFTSequences, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0, pin_memory: bool = False):
        if len(data) < 1:
            raise PipelineError(f"the fine-tuning {data.name} split has no example left: add data")
        check_rank(dp_rank, dp_world)
        self.layout = BatchLayout(global_batch_size, micro_batch_size, dp_world, "finetune")
        _check_pin(pin_memory)
        self.data, self.dp_rank, self.pin_memory = data, dp_rank, pin_memory
        self.order = GlobalOrder(len(data), self.layout, seed)

    def rank_micro_batches(self, step_start: int, rank: int | None = None) -> list[np.ndarray]:
        """The micro batches (sequence ids) of rank `rank` (default: this one) in the global batch at
        position `step_start`."""
        rank = self.dp_rank if rank is None else rank
        if self.data.pack:
            return list(self.order.rank_ids(step_start, rank))
        ids = self.order.step_ids(step_start)
        ids = ids[np.argsort(self.data.lengths[ids], kind="stable")]
        chunks = ids.reshape(self.layout.accumulation * self.layout.world, self.layout.micro_batch)
        return list(chunks[rank::self.layout.world])

    def next_global_batch(self) -> list[Batch]:
        micro_batches = self.rank_micro_batches(self.order.samples_consumed)
        batches = [self.data.batch(micro, self.pin_memory) for micro in micro_batches]
        self.order.advance()  # only once the whole step's data exists
        return batches

    def epoch_padding_fraction(self) -> float:
        """Padding share of one epoch's micro batches as this loader builds them (all ranks)."""
        steps = -(-len(self.data) // self.layout.global_batch)
        used = slots = 0
        for step in range(steps):
            for rank in range(self.layout.world):
                for micro in self.rank_micro_batches(step * self.layout.global_batch, rank):
                    slots += self.data.width(micro) * len(micro)
                    used += int((self.data.lengths[micro] - 1).sum())
        return 1.0 - used / slots

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "seq_len": self.data.seq_len, "fingerprint": dict(self.data.fingerprint)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.data.fingerprint:
            raise PipelineError(f"refusing to resume: the fine-tuning data or its tokenization changed since the "
                                f"checkpoint (checkpoint {state.get('fingerprint')}, now {self.data.fingerprint}): "
                                f"restore them, or start over with finetune.resume=none")
        for key in ("global_batch_size", "seed"):
            if state.get(key) != self.state_dict()[key]:
                raise PipelineError(f"refusing to resume: finetune {key} is {self.state_dict()[key]} but the "
                                    f"checkpoint was written with {state.get(key)}: set it back or start over")
        self.order.load_samples_consumed(state.get("samples_consumed"))


def sft_eval_batches(data: SFTSequences | None, batch_size: int, num_batches: int, dp_rank: int = 0,
                     dp_world: int = 1, pin_memory: bool = False) -> FixedBatches:
    """Fixed held-out batches (batching.FixedBatches); none when there is no held-out split."""
    available = 0 if data is None else len(data)
    batches = FixedBatches(available, batch_size, num_batches, dp_rank, dp_world,
                           lambda ids: data.batch(ids, pin_memory))
    if data is not None and num_batches > 0 and batches.full < num_batches:
        log.warning("finetune eval: the held-out split has %d sequences, %d batch(es) of %d × %d ranks "
                    "(asked for %d)%s", len(data), batches.full, batch_size, dp_world, num_batches,
                    "; no validation loss" if not batches.full else "")
    return batches


# -- exact match ---------------------------------------------------------------------------------

@dataclass
class Question:
    prompt_ids: list[int]  # the rendered conversation up to and including "<|im_start|>assistant\n"
    reference: str
    source: str = ""
    prompt: str = ""  # the last user turn, for reading the answers
    task: str = ""


def exact_match_questions(conversations: list[Conversation], sp, limit: int) -> list[Question]:
    """The first `limit` held-out conversations as greedy-answer questions (the prompt encoded whole,
    with the generation prompt, exactly as HF apply_chat_template(add_generation_prompt=True) renders it)."""
    chosen = conversations[:max(0, limit)]
    items = [c.question() for c in chosen]
    texts = [render(prompt, add_generation_prompt=True)[0] for prompt, _ in items]
    encoded = sp.encode(texts) if texts else []
    return [Question(list(ids), reference, c.source,
                     next((m["content"] for m in reversed(prompt) if m["role"] == "user"), ""), c.task)
            for ids, (prompt, reference), c in zip(encoded, items, chosen)]


@dataclass
class SFTData:
    """Everything the finetune stage reads, built identically on every rank."""
    train: SFTSequences
    held_out: SFTSequences | None
    questions: list[Question] = field(default_factory=list)
    description: str = ""


def build(data_cfg: FinetuneDataConfig, default_dir: Path, sp, seq_len: int, pack: bool,
          exact_match: int, isolate: bool = True) -> SFTData:
    splits = load_splits(data_cfg, default_dir)
    train = SFTSequences(splits.train, sp, seq_len, pack, "train", isolate=isolate)
    held = SFTSequences(splits.held_out, sp, seq_len, pack, "held-out", isolate=isolate) if splits.held_out else None
    return SFTData(train, held, exact_match_questions(splits.held_out, sp, exact_match), splits.description)

