"""Document masking's effect on a pretrained model: each RUN_DIR's last pretrain checkpoint scored on its whole
validation split twice, with plain causal attention across the documents of a window and with the
document mask (each document attended as if alone, as a model sees one document at inference).

    python bench/document_mask.py RUN_DIR [RUN_DIR ...] [--no-record]

Run it on two runs that differ only in train.document_mask (e.g. the default run with it on and off):
each model scored both ways, in fp32 on the CPU, on windows of the run's train.seq_len, 8 per batch,
the mean of the batch losses. Prints a table and appends one row per run to bench/RESULTS.md.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT  # `python bench/document_mask.py` runs from bench/: import the checkout's pipeline/

import argparse  # noqa: E402
import shlex  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bench.common import print_table, record  # noqa: E402
from pipeline.checkpoint.reader import consolidated_weights  # noqa: E402
from pipeline.checkpoint.store import find_resumable  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.data.stream import eval_batches, open_split  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402
from pipeline.train import attention_mask  # noqa: E402
from pipeline.train.model import Transformer  # noqa: E402


def val_losses(run_dir: Path) -> dict:
    layout = RunLayout.of(run_dir)
    found = find_resumable(layout.checkpoints("pretrain"))
    if found is None:
        raise SystemExit(f"error: {run_dir} has no complete pretrain checkpoint: run its pretrain stage first")
    folder, saved = found
    model = Transformer(ModelConfig(**saved["trainer_state"]["model"]))
    model.load_state_dict(consolidated_weights(folder))
    model.eval()
    train = OmegaConf.load(layout.config).train  # the resolved config of the run
    seq_len = int(train.seq_len)
    val = open_split(layout.shards, "val", layout.tokenizer, verify="off")
    scores = {}
    for masked in (False, True):
        losses = []
        for inputs, labels, *segments in eval_batches(val, seq_len, 8, None, document_mask=masked):
            mask = attention_mask.build(segments[0], attention_mask.DENSE) if masked else None
            with torch.no_grad():
                losses.append(model(inputs, labels, mask=mask)[1].item())
        scores["masked" if masked else "causal"] = sum(losses) / len(losses)
    return {"run": str(run_dir), "trained with document_mask": str(bool(train.get("document_mask", False))).lower(),
            "checkpoint": folder.name, "seq_len": str(seq_len), "val windows": str(8 * len(losses)),
            "val loss, causal": f"{scores['causal']:.4f}", "val loss, document mask": f"{scores['masked']:.4f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [val_losses(run_dir) for run_dir in args.run_dirs]
    print_table(rows)
    if not args.no_record:
        record(shlex.join(["python", *sys.argv]), rows)


if __name__ == "__main__":
    main()
