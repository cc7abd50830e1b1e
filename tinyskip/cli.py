"""Hydra glue for the entry points (the only place that imports Hydra).

Each entry point's primary config (``conf/<entry>.yaml``) starts its defaults list with
a typed schema registered here, so a misspelt key is rejected at compose time. The
composed config is resolved once into plain dataclasses (``to_job``) and the library
only ever sees those.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import shutil
import sys
import typing
from pathlib import Path
from typing import Callable, NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue,
                              OmegaConfBaseException, ValidationError)

from .bench_jobs import BenchJob, GpuCheckJob, TrainBenchJob
from .config import DEFAULT_RUN, UserError
from .jobs import CalibrateJob, EvaluateJob, ExportJob, HarnessJob, InferJob, TrainJob
from .training.distributed import hold_until_rank_zero_spoke

# Each entry point's primary config (conf/<entry>.yaml) is typed by its job schema.
SCHEMAS: dict[str, type] = {"train": TrainJob, "evaluate": EvaluateJob, "infer": InferJob,
                            "harness": HarnessJob, "bench": BenchJob, "export": ExportJob,
                            "calibrate": CalibrateJob, "train_bench": TrainBenchJob,
                            "gpu_check": GpuCheckJob}

# Built from __file__ (not a relative config_path) so that imports from tests and console
# scripts find it. conf/ lives beside the package: editable installs only.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def source_name(run, checkpoint, model_name) -> str:
    """The name results of a run are filed under: the run, the checkpoint's folder, or the
    imported model's config name (``${source_name:...}`` in conf/bench.yaml)."""
    if run:
        return str(run)
    if checkpoint:
        path = Path(str(checkpoint))
        return (path.parent if path.name == "checkpoint" else path).name
    return str(model_name) if model_name else DEFAULT_RUN


def logs_dir() -> str:
    """Where run folders go (``${logs_dir:}`` in conf/): the project's ``logs/`` wherever
    the command is started, or ``$TINYSKIP_LOGS`` (the tests point it at a temporary folder)."""
    return os.environ.get("TINYSKIP_LOGS") or str(CONF_DIR.parent / "logs")


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)
    OmegaConf.register_new_resolver("source_name", source_name, replace=True)
    OmegaConf.register_new_resolver("logs_dir", logs_dir, replace=True)


def conf_dir() -> str:
    if not (CONF_DIR / "train.yaml").is_file():
        raise UserError(f"config folder {CONF_DIR} not found: tinyskip reads its configs from "
                        "the source tree, so install it editable (pip install -e .)")
    return str(CONF_DIR)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _keys(schema: type, prefix: str = "", depth: int = 2) -> list[str]:
    """Dotted keys of a dataclass schema, nested dataclasses included (``train.seed``)."""
    if depth == 0 or not dataclasses.is_dataclass(schema):
        return []
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        keys.append(prefix + name)
        for inner in (hint, *typing.get_args(hint)):     # Optional[ModelConfig] too
            keys += _keys(inner, f"{prefix}{name}.", depth - 1)
    return keys


def _unknown_key(override: str, e: ConfigKeyError | ConfigAttributeError) -> str:
    """``model.hiden_size`` -> the key and the nearest valid one (``model.hidden_size``);
    a key given at the wrong level (``seed=`` for ``train.seed``) is found too."""
    full, key = str(e.full_key), str(e.key)
    prefix, rest = full[: len(full) - len(key)], override[len(full):]
    valid = _keys(e.object_type)
    by_leaf = {}
    for k in sorted(valid, key=lambda k: k.count(".")):   # the shallowest key wins
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    near = difflib.get_close_matches(key, [k for k in valid if "." not in k], n=1) or \
        [by_leaf[m] for m in difflib.get_close_matches(key, list(by_leaf), n=1)]
    hint = (f"did you mean {prefix}{near[0]}{rest}?" if near else
            f"valid keys: {', '.join(prefix + k for k in valid if '.' not in k)}" if valid else "")
    return f"{override}: no such key" + (f" ({hint})" if hint else "")


def config_error(e: Exception) -> UserError:
    """A Hydra or OmegaConf error about the given config, as one line naming the value."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        named = re.search(r"Could not override '([^']+)'", str(e))
        return UserError(_unknown_key(named.group(1) if named else cause.full_key, cause))
    if isinstance(cause, MissingMandatoryValue):
        return UserError(f"{cause.full_key}: a value is required (give {cause.full_key}=...)")
    merging = re.match(r"Error merging override [+~]*(\S+)", str(e))
    if (isinstance(cause, ValidationError) and merging and isinstance(cause.value, dict)
            and merging.group(1).startswith(f"{cause.full_key}.")):
        # ``mode.draft_layer=0``: a dotted override under a key that holds a plain value
        # (the mode files put their options at the top level, so the hint is the same
        # override without the prefix, when that names a key).
        override, key = merging.group(1), str(cause.full_key)
        inner = override[len(key) + 1:]
        valid = "." not in key and inner.split("=", 1)[0] in _keys(cause.object_type, depth=1)
        return UserError(f"{override}: {key} holds a value, not options"
                         + (f" (did you mean {inner}?)" if valid else ""))
    if isinstance(cause, ValidationError) and cause.full_key:
        return UserError(f"{cause.full_key}={cause.value!r}: "
                         f"{_one_line(cause.msg.split('full_key:')[0])}")
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return UserError(f"{group}={option}: no such option (available: "
                         f"{', '.join(e.options)})")
    return UserError(_one_line(str(e).split("Config search path:")[0]))


def to_job(cfg: DictConfig):
    """Resolve a composed config into its dataclass (runs every __post_init__ check)."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise config_error(e) from e


def compose_job(entry: str, overrides: list[str] | None = None):
    """Compose ``conf/<entry>.yaml`` with overrides and return the job dataclass (tests, notebooks)."""
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir(), job_name=entry):
        try:
            cfg = compose(config_name=entry, overrides=overrides or [])
        except (HydraException, OmegaConfBaseException) as e:
            raise config_error(e) from e
        return to_job(cfg)


def remove_run_folder() -> None:
    """Undo what Hydra wrote before a job was refused: its run folder, when it holds
    nothing but Hydra's own files (``.hydra/``, the job's log), and the folders above it
    that this left empty, up to the logs folder."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    own = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if not folder.is_dir() or any(p.name not in own for p in folder.iterdir()):
        return
    try:
        shutil.rmtree(folder)
        top = Path(logs_dir()).resolve()
        folder = folder.parent.resolve()
        while folder != top and top in folder.parents and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    except OSError:
        pass    # another process wrote or removed something meanwhile: leave the rest


def fail(e: UserError) -> NoReturn:
    # Under torchrun every rank meets the same bad input: rank 0 alone says so, unless it
    # never does (an error of this rank's own), and then this rank does.
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)
    if not hold_until_rank_zero_spoke(rank):
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def entry_point(entry: str) -> Callable:
    """Decorate ``fn(job)`` into a Hydra main that reports user errors as one line."""

    def wrap(fn: Callable) -> Callable:
        import hydra

        register_schemas()

        @hydra.main(version_base="1.3", config_path=conf_dir(), config_name=entry)
        def main(cfg: DictConfig) -> None:
            try:
                fn(to_job(cfg))
            except UserError as e:
                if os.environ.get("RANK", "0") == "0":     # torchrun's ranks share the folder
                    remove_run_folder()
                fail(e)

        @functools.wraps(fn)
        def run() -> None:
            # Hydra prints a bad override (misspelt key, unknown option, wrong type) over
            # several lines and exits 1; asked for the full error it raises it instead,
            # and here it becomes one line naming the value.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                main()
            except (HydraException, OmegaConfBaseException) as e:
                fail(config_error(e))

        return run

    return wrap
