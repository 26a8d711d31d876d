"""Entry point: `python -m pipeline [HYDRA OVERRIDES...]` (also the `pipeline` console script).

The only module that sees a DictConfig: it converts the composed config to the typed
`PipelineConfig` and hands it to the stage runner. Errors become one `error:` line on stderr and
a non-zero exit; `debug=true` shows the traceback instead.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import PipelineConfig, register_configs
from .errors import PipelineError
from .local_launch import RanksFailed

EXIT_ERROR = 2


def config_dir() -> str:
    """The checkout's top-level conf/ (source and editable installs), else the copy in the wheel."""
    source_tree = Path(__file__).resolve().parent.parent / "conf"
    if (source_tree / "config.yaml").is_file():
        return str(source_tree)
    return str(Path(__file__).resolve().parent / "conf")


register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _run(cfg: DictConfig) -> None:
    from .runner import run_pipeline

    from hydra.core.hydra_config import HydraConfig

    with errors_reported(debug=bool(cfg.get("debug", False))):  # inside, or Hydra adds its own line
        config: PipelineConfig = OmegaConf.to_object(cfg)
        run_pipeline(config, OmegaConf.to_container(cfg, resolve=True), list(HydraConfig.get().overrides.task))


def _one_line(exc: BaseException) -> str:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parts = [str(exc)]
    if isinstance(exc.__cause__, OmegaConfBaseException):  # e.g. why an override did not merge
        parts.append(str(exc.__cause__))
    text = " ".join(" ".join(parts).split("Config search path:")[0].split()) or type(exc).__name__
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
    except RanksFailed as exc:  # the ranks already printed their error
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        # one write per line: ranks share the terminal. Every rank meets the same bad input;
        # rank 0 alone reports it as the error line.
        prefix = "error" if rank == 0 or not isinstance(exc, PipelineError) else f"rank {rank}"
        sys.stderr.write(f"{prefix}: {_one_line(exc)}\n")
        sys.stderr.flush()
        sys.exit(EXIT_ERROR)


def main() -> None:
    # Hydra would print its own partial traceback; let errors reach us and report them in one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # Nothing is downloaded at run time unless the user asks for it by setting these to 0.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.captureWarnings(True)
    debug = any(arg.lstrip("+").lower() in ("debug=true", "debug=1") for arg in sys.argv[1:])
    with errors_reported(debug):  # composition errors: bad overrides, unknown groups or keys
        _run()


if __name__ == "__main__":
    main()
