from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tinyskip.cli import CONF_DIR, compose_job
from tinyskip.config import ConfigError, ModelConfig

PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def groups_of(entry: str) -> list[str]:
    """The config groups a primary config's defaults list names."""
    defaults = OmegaConf.load(CONF_DIR / f"{entry}.yaml").defaults
    return [next(iter(d)) for d in defaults if not isinstance(d, str)]


# Every primary config with every option of every group it uses.
COMBINATIONS = [(entry, group, option.stem) for entry in PRIMARY for group in groups_of(entry)
                for option in sorted((CONF_DIR / group).glob("*.yaml"))]


# Values an entry point needs before it composes (there is no sensible default).
REQUIRED = {"evaluate": ["run=some-run"], "bench": ["run=some-run"],
            "export": ["run=some-run", "out=somewhere"],
            "infer": ["run=some-run", "prompt=hello"]}


def compose(entry, overrides=()):
    return compose_job(entry, REQUIRED.get(entry, []) + list(overrides))


def test_primary_configs_exist():
    assert {"train", "evaluate"} <= set(PRIMARY)


@pytest.mark.parametrize("entry", PRIMARY)
def test_primary_config_composes(entry):
    assert compose(entry) is not None


@pytest.mark.parametrize("entry,group,option", COMBINATIONS)
def test_every_group_option_composes_with_every_primary(entry, group, option):
    extra = ["model.path=some/folder", "run=null"] if option == "hf_llama" else []
    compose(entry, [f"{group}={option}"] + extra)


def test_combinations_cover_every_group():
    assert {g for _, g, _ in COMBINATIONS} == {"model", "data", "train", "experiment"}


def test_model_presets_load_as_typed_dataclasses():
    job = compose_job("train", ["model=l12_d256"])
    assert isinstance(job.model, ModelConfig)
    assert (job.model.num_hidden_layers, job.model.hidden_size) == (12, 256)


def test_misspelt_key_is_rejected():
    with pytest.raises(ConfigCompositionException):
        compose_job("train", ["model.hiden_size=64"])


@pytest.mark.parametrize("override,field", [
    ("model.num_attention_heads=3", "num_attention_heads"),
    ("model.num_key_value_heads=3", "num_key_value_heads"),
    ("model.hidden_size=0", "hidden_size"),
    ("model.num_hidden_layers=-1", "num_hidden_layers"),
])
def test_invalid_model_shapes_fail_at_config_time(override, field):
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}="):
        compose_job("train", [override])
