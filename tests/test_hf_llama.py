"""The Llama shim against transformers' own LlamaForCausalLM (tiny, random, built here)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tinyskip.cache import KVCache
from tinyskip.checkpoint import load_model, save_checkpoint
from tinyskip.decode import generate
from tinyskip.hf_llama import (HFConfigError, config_from_hf, config_to_hf, export_hf,
                               load_hf_llama)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def hf_model(tie=False, kv_heads=2, rope_scaling=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=5000.0, rope_scaling=rope_scaling,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # random norms too, so a swapped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie,kv,rope,shard", [
    (False, 2, None, None), (True, 4, None, None), (False, 1, LLAMA3_ROPE, "40KB"),
])
def test_shim_logits_equal_transformers(tmp_path, tie, kv, rope, shard):
    ref = hf_model(tie, kv, rope)
    kwargs = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(tmp_path, **kwargs)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = load_hf_llama(str(tmp_path))
    ids = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        expected = ref(ids).logits
    torch.testing.assert_close(model(ids)[0], expected, atol=1e-5, rtol=1e-5)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie


def test_greedy_generation_equals_transformers_generate(tmp_path):
    ref = hf_model(rope_scaling=LLAMA3_ROPE)
    ref.save_pretrained(tmp_path)
    model, _ = load_hf_llama(str(tmp_path))
    prompt = torch.randint(3, 120, (1, 7))
    with torch.no_grad():
        out = ref.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert generate(model, prompt, 20).tokens[0] == out[0, 7:].tolist()


def test_cached_decoding_and_exits_work_on_an_imported_model(tmp_path):
    hf_model().save_pretrained(tmp_path)
    model, _ = load_hf_llama(str(tmp_path))
    ids = torch.randint(0, 120, (1, 12))
    cache = KVCache(model.config)
    steps = [model.head(model.run_layers(model.embed(ids[:, t:t + 1]), 0, 2, cache,
                                         t)) for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids, exit_layers=[1])[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_export_round_trip_is_lossless_and_transformers_loads_it(tmp_path, tie):
    ref = hf_model(tie=tie, rope_scaling=LLAMA3_ROPE)
    ref.save_pretrained(tmp_path / "hf")
    model, _ = load_hf_llama(str(tmp_path / "hf"))
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    again, _ = load_hf_llama(str(tmp_path / "out"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    ids = torch.randint(0, 120, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids)[0], atol=1e-5, rtol=1e-5)


def test_tinyskip_checkpoint_exports_with_identical_logits(tmp_path, trained_tiny):
    model, _, run_dir = trained_tiny
    from tinyskip.export import export_run
    out = export_run(run_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-5, rtol=1e-5)
    # and back: tinyskip -> HF -> tinyskip is lossless
    again, _ = load_hf_llama(str(out))
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only Llama"),
    ({"head_dim": 32}, "head_dim=32 differs"),
])
def test_unsupported_configs_are_refused(change, match):
    hf = config_to_hf(config_from_hf(hf_model().config.to_dict()))
    hf.update(change)
    hf.pop("rope_parameters", None)
    with pytest.raises(HFConfigError, match=match):
        config_from_hf(hf)


def test_transformers5_rope_parameters_are_read():
    cfg = config_from_hf(hf_model(rope_scaling=LLAMA3_ROPE).config.to_dict())
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling.factor == 8.0
    legacy = {**config_to_hf(cfg)}
    assert config_from_hf(legacy) == cfg


def test_missing_folder_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(HFConfigError, match="no such folder"):
        load_hf_llama(str(tmp_path / "absent"))
    (tmp_path / "config.json").write_text(json.dumps(hf_model().config.to_dict()))
    with pytest.raises(HFConfigError, match="holds no model.safetensors"):
        load_hf_llama(str(tmp_path))


def test_hub_ids_go_through_snapshot_download(tmp_path, monkeypatch):
    # The download itself needs the network; everything up to it runs for real, and the
    # folder it returns is loaded through the same path as a local one.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hf_model().save_pretrained(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, folder = load_hf_llama("meta-llama/Llama-3.2-1B")
    assert folder == tmp_path and calls[0][0] == "meta-llama/Llama-3.2-1B"
    assert "*.safetensors" in calls[0][1] and not any(p.endswith(".bin") for p in calls[0][1])
    assert model.num_layers == 3


def test_pickled_bin_weights_load_only_as_tensors(tmp_path):
    ref = hf_model()
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = load_hf_llama(str(tmp_path))
    ids = torch.randint(0, 120, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], ref(ids).logits, atol=1e-5, rtol=1e-5)
    # A pickle carrying anything but tensors is refused by weights_only=True.
    torch.save({"model.norm.weight": torch.ones(64), "evil": print}, tmp_path / "pytorch_model.bin")
    with pytest.raises(HFConfigError, match="pytorch_model.bin was refused: it holds more than"):
        load_hf_llama(str(tmp_path))
