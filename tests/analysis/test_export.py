"""The export job end to end: the model card and its numbers, the exit modules and the
calibration that travel with the weights and load back, and the upload's file list."""

import json
import shutil

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from tinyskip.analysis.perplexity import exit_perplexities
from tinyskip.calibration.run import calibrate
from tinyskip.cli import compose_job
from tinyskip.config import ModelConfig, UserError
from tinyskip.decode.run import infer
from tinyskip.storage.data import prepare_corpus
from tinyskip.analysis.export import export_job, upload_files
from tinyskip.storage.loading import load_source, run_data_config
from tinyskip.training.exit_training import train_exit_modules

CPU = torch.device("cpu")
CALIBRATE = ["n_examples=8", "grid=4", "prompt_len=8", "max_new_tokens=6", "test_split=null",
             "delta=0.3", "epsilon=0.3"]


def export(source, out, *args):
    return export_job(compose_job("export", [f"checkpoint={source}", f"out={out}",
                                             "device=cpu", *args]))


def card_of(folder):
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.fixture(scope="module")
def calibrated_run(trained_tiny, tmp_path_factory):
    """A copy of the tiny run with its calibration.json (the run's own data, from job.json)."""
    run = tmp_path_factory.mktemp("export") / "tiny"
    shutil.copytree(trained_tiny[2], run)
    calibrate(compose_job("calibrate", [f"checkpoint={run}"] + CALIBRATE))
    return run


@pytest.fixture(scope="module")
def exported(calibrated_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tiny-hf"
    return export(calibrated_run, out, "eval_batches=2")


@pytest.fixture(scope="module")
def exit_run(trained_tiny, tiny_train_overrides, wikitext_path, data_cache, tmp_path_factory):
    """Block exit modules trained for two steps on the tiny run (a train=balcony run)."""
    root = tmp_path_factory.mktemp("exit-run")
    overrides = tiny_train_overrides(wikitext_path, data_cache, root, "x", max_steps=2,
                                     eval_every=2, eval_batches=1, lr=1e-3)
    args = [o for o in overrides if not o.startswith(("model", "run="))]
    train_exit_modules(compose_job("train", args + [
        "train=balcony", f"train.backbone={trained_tiny[2]}", "train.device=cpu",
        "run=tiny-exits"]), progress=False)
    return root / "tiny-exits"


def test_the_card_has_hub_metadata_and_the_per_exit_test_numbers(exported, calibrated_run):
    meta, body = card_of(exported.folder)
    assert meta["license"] == "cc-by-sa-3.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == "tinyskip" and meta["datasets"] == ["Salesforce/wikitext"]
    assert {"llama", "early-exit", "layerskip", "self-speculative-decoding"} <= set(meta["tags"])
    assert "| preset | `layerskip` |" in body
    assert "150 x batch 8 x seq_len 32 = 38,400 tokens" in body
    assert "4 layers, hidden 32, 4 heads (2 key/value), MLP 64, vocabulary 300," in body
    assert "The model learnt each line end as `</s>`" in body     # which transformers cannot
    # The same numbers exit_perplexities gives on the same windows of the same test split.
    loaded = load_source(None, str(calibrated_run), "", None, CPU)
    corpus = prepare_corpus(run_data_config(loaded.run_dir, compose_job(
        "export", ["out=x"]).data), loaded.tokenizer_file)
    ev = exit_perplexities(loaded.model, corpus.tokens["test"], corpus.words["test"], 32,
                           max_batches=2)
    for e, row in enumerate(zip(ev["loss"], ev["word_ppl"], ev["agreement"]), start=1):
        assert f"| {e} | {row[0]:.4f} | {row[1]:.2f} | {row[2]:.3f} |" in body
    assert f"{ev['tokens']:,} tokens of the test split of Salesforce/wikitext" in body


def test_a_calibrated_export_loads_back_and_dee_reads_its_calibration(exported, calibrated_run,
                                                                      tmp_path):
    cal = json.loads((exported.folder / "calibration.json").read_text())
    own = json.loads((calibrated_run / "calibration.json").read_text())
    assert cal["threshold"] == own["threshold"] and cal["weights_hash"] != own["weights_hash"]
    assert exported.note is None and "## Calibration" in card_of(exported.folder)[1]
    dee = ["mode=dee", "prompt=The game"]
    [mine] = infer(compose_job("infer", ["model=hf_llama", f"model.path={exported.folder}"] + dee))
    [theirs] = infer(compose_job("infer", [f"checkpoint={calibrated_run}"] + dee))
    assert mine["ids"] == theirs["ids"] and mine["mode"] == theirs["mode"]
    # Other weights under the same calibration: refused, in one line.
    tampered = tmp_path / "tampered"
    shutil.copytree(exported.folder, tampered)
    state = load_file(str(tampered / "model.safetensors"))
    state["model.norm.weight"] += 1
    save_file(state, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="was made for other weights") as e:
        infer(compose_job("infer", ["model=hf_llama", f"model.path={tampered}"] + dee))
    assert "\n" not in str(e.value)


def test_a_calibration_made_for_other_weights_is_left_out(calibrated_run, tmp_path):
    """A stale calibration (made before the weights changed) is never re-keyed onto them."""
    run = tmp_path / "stale"
    shutil.copytree(calibrated_run, run)
    cal = json.loads((run / "calibration.json").read_text())
    (run / "calibration.json").write_text(json.dumps({**cal, "weights_hash": "0" * 64}))
    done = export(run, tmp_path / "out", "evaluate=false")
    assert not (done.folder / "calibration.json").exists()
    assert done.note.startswith("calibration left out:") and "other weights" in done.note


def test_a_bfloat16_export_leaves_the_calibration_out_and_scores_the_rounded_weights(
        calibrated_run, tmp_path):
    done = export(calibrated_run, tmp_path / "bf16", "dtype=bfloat16", "eval_batches=1")
    assert not (done.folder / "calibration.json").exists()
    assert done.note.startswith("calibration left out: dtype=bfloat16 rounds the weights")
    body = card_of(done.folder)[1]
    assert "\n" not in done.note and done.note in body
    with pytest.raises(UserError, match="calibration.json' does not exist"):
        infer(compose_job("infer", ["model=hf_llama", f"model.path={done.folder}",
                                    "mode=dee", "prompt=The game"]))
    # The card's numbers are those of the weights in the folder, not of the run's.
    back = load_source(None, None, "", ModelConfig(path=str(done.folder)), CPU)
    corpus = prepare_corpus(done.card.data, back.tokenizer_file)
    ev = exit_perplexities(back.model, corpus.tokens["test"], corpus.words["test"], 32,
                           max_batches=1)
    assert done.card.numbers["loss"] == ev["loss"]


def test_an_exit_module_run_exports_with_its_modules_and_the_same_logits(exit_run, tmp_path):
    done = export(exit_run, tmp_path / "exits-hf", "eval_batches=1")
    run = load_source(None, str(exit_run), "", None, CPU)
    back = load_source(None, None, "", ModelConfig(path=str(done.folder)), CPU)
    assert back.exits == done.folder / "exits" and back.model.exit_modules.kind == "block"
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        for a, b in zip(run.model(ids, exits=[1, 2, 3, 4]), back.model(ids, exits=[1, 2, 3, 4])):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "## Exit modules" in card_of(done.folder)[1]
    # The folder is its own run as well: checkpoint= finds the backbone from exits/.
    assert load_source(None, str(done.folder), "", None, CPU).exits == done.folder / "exits"
    # Other backbone weights under the exported modules: refused, in one line.
    state = load_file(str(done.folder / "model.safetensors"))
    state["model.norm.weight"] += 1
    save_file(state, str(done.folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="trained on a backbone with weight hash") as e:
        load_source(None, None, "", ModelConfig(path=str(done.folder)), CPU)
    assert "\n" not in str(e.value)


def test_push_uploads_every_file_of_the_folder_and_nothing_else(exported, exit_run, tmp_path):
    assert upload_files(exported.folder) == [
        "README.md", "calibration.json", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    done = export(exit_run, tmp_path / "exits-hf", "evaluate=false")
    assert "Not measured (exported with evaluate=false)." in card_of(done.folder)[1]
    # The modules and their metadata, never the optimiser state of exits/train_state.pt.
    assert [f for f in upload_files(done.folder) if f.startswith("exits/")] == [
        "exits/exit_modules.json", "exits/exit_modules.safetensors"]
