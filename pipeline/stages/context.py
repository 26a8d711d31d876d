"""What every stage is handed: the typed config, the run folder's layout, the launch and the corpus."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from ..cluster.distributed import LaunchInfo
from ..config import PipelineConfig, SourceConfig
from ..data.corpus import Corpus, files_fingerprint, resolve_paths
from ..layout import RunLayout


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
            from ..data.default_corpus import GENERATOR_VERSION

            built_in = {"generator": GENERATOR_VERSION, "seed": self.cfg.data.seed,
                        "documents": self.cfg.data.default_num_documents}
        else:
            built_in = None
        if not self.cfg.data.sources:
            return built_in or files_fingerprint(self.corpus_paths)
        from ..data.shard_sources import shards_identity

        out = {}
        for name, source in self.sources.items():
            if source.shards:
                out[name] = shards_identity(name, source)
            elif built_in and not self.cfg.data.sources[name].paths:  # a built-in source
                out[name] = built_in
            else:
                out[name] = files_fingerprint(resolve_paths(source.paths))
        return out

    # -- the sources of the mixture ------------------------------------------------------------------
    @cached_property
    def sources(self) -> dict[str, SourceConfig]:
        """The mixture's sources by name (data.sources, or data.paths as the one source `corpus`)."""
        from ..data.mixture import mixture_sources

        return mixture_sources(self.cfg.data, self.layout.default_data)

    def source_corpus(self, name: str) -> Corpus:
        """The documents of one text source (the built-in corpus is generated first when it is one)."""
        source = self.sources[name]
        if self.cfg.data.source == "default":
            self.write_default_data()
        return Corpus(resolve_paths(source.paths), replace(self.cfg.data, text_field=source.text_field,
                                                           split_on_blank_lines=source.split_on_blank_lines))

    def write_default_data(self) -> Path:
        """The built-in corpus and instruction set (generated from data.seed, reused when present)."""
        from ..data.default_corpus import write_default_corpus

        write_default_corpus(self.layout.default_data, seed=self.cfg.data.seed,
                             num_documents=self.cfg.data.default_num_documents)
        return self.layout.default_data

    def open_corpus(self) -> Corpus:
        if self.cfg.data.source == "default":
            self.write_default_data()
            return Corpus(self.corpus_paths, replace(self.cfg.data, text_field="text", split_on_blank_lines=False))
        return Corpus(self.corpus_paths, self.cfg.data)
