"""The run folder: where every artifact of a run lives, named in one place.

Every rank and node resolves the same `run_dir`; stages, the runner, the report and the tests ask a
`RunLayout` for paths instead of spelling them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRAINING_STAGES = ("pretrain", "finetune")  # the stages that write checkpoints (and the export sources)
MANIFEST = "manifest.json"  # the shards' manifest, in shards/


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunLayout":
        return cls(Path(run_dir).expanduser().resolve())

    # -- data ------------------------------------------------------------------------------------
    @property
    def default_data(self) -> Path:
        """The built-in corpus and instruction set (data=default), generated here."""
        return self.run_dir / "data" / "default"

    @property
    def tokenizer(self) -> Path:
        return self.run_dir / "tokenizer" / "tokenizer.model"

    @property
    def shards(self) -> Path:
        return self.run_dir / "shards"

    @property
    def manifest(self) -> Path:
        return self.shards / MANIFEST

    @property
    def shard_parts(self) -> Path:
        """Parts written by separate shard jobs (shard.worker_index), before the merge."""
        return self.run_dir / "shards.parts"

    # -- training ----------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def checkpoints(self, stage: str) -> Path:
        return self.run_dir / stage / "checkpoints"

    def exact_match_answers(self, when: str) -> Path:
        """Every answer of the fine-tuned model's exact-match evaluation (`before` or `after`)."""
        return self.run_dir / "finetune" / f"exact_match_{when}.jsonl"

    # -- outputs and records ---------------------------------------------------------------------
    def export(self, source: str) -> Path:
        return self.run_dir / "export" / source

    def eval_results(self, source: str) -> Path:
        """lm-evaluation-harness results of one export (`results.json`)."""
        return self.run_dir / "eval" / source

    @property
    def eval_tasks(self) -> Path:
        """The built-in eval tasks (lm-eval YAML and local data), written by the eval stage."""
        return self.run_dir / "eval" / "tasks"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def config(self) -> Path:
        """The resolved config of the last run (secrets redacted)."""
        return self.run_dir / "config.yaml"

    @property
    def records(self) -> Path:
        """One completion record per stage: `<stage>.json`."""
        return self.run_dir / "stages"

    def stage_record(self, name: str) -> Path:
        return self.records / f"{name}.json"

    @property
    def report(self) -> Path:
        return self.run_dir / "report"

    @property
    def logs(self) -> Path:
        """What the console leaves out (pipeline/observe/console.py): one log file per process."""
        return self.run_dir / "logs"

    def log_file(self, rank: int | None = None) -> Path:
        """The log of the process the user started (`rank` None), or of one rank of a launcher."""
        return self.logs / ("pipeline.log" if rank is None else f"rank{rank}.log")

    # -- the run lock (pipeline/cluster/runlock.py) ------------------------------------------------------------
    @property
    def locks(self) -> Path:
        return self.run_dir / "locks"

    @property
    def run_lock(self) -> Path:
        """Held by the job that runs on this run_dir (one at a time)."""
        return self.locks / "run.lock"

    def part_lock(self, index: int) -> Path:
        """Held by the job that writes shard part `index` (job arrays write parts at once)."""
        return self.locks / f"shard-part{index:03d}.lock"
