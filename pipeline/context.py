"""What every stage is handed: the typed config, the run folder's layout, the launch and the corpus."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from .config import PipelineConfig
from .corpus import Corpus, files_fingerprint, resolve_paths
from .distributed import LaunchInfo
from .layout import RunLayout


@dataclass
class Context:
    cfg: PipelineConfig
    run_dir: Path
    launch: LaunchInfo
    resolved: dict = field(default_factory=dict)  # the composed config as plain data

    @cached_property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def tokenizer_path(self) -> Path:
        return self.layout.tokenizer

    def with_cfg(self, cfg: PipelineConfig) -> "Context":
        return Context(cfg=cfg, run_dir=self.run_dir, launch=self.launch, resolved=self.resolved)

    # -- the corpus ----------------------------------------------------------------------------------
    @cached_property
    def corpus_paths(self) -> list[Path]:
        if self.cfg.data.source == "default":
            return [self.layout.default_data / "corpus.jsonl"]
        return resolve_paths(self.cfg.data.paths)

    def corpus_identity(self) -> object:
        """What the corpus's content depends on, without reading it."""
        if self.cfg.data.source == "default":
            from .default_corpus import GENERATOR_VERSION

            return {"generator": GENERATOR_VERSION, "seed": self.cfg.data.seed,
                    "documents": self.cfg.data.default_num_documents}
        return files_fingerprint(self.corpus_paths)

    def write_default_data(self) -> Path:
        """The built-in corpus and instruction set (generated from data.seed, reused when present)."""
        from .default_corpus import write_default_corpus

        write_default_corpus(self.layout.default_data, seed=self.cfg.data.seed,
                             num_documents=self.cfg.data.default_num_documents)
        return self.layout.default_data

    def open_corpus(self) -> Corpus:
        if self.cfg.data.source == "default":
            self.write_default_data()
            return Corpus(self.corpus_paths, replace(self.cfg.data, text_field="text", split_on_blank_lines=False))
        return Corpus(self.corpus_paths, self.cfg.data)
