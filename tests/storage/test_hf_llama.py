"""The Llama shim against transformers' own LlamaForCausalLM (tiny, random, built here)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tinyskip.cli import compose_job
from tinyskip.decode import generate
from tinyskip.decode.run import infer
from tinyskip.model.kv_cache import KVCache
from tinyskip.storage.hf_llama import (HFConfigError, HFTokenizer, config_from_hf, config_to_hf,
                                       export_hf, load_hf_llama)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("tie,kv,rope,shard", [
    (False, 2, None, None), (True, 4, None, None), (False, 1, LLAMA3_ROPE, "40KB"),
])
def test_shim_logits_equal_transformers(tmp_path, tie, kv, rope, shard, hf_llama):
    ref = hf_llama(tie, kv, rope)
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


def test_greedy_generation_equals_transformers_generate(tmp_path, hf_llama):
    ref = hf_llama(rope_scaling=LLAMA3_ROPE)
    ref.save_pretrained(tmp_path)
    model, _ = load_hf_llama(str(tmp_path))
    prompt = torch.randint(3, 120, (1, 7))
    with torch.no_grad():
        out = ref.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert generate(model, prompt, 20).tokens[0] == out[0, 7:].tolist()


def test_cached_decoding_and_exits_work_on_an_imported_model(tmp_path, hf_llama):
    hf_llama().save_pretrained(tmp_path)
    model, _ = load_hf_llama(str(tmp_path))
    ids = torch.randint(0, 120, (1, 12))
    cache = KVCache(model.config)
    steps = [model.head(model.run_layers(model.embed(ids[:, t:t + 1]), 0, 2, cache,
                                         t)) for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids, exits=[2])[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_export_round_trip_is_lossless_and_transformers_loads_it(tmp_path, tie, hf_llama):
    ref = hf_llama(tie=tie, rope_scaling=LLAMA3_ROPE)
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
    from tinyskip.storage.hf_llama import export_run
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
def test_unsupported_configs_are_refused(change, match, hf_llama):
    hf = config_to_hf(config_from_hf(hf_llama().config.to_dict()))
    hf.update(change)
    hf.pop("rope_parameters", None)
    with pytest.raises(HFConfigError, match=match):
        config_from_hf(hf)


def test_transformers5_rope_parameters_are_read(hf_llama):
    cfg = config_from_hf(hf_llama(rope_scaling=LLAMA3_ROPE).config.to_dict())
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling.factor == 8.0
    legacy = {**config_to_hf(cfg)}
    assert config_from_hf(legacy) == cfg


def test_missing_folder_and_weights_are_clear_errors(tmp_path, hf_llama):
    with pytest.raises(HFConfigError, match="no such folder"):
        load_hf_llama(str(tmp_path / "absent"))
    (tmp_path / "config.json").write_text(json.dumps(hf_llama().config.to_dict()))
    with pytest.raises(HFConfigError, match="holds no model.safetensors"):
        load_hf_llama(str(tmp_path))


def test_hub_ids_go_through_snapshot_download(tmp_path, monkeypatch, hf_llama):
    # The download itself needs the network; everything up to it runs for real, and the
    # folder it returns is loaded through the same path as a local one.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hf_llama().save_pretrained(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, folder = load_hf_llama("meta-llama/Llama-3.2-1B")
    assert folder == tmp_path and calls[0][0] == "meta-llama/Llama-3.2-1B"
    assert "*.safetensors" in calls[0][1] and not any(p.endswith(".bin") for p in calls[0][1])
    assert model.num_layers == 3


def test_pickled_bin_weights_load_only_as_tensors(tmp_path, hf_llama):
    ref = hf_llama()
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


@pytest.mark.parametrize("tokenizer_class", ["LlamaTokenizer", "PreTrainedTokenizerFast"])
@pytest.mark.parametrize("bos_template", [False, True])
def test_special_tokens_are_added_as_transformers_adds_them(tmp_path, bos_template,
                                                            tokenizer_class, hf_llama_folder):
    hf_llama_folder(tmp_path, bos_template, tokenizer_class)
    ours = HFTokenizer(tmp_path, config_from_hf(json.loads((tmp_path / "config.json").read_text())))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ("the game was", "a new  season by", " the band"):
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert (ids[0] == 1) == bos_template


def test_every_eos_id_of_a_list_stops_decoding(tmp_path, hf_llama_folder):
    """Llama 3 instruct configs give several end ids: decoding stops at any of them."""
    ref = hf_llama_folder(tmp_path)
    prompt_ids = HFTokenizer(tmp_path, config_from_hf(ref.config.to_dict())).encode("the game")
    produced = generate(load_hf_llama(str(tmp_path))[0], torch.tensor([prompt_ids]), 20).tokens[0]
    stop = next(t for i, t in enumerate(produced) if i >= 2 and t not in produced[:i])
    hf_llama_folder(tmp_path, eos=[2, stop])
    assert config_from_hf(json.loads((tmp_path / "config.json").read_text())).eos_token_id == \
        [2, stop]
    [result] = infer(compose_job("infer", ["model=hf_llama", f"model.path={tmp_path}",
                                           "prompt=the game", "max_new_tokens=20"]))
    assert result["ids"] == produced[: produced.index(stop) + 1]
    assert result["text"].endswith("\n")            # the end of the text, shown as a line end


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, hf_llama_folder):
    hf_llama_folder(tmp_path, vocab_size=150)                # the model has 120 embeddings
    with pytest.raises(HFConfigError, match=r"the tokenizer has 150 tokens, more than the "
                                            r"model's vocab_size=120"):
        HFTokenizer(tmp_path, config_from_hf(json.loads((tmp_path / "config.json").read_text())))


def test_the_exported_tokenizer_loads_with_autotokenizer_as_installed(tmp_path, trained_tiny):
    """tokenizer.json is written: transformers would need protobuf to convert the
    SentencePiece file itself. Its ids are tinyskip's, with no BOS added."""
    from tinyskip.storage.hf_llama import export_run
    from tinyskip.storage.loading import SentencePieceTokenizer
    out = export_run(trained_tiny[2], tmp_path / "hf")
    assert (out / "tokenizer.json").is_file()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = SentencePieceTokenizer(out / "tokenizer.model")
    for text in ("The game was", "In 1994 , the band  released   it ", "x", "日本 😀 ok",
                 "12,345.67 @-@ km"):
        assert theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text))


@pytest.mark.parametrize("drop,message", [
    ("low_freq_factor", "config.json rope_scaling (llama3) has no 'low_freq_factor'"),
    ("hidden_size", "config.json has no 'hidden_size'"),
])
def test_a_missing_config_key_is_one_line_naming_it(drop, message, hf_llama):
    hf = config_to_hf(config_from_hf(hf_llama(rope_scaling=LLAMA3_ROPE).config.to_dict()))
    hf["rope_scaling"].pop(drop, None)
    hf.pop(drop, None)
    with pytest.raises(HFConfigError, match=f"^{message.replace('(', '.').replace(')', '.')}: "
                                            "the Llama shim needs it$"):
        config_from_hf(hf)
