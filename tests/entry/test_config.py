import dataclasses

import pytest
from omegaconf import OmegaConf

from tinyskip.cli import CONF_DIR, SCHEMAS, compose_job
from tinyskip.config import ConfigError, ModelConfig, UserError

PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def groups_of(entry: str) -> list[str]:
    """The config groups a primary config's defaults list names."""
    defaults = OmegaConf.load(CONF_DIR / f"{entry}.yaml").defaults
    return [next(iter(d)) for d in defaults if not isinstance(d, str)]


# Every primary config with every option of every group it uses.
# (A group placed under another package, ``train@plain``, takes the options of ``train``.)
COMBINATIONS = [(entry, group, option.stem) for entry in PRIMARY for group in groups_of(entry)
                for option in sorted((CONF_DIR / group.split("@")[0]).glob("*.yaml"))]


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
    if (entry, option) == ("train_bench", "hf_llama"):
        with pytest.raises(ConfigError, match="model.path='some/folder': the training benchmark"):
            compose(entry, ["model=hf_llama", "model.path=some/folder"])
        return
    has_run = "run" in {f.name for f in dataclasses.fields(SCHEMAS[entry])}
    extra = ["model.path=some/folder"] + ["run=null"] * has_run if option == "hf_llama" else []
    # (the GPU check's SSD row drafts at exit 8 by default: deeper than some presets)
    extra += ["draft_layer=1"] if entry == "gpu_check" else []
    extra += {"static": ["exit_layer=1"], "ssd": ["draft_layer=1"]}.get(option, []) \
        if group == "mode" else []
    compose(entry, [f"{group}={option}"] + extra)


def test_combinations_cover_every_group():
    assert {g for _, g, _ in COMBINATIONS} == {"model", "data", "train", "experiment", "mode",
                                               "train@plain", "train@layerskip"}


def test_model_presets_load_as_typed_dataclasses():
    job = compose_job("train", ["model=l12_d256"])
    assert isinstance(job.model, ModelConfig)
    assert (job.model.num_hidden_layers, job.model.hidden_size) == (12, 256)


def test_the_continual_preset_is_layerskip_with_its_continual_settings():
    base, cont = (compose_job("train", [f"train={t}"]).train
                  for t in ("layerskip", "layerskip_continual"))
    assert (cont.lr, cont.layerdrop_p_max, cont.layerdrop_time, cont.e_scale,
            cont.curriculum_rotation) == (1e-4, 0.1, "constant", 0.2, 4)
    # Everything else is the LayerSkip recipe's.
    assert (cont.preset, cont.exit_weighting, cont.curriculum, cont.exit_token_fraction) == \
        (base.preset, base.exit_weighting, base.curriculum, base.exit_token_fraction)


@pytest.mark.parametrize("entry,override,message", [
    ("train", "model.hiden_size=64", "model.hiden_size: no such key (did you mean model.hidden_size?)"),
    ("train", "trian.lr=1", "trian.lr: no such key (did you mean train.lr?)"),
    ("train", "seed=3", "seed: no such key (did you mean train.seed?)"),
    ("infer", "mdoe=ssd", "mdoe: no such key (did you mean mode?)"),
    ("train", "model=l99", "model=l99: no such option (available: hf_llama, l12_d256, "
                           "l12_d512, l4_d64, l6_d128, l6_d192, llama3_8b)"),
    ("train", "train.max_steps=abc", "train.max_steps='abc': Value 'abc' of type 'str' could "
                                     "not be converted to Integer"),
])
def test_bad_overrides_are_one_line_naming_the_key(entry, override, message):
    with pytest.raises(UserError) as e:
        compose(entry, [override])
    assert str(e.value) == message


def test_a_missing_mandatory_value_is_one_line():
    with pytest.raises(UserError, match=r"^out: a value is required \(give out=\.\.\.\)$"):
        compose_job("export", ["run=r"])


def test_eos_token_id_takes_one_id_or_a_list():
    assert ModelConfig(eos_token_id=[128001, 128009]).stop_ids == [128001, 128009]
    assert ModelConfig(eos_token_id=2).stop_ids == [2] and ModelConfig().stop_ids == []
    with pytest.raises(ConfigError, match="eos_token_id=\\[\\]: must be a token id or a non-empty list"):
        ModelConfig(eos_token_id=[])
    job = compose_job("infer", ["run=r", "prompt=hi", "model=hf_llama", "model.path=x", "run=null",
                                "model.eos_token_id=[3,4]"])
    assert job.model.stop_ids == [3, 4]


@pytest.mark.parametrize("override,field", [
    ("model.num_attention_heads=3", "num_attention_heads"),
    ("model.num_key_value_heads=3", "num_key_value_heads"),
    ("model.hidden_size=0", "hidden_size"),
    ("model.num_hidden_layers=-1", "num_hidden_layers"),
])
def test_invalid_model_shapes_fail_at_config_time(override, field):
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}="):
        compose_job("train", [override])
