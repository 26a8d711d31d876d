"""Entry point: `python -m pipeline [HYDRA OVERRIDES...]` (also the `pipeline` console script).

The only module that sees a DictConfig: it converts the composed config to the typed
`PipelineConfig` and hands it to the stage runner. Errors become one `error:` line on stderr and
a non-zero exit; `debug=true` shows the traceback instead.
"""
from __future__ import annotations

import gc
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .cluster.control import Preempted, install_preemption_handlers, peer_failure, report_preempted
from .cluster.local_launch import RanksFailed
from .config import (
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    OptimizerConfig,
    PipelineConfig,
    PrecisionConfig,
    SourceConfig,
)
from .errors import PipelineError
from .redaction import redact_text

EXIT_ERROR = 2


def config_dir() -> str:
    """The checkout's top-level conf/ (source and editable installs), else the copy in the wheel."""
    source_tree = Path(__file__).resolve().parent.parent / "conf"
    if (source_tree / "config.yaml").is_file():
        return str(source_tree)
    return str(Path(__file__).resolve().parent / "conf")


def register_configs() -> None:
    """The dataclasses of pipeline/config.py as Hydra's schema: the structured base of conf/config.yaml
    and the type of every file of the model, deepspeed, optimizer and precision groups."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=PipelineConfig)
    from .data.default_corpus import SOURCES

    # the built-in corpus is a mixture: data.sources.records.weight=0.5 reweights it from the command line.
    # It is small and meant to be learnt by heart (fine-tuning asks its facts): repeating it is the point
    cs.store(group="data", name="default", node=DataConfig(
        source="default", sources={name: SourceConfig(weight=w) for name, w in SOURCES.items()}, max_repetitions=12))
    cs.store(group="data", name="files", node=DataConfig(source="files"))
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="deepspeed", node=DeepSpeedConfig)
    cs.store(group="schema", name="precision", node=PrecisionConfig)
    cs.store(group="schema", name="optimizer", node=OptimizerConfig)


register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .runner import run_pipeline

    with errors_reported(debug=bool(cfg.get("debug", False))):  # inside, or Hydra adds its own line
        unknown = _unknown_keys(cfg)
        if unknown:  # `+key=value` slips past the schema, and to_object would drop it without a word
            raise PipelineError(f"unknown config key(s) {unknown}: check the spelling "
                                f"(`python -m pipeline --cfg job` lists every key)")
        _type_sources(cfg)
        config: PipelineConfig = OmegaConf.to_object(cfg)
        install_preemption_handlers(config.launch.preempt_signals)  # before any work that a signal could cut
        start_console(config)
        # unresolved: local ranks resolve ${oc.env:...} themselves, so no secret lands in their argv
        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        run_pipeline(config, OmegaConf.to_container(cfg, resolve=True), overrides)


def _type_sources(cfg: DictConfig) -> None:
    """Each data.sources.<name> checked and typed as a SourceConfig (unknown keys, wrong types: an error)."""
    sources = cfg.data.sources
    for name in list(sources.keys()):
        node = sources[name]
        if not isinstance(node, DictConfig):
            raise PipelineError(f"data.sources.{name}={node!r}: give a source's settings, e.g. "
                                f"+data.sources.{name}.paths=[FILE] (README \"Data mixtures\")")
        try:
            sources[name] = OmegaConf.merge(OmegaConf.structured(SourceConfig), node)
        except Exception as exc:  # OmegaConf's own message names the key and the type
            raise PipelineError(f"data.sources.{name}: {' '.join(str(exc).split())}") from None


def start_console(config: PipelineConfig) -> None:
    """The console keeps the pipeline's own lines; the rest goes to a log file under run_dir
    (pipeline/observe/console.py). A bad config is refused first, before run_dir exists."""
    from .cluster.distributed import LaunchInfo
    from .observe import console
    from .runner import prepare_run_dir
    from .validate import validate

    validate(config)
    launch = LaunchInfo.from_env()
    console.setup(prepare_run_dir(config), launch.rank if launch.under_launcher else None, config.debug)


def _unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys of `node` that its dataclass schema lacks (free-form dict fields such as deepspeed.extra
    are not checked)."""
    import dataclasses

    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = []
    for key in node.keys():
        child = node._get_node(key)
        if key not in fields:
            unknown.append(f"{prefix}{key}")
        elif isinstance(child, DictConfig):
            unknown += _unknown_keys(child, f"{prefix}{key}.")
    return unknown


def _one_line(exc: BaseException) -> str:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parts = [str(exc)]
    if isinstance(exc.__cause__, OmegaConfBaseException):  # e.g. why an override did not merge
        parts.append(str(exc.__cause__))
    text = " ".join(" ".join(parts).split("Config search path:")[0].split()) or type(exc).__name__
    if "To append to your config use +" in text:  # the schema is closed: appending the key fails too
        text = re.sub(r"To append to your config use \+\S+ ", "", text) + \
            " (check the spelling; `python -m pipeline --cfg job` lists every key)"
    if isinstance(exc, (PipelineError, HydraException, OmegaConfBaseException)):
        return text  # already says what is wrong in the user's terms
    return f"{type(exc).__name__}: {text} (debug=true shows the traceback)"


@contextmanager
def errors_reported(debug: bool):
    try:
        yield
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Preempted as exc:  # a complete checkpoint is written; rerunning resumes: not a failure
        report_preempted(exc)
        _exit(0)
    except RanksFailed as exc:  # the ranks already printed their error, unless they could not
        if exc.message:
            sys.stderr.write(f"error: {exc.message}\n")
            sys.stderr.flush()
            _log_only(f"error: {exc.message}")
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        # one write per line: ranks share the terminal. Every rank meets the same bad input;
        # rank 0 alone reports it as the error line. A lost peer is each survivor's own news.
        peer = peer_failure(exc)
        prefix = "error" if peer or rank == 0 or not isinstance(exc, PipelineError) else f"rank {rank}"
        line = f"{prefix}: {redact_text(peer or _one_line(exc))}"  # e.g. a bad value of ${oc.env:X}
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        _log_only(line)
        _exit(EXIT_ERROR)


def _log_only(line: str) -> None:
    """The console's error line in this process's log file too (once pipeline/observe/console.py has opened it)."""
    console = sys.modules.get("pipeline.observe.console")
    if console is not None:
        console.to_log_only(line)


def _exit(code: int) -> None:
    """sys.exit, except in a rank whose process group is still up (it stopped early): leave at once. At
    interpreter teardown a gloo thread may std::terminate while a peer closes its connections, and the
    rank would then die by SIGABRT after its error line, which the launcher reports as a second error."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def main() -> None:
    # Hydra would print its own partial traceback; let errors reach us and report them in one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # Nothing is downloaded at run time unless the user asks for it by setting these to 0.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.captureWarnings(True)
    debug = any(arg.lstrip("+").lower() in ("debug=true", "debug=1") for arg in sys.argv[1:])
    try:
        with errors_reported(debug):  # composition errors: bad overrides, unknown groups or keys
            _run()
    finally:
        # The interpreter's last garbage collections walk the ~400k objects torch and DeepSpeed leave, ~1.3
        # CPU s per process; nothing here needs them (files, threads and process groups are closed before,
        # atexit handlers still run), so the exit skips them.
        gc.freeze()


if __name__ == "__main__":
    main()
