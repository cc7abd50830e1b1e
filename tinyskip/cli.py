"""Hydra glue for the entry points (the only place that imports Hydra).

Each entry point's primary config (``conf/<entry>.yaml``) starts its defaults list with
a typed schema registered here, so a misspelt key is rejected at compose time. The
composed config is resolved once into plain dataclasses (``to_job``) and the library
only ever sees those.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .config import UserError

# Built from __file__ (not a relative config_path) so that imports from tests and console
# scripts find it. conf/ lives beside the package: editable installs only.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def schemas() -> dict[str, type]:
    from . import jobs

    return jobs.SCHEMAS


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for name, schema in schemas().items():
        cs.store(name=f"{name}_schema", node=schema)


def conf_dir() -> str:
    if not (CONF_DIR / "train.yaml").is_file():
        raise UserError(f"config folder {CONF_DIR} not found: tinyskip reads its configs from "
                        "the source tree, so install it editable (pip install -e .)")
    return str(CONF_DIR)


def to_job(cfg: DictConfig):
    """Resolve a composed config into its dataclass (runs every __post_init__ check)."""
    return OmegaConf.to_object(cfg)


def compose_job(entry: str, overrides: list[str] | None = None):
    """Compose ``conf/<entry>.yaml`` with overrides and return the job dataclass (tests, notebooks)."""
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir(), job_name=entry):
        return to_job(compose(config_name=entry, overrides=overrides or []))


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
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)

        return functools.wraps(fn)(main)

    return wrap
