"""Bad input through every entry point, as users run it: exit status 2, one ``error:``
line naming the value, no traceback, and nothing written.

The cases run as ``python -m tinyskip.<entry> ...`` in a temporary working folder that
holds copies of the tiny trained run (some broken on purpose), through
tests/entry/entry_runner.py: one interpreter start-up, one forked child per case. Two
cases are also run as real subprocesses, to show that the runner reports what they
report. A refused job leaves no run folder either (under ``$TINYSKIP_LOGS``).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinyskip.cli import SCHEMAS
from tinyskip.config import DataConfig, ModelConfig, RopeScaling
from tinyskip.model.exit_modules import ExitModules
from tinyskip.storage.data import load_lines, train_tokenizer
from tinyskip.storage.exit_checkpoint import backbone_hash, save_exit_modules
from tinyskip.storage.hf_llama import config_to_hf

HUGE = 2 ** 70
LONG_PROMPT = " ".join(["the game was played"] * 60)


DATA = "<the tiny run's data overrides>"


class Train:
    """Training overrides of the tiny run (as trained_tiny made it), with changes; ``env``:
    variables for the process (``torchrun(n)``: what torchrun gives a rank)."""

    def __init__(self, run: str, *extra: str, env: dict | None = None, **train):
        self.run, self.extra, self.train, self.env = run, list(extra), train, env or {}


def torchrun(world: int) -> dict:
    """Rank 0's environment under torchrun: the job is refused before any process group
    forms, so no other rank is needed."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}


# (entry, arguments, what the error line must contain)
CASES = [
    # Rejected while the config is composed.
    ("train", ["model.hiden_size=64"], "model.hiden_size: no such key (did you mean model.hidden_size?)"),
    ("infer", ["mdoe=ssd"], "mdoe: no such key (did you mean mode?)"),
    ("infer", ["mode=ssd", "mode.draft_layer=0"],
     "mode.draft_layer=0: mode holds a value, not options (did you mean draft_layer=0?)"),
    ("infer", ["seed.x=1"], "seed.x=1: seed holds a value, not options"),
    ("train", ["model=l99"], "model=l99: no such option (available: hf_llama, l12_d256,"),
    ("train", ["train.max_steps=abc"], "train.max_steps='abc': Value 'abc' of type 'str' could not"),
    ("train", ["train.max_steps=0"], "TrainConfig.max_steps=0: must be > 0"),
    ("train", ["train.distill_weight=nan"], "TrainConfig.distill_weight=nan: must be >= 0"),
    ("train", ["train.distill_temperature=inf"], "TrainConfig.distill_temperature=inf: must be > 0"),
    ("train", ["model=l4_d64", "train.seq_len=600"], "train.seq_len=600: longer than the model's "
                                                     "context, model.max_position_embeddings=512"),
    ("train", [f"train.seed={HUGE}"], f"TrainConfig.seed={HUGE}: must be in 0..4294967295"),
    ("infer", [f"seed={HUGE}", "prompt=hi"], f"seed={HUGE}: must be in 0..4294967295"),
    ("infer", ["temperature=1e-30", "prompt=hi"], "temperature=1e-30: must be 0 (greedy) or >= 0.0001"),
    ("infer", ["mode=beam"], "mode=beam: no such option (available: dee, full, ssd, static)"),
    ("infer", ["prompt=hi", "out=no/such/dir/gen.json"], "out='no/such/dir/gen.json': folder "),
    ("evaluate", ["run=tiny", "seq_len=0"], "seq_len=0: must be >= 1"),
    ("evaluate", ["run=tiny", "batch_size=0"], "batch_size=0: must be >= 1"),
    ("evaluate", ["run=tiny", "max_batches=-1"], "max_batches=-1: must be >= 0"),
    ("evaluate", ["run=tiny", "split=dev"], "split='dev': must be one of train, validation, test"),
    ("export", ["run=tiny"], "out: a value is required (give out=...)"),
    ("export", ["run=tiny", "out=x", "dtype=int8"], "dtype='int8': must be one of float32,"),
    ("calibrate", ["run=tiny", "delta=2"], "delta=2.0: must be in (0, 1)"),
    ("calibrate", ["run=tiny", "split=test"], "split='test': calibrate on the held-out validation split"),
    ("calibrate", ["run=tiny", "measure=foo"], "measure='foo': must be one of softmax,"),
    ("bench", ["run=tiny", "n_prompts=0"], "n_prompts=0: must be >= 1"),
    ("bench", ["run=tiny", "temperature=0.7", "hf_baseline=true"],
     "temperature=0.7: the hf_baseline and batch_sizes rows decode greedily"),
    ("bench", ["run=tiny", "temperature=0.7", "calibration=[cal.json]"],
     "a calibration certifies greedy decoding"),
    ("bench", ["run=tiny", "temperature=-1"], "temperature=-1"),
    ("infer", ["quantize=int4", "prompt=hi"], "quantize='int4': must be one of none, int8"),
    ("bench", ["run=tiny", "precisions=[float64]"],
     "precisions: 'float64' is not DTYPE or DTYPE+QUANTIZE"),
    ("bench", ["run=tiny", "precisions=[bfloat16+int4]"],
     "precisions: 'bfloat16+int4' is not DTYPE or DTYPE+QUANTIZE"),
    ("bench", ["run=tiny", "precisions=[float32+none]"],
     "precisions: 'float32+none' is not DTYPE or DTYPE+QUANTIZE"),
    ("calibrate", ["run=tiny", "quantize=int2"], "quantize='int2': must be one of none, int8"),
    ("infer", ["mode=ssd", "draft_layer=2", "ngram=-1", "prompt=hi"], "ngram=-1: must be >= 1"),
    ("bench", ["run=tiny", "ngram=-2"], "ngram=-2: must be >= 1"),
    ("infer", ["mode=ssd", "draft_layer=2", "ngram_k=4", "prompt=hi"],
     "ngram_k=4: the length of prompt-lookup drafts (give ngram=n too"),
    ("bench", ["run=tiny", "ngram=2", "ngram_k=[-1]"], "ngram_k=-1: must be >= 1"),
    ("bench", ["run=tiny", "ngram_k=[8]"], "ngram_k=8: the length of prompt-lookup drafts"),
    ("bench", ["run=tiny", "draft_layer=[]", "ngram_k=[8]"],
     "ngram_k=8: the length of prompt-lookup drafts"),
    ("bench", ["run=tiny", "ngram=2", "ngram_k=[0]"], "ngram_k=[0]: the lookup rows without"),
    ("bench", ["run=tiny", "ngram=2", "ngram_k=[6,6]"], "ngram_k=[6, 6]: a length is listed twice"),
    ("bench", ["run=tiny", "measure=[softmax]", "threshold=[0.5]", "exits=[2]", "check_every=2"],
     "exits=[2] with check_every=2: give one of them"),
    ("bench", ["run=tiny", "prefill_len=-1"], "prefill_len=-1: must be >= 0"),
    ("bench", ["run=tiny", "threads=-1"], "threads=-1: must be >= 0"),
    ("bench", ["run=tiny", "measure=[softmax]"], "give both for DEE rows"),
    ("bench", ["run=tiny", "exits=[2]"], "exits=[2]: the checked exits of the DEE threshold rows"),
    ("bench", ["run=tiny", "measure=[softmax]", "threshold=[0.5]", "exits=[9]"],
     "exits=[9]: checked exits must be increasing and in 1..3"),
    ("bench", ["run=tiny", "measure=[bogus]", "threshold=[0.5]"], "measure='bogus': must be one of"),
    ("bench", ["run=tiny", "hf_early_exit=[2]"], "hf_early_exit=[2]: needs hf_baseline=true"),
    ("bench", ["run=tiny", "ssd_costs=true", "draft_layer=[]"], "ssd_costs=true prices SSD rounds"),
    ("bench", ["run=tiny", "ssd_costs=true", "k=[300]", "max_new_tokens=4"],
     "past this generation's 128-slot cache"),
    ("bench", ["run=tiny", "calibration=[nope.json]"], "calibration: 'nope.json' does not exist"),
    ("bench", ["run=tiny", "out_dir=latin1.txt"], "out_dir='latin1.txt' is a file: give a folder"),
    ("bench", ["run=tiny", "tensorboard=true", "out_dir=null"],
     "tensorboard=true writes into out_dir/tensorboard/: give out_dir=<folder>"),
    ("bench", ["run=tiny", "cache=[share]"], "cache='share': must be one of propagate"),
    ("infer", ["model=hf_llama", "model.path=bad.gguf", "prompt=hi"], "bad.gguf is not a GGUF file"),
    ("infer", ["model=hf_llama", "model.path=none.gguf", "prompt=hi"],
     "model.path='none.gguf': no such GGUF file"),
    ("bench", ["run=tiny", "check_every=0"], "check_every=0: must be >= 1"),
    ("export", ["run=tiny", "out=x", "push="], "push='': not a Hub repo name (owner/name or name"),
    ("export", ["run=tiny", "out=x", "push=me/tiny/v1"], "push='me/tiny/v1': not a Hub repo name"),
    ("export", ["run=tiny", "out=x", "license=MIT"], "license='MIT': give a Hub licence id"),
    ("export", ["run=tiny", "out=x", "eval_batches=-1"], "eval_batches=-1: must be >= 0"),
    # Every mode's options are checked, whichever mode runs.
    ("infer", ["run=tiny", "mode=full", "measure=bogus"], "measure='bogus': must be one of"),
    ("infer", ["run=tiny", "mode=ssd", "draft_layer=2", "cache=share"], "cache='share': must be"),
    # A calibration certifies one decoder: what would change it is refused.
    ("infer", ["run=tiny", "mode=dee", "check_every=3"],
     "exits=, check_every= and decay_tau= change the decoder the calibration file certifies"),
    ("infer", ["run=tiny", "mode=dee", "temperature=0.7"],
     "temperature=0.7: a calibration file certifies greedy decoding"),
    # Rejected when the run, its files or the data are looked at.
    ("train", ["run=../../x"], "run='../../x': a run name must be a relative path inside"),
    ("infer", ["run=/tmp/x", "prompt=hi"], "run='/tmp/x': a run name must be a relative path inside"),
    ("infer", ["checkpoint=missing", "prompt=hi"], "no checkpoint at missing"),
    ("infer", ["run=tiny", "prompts_file=latin1.txt"], "prompts_file='latin1.txt' is not UTF-8 text"),
    ("infer", ["run=tiny", f"prompt={LONG_PROMPT}"], "longer than the context allows (127 tokens"),
    ("infer", ["run=tiny", "prompts_file=ragged.txt", "mode=ssd", "draft_layer=2", "batch_size=2"],
     "prompt 2 of the batch has "),
    ("infer", ["run=tiny", "prompt=hi", "mode=dee", "threshold=0.5", "batch_size=2"],
     "batch_size=2: mode=dee decodes one prompt at a time"),
    ("infer", ["run=tiny", "prompt=hi", "mode=ssd", "draft_layer=2", "ngram=2", "batch_size=4"],
     "batch_size=4: ngram=2 (prompt-lookup drafts) decodes one prompt at a time"),
    ("infer", ["run=tiny", "prompt=hi", "batch_size=0"], "batch_size=0: must be >= 1"),
    ("infer", ["run=tiny", "prompt=hi", "mode=ssd", "draft_layer=2", "k=0"], "k=0: must be >= 1"),
    ("infer", ["run=tiny", "prompt=hi", "mode=static", "exit_layer=9"], "exit_layer=9: must be in 1..4"),
    ("infer", ["run=badtok", "prompt=hi"], "tokenizer.model is not a SentencePiece model"),
    ("infer", ["run=badcfg", "prompt=hi"], "config.json is not UTF-8 text"),
    ("infer", ["run=bigtok", "prompt=hi"], "tokenizer.model has 400 tokens, more than the "
                                           "model's vocab_size=300"),
    ("infer", ["model=hf_llama", "model.path=hf_missing", "prompt=hi"],
     "model.path='hf_missing': config.json rope_scaling (llama3) has no 'low_freq_factor'"),
    ("infer", ["model=hf_llama", "model.path=hf_badcfg", "prompt=hi"], "config.json is not UTF-8 text"),
    ("evaluate", ["run=tiny", "seq_len=1000"], "seq_len=1000: longer than the model's context "
                                               "(max_position_embeddings=128)"),
    ("evaluate", ["run=tiny", "data.path=/no/such/data"], "data.path='/no/such/data': no such folder"),
    ("export", ["run=tiny", "out=exists"], "out=exists already exists"),
    ("calibrate", ["run=tiny", "n_examples=1"], "n_examples=1: too few calibration examples"),
    ("bench", ["run=tiny", "draft_layer=[9]", DATA], "draft_layer=9: must be in 1..4"),
    ("bench", ["run=tiny", "prefill_len=100000", DATA], "prefill_len=100000: must be shorter than"),
    ("bench", ["run=tiny", "hf_baseline=true", "hf_early_exit=[9]", DATA],
     "hf_early_exit=[9]: exits must be in 1..3"),
    ("train", Train("badstate", resume=True), "train_state.pt is corrupted"),
    ("train", Train("tiny", resume=True, lr=0.02), "train.lr: 0.01 -> 0.02;"),
    ("train", Train("tiny", resume=True, max_steps=300),
     "train.max_steps: 150 -> 300 (the cosine LR schedule, LayerDrop's S(t) and the gradual"),
    ("train", Train("tiny", "train=plain", resume=True), "train.preset: 'layerskip' -> 'plain';"),
    ("train", Train("oldonly"), "already holds a checkpoint (.checkpoint-old)"),
    # Data parallelism (train.parallel): checked before any process group forms.
    ("train", ["train.parallel=zero"], "TrainConfig.parallel='zero': must be one of ddp, fsdp"),
    ("train", Train("fresh", parallel="fsdp"),
     "train.parallel=fsdp shards the model over a process group: launch with torchrun"),
    ("train", Train("fresh", env=torchrun(3)),
     "train.batch_size=8 must be divisible by the 3 data-parallel processes"),
    ("train", Train("fresh", env=torchrun(3), parallel="fsdp"),
     "train.batch_size=8 must be divisible by the 3 data-parallel processes"),
    ("train", Train("tiny", env=torchrun(2), parallel="fsdp", resume=True),
     "it was saved by a ddp or one-process run (its optimizer state is whole, not sharded)"),
    ("train", Train("noshard", resume=True), "checkpoint is incomplete: missing "
                                             "sharded/__1_0.distcp (1 of the 3 files its 2 ranks"),
    ("train", Train("nomanifest", resume=True), "is incomplete: sharded/ without the "
                                                "sharded.json that lists its files"),
    # Exit modules on a frozen backbone (train=balcony).
    ("train", ["train=balcony", "train.kl_weight=0"], "the exit modules would learn nothing"),
    ("train", ["train=balcony", "train.backbone=tiny", "train.parallel=fsdp"],
     "train.parallel=fsdp shards the model over a process group"),
    ("train", ["train=balcony", "run=x"], "give train.backbone=<run>"),
    ("train", ["train=balcony", "train.backbone=tiny", "train.exit_layers=[4]", DATA],
     "exit_layers=[4]: 4 is outside 1..3 (exit 4 is the model's own output)"),
    ("train", ["train=balcony", "train.backbone=tiny", "train.exit_layers=[2,2]", DATA],
     "exit_layers=[2, 2]: an exit is listed twice"),
    ("train", ["train=balcony", "train.backbone=tiny", "train.exit_cache=offline",
               "train.exit_cache_dir=exists", DATA], "train.exit_cache_dir='exists' is not a"),
    ("train", ["train=balcony", "train.backbone=tiny", "train.exit_kind=ffn"],
     "exit_kind='ffn': must be one of block, mlp, attention, norm"),
    ("infer", ["run=exits-other", "prompt=hi"], "were trained on a backbone with weight hash"),
    # lm-evaluation-harness: tasks it does not know, modes it cannot drive.
    ("harness", ["run=tiny", "prompt=hi"], "prompt='hi': harness tasks give the prompts"),
    ("harness", ["run=tiny", "limit=0"], "limit=0.0: must be > 0"),
    ("harness", ["run=tiny", "gen_kwargs='temperature=abc'"],
     "gen_kwargs: temperature='abc': must be a number"),
    ("harness", ["run=tiny", "gen_kwargs='max_gen_toks=-5'"],
     "gen_kwargs: max_gen_toks='-5': must be an integer >= 1"),
    ("harness", ["run=tiny", "tasks=[wikitext3]", DATA], "tasks: 'wikitext3' is not a harness task "
                                                         "(did you mean 'wikitext'?"),
    ("harness", ["run=tiny", "data.path=/no/such/data"],
     "tasks: cannot load the data of 'tinyskip_wikitext2' (FileNotFoundError:"),
    ("train_bench", ["steps=0"], "steps=0: must be >= 1"),
    ("gpu_check", ["device=tpu"], "device='tpu': must be cuda or cpu"),
    ("gpu_check", ["device=cpu", "n_prompts=1"], "n_prompts=1: must be >= 2 (the first one "
                                                 "compiles, the others are timed)"),
    ("gpu_check", ["device=cpu", "model=l4_d64", "tests=false", "fsdp=false", "stream_mib=8"],
     "draft_layer=8: must be in 1..4"),
    ("harness", ["run=tiny", "mode=dee", "threshold=0.5", DATA],
     "mode=dee cannot drive tinyskip_wikitext2: likelihood tasks are scored teacher-forced"),
    # Continual training of a pretrained Llama (model.path with a preset other than balcony).
    ("train", ["model=hf_llama", "model.path=hf_mistral", "run=cont2"],
     "model.path='hf_mistral': model_type='mistral' architectures=['MistralForCausalLM']: only "
     "Llama"),
    ("train", ["model=hf_llama", "model.path=hf_llama", "model.hidden_size=256", "run=cont2"],
     "model.hidden_size=256: a continual run's model is model.path='hf_llama'"),
    ("train", ["model=hf_llama", "model.path=hf_llama", "run=cont", "train.resume=true"],
     "train.resume=true with other weights than checkpoints/cont started from: "
     "model.path='hf_llama' has weight hash"),
    ("train", ["model=hf_llama", "model.path=hf_llama", "run=tiny", "train.resume=true"],
     "checkpoints/tiny was trained from scratch"),
    ("train", ["run=cont", "train.resume=true"], "checkpoints/cont continues the pretrained model"),
    # SSD choosing its exit per round (choose=del): candidates the model did not train.
    ("infer", ["run=tiny", "prompt=hi", "mode=ssd", "choose=del", "ssd_exits=[0,2]"],
     "ssd_exits=[0, 2]: 0 is outside 1..3 (exit 4 is the full model, which verifies)"),
    ("infer", ["run=tiny-mods", "prompt=hi", "mode=ssd", "choose=del", "ssd_exits=[1,2]"],
     "ssd_exits=[1, 2]: exit 1 has no exit module; this model's exits with modules are [2]"),
    ("infer", ["run=tiny", "prompt=hi", "mode=ssd", "choose=del"],
     "choose=del needs ssd_exits=[...] (candidate exits in 1..3): this model has no exit modules"),
    ("infer", ["run=tiny", "prompt=hi", "mode=ssd", "choose=del", "ssd_exits=[1,2]",
               "batch_size=2"], "batch_size=2: choose=del (an exit chosen per round) decodes one "
                                "prompt at a time"),
    ("infer", ["prompt=hi", "mode=ssd", "draft_layer=2", "ssd_exits=[2]"],
     "ssd_exits=[2]: the candidate exits of choose=del"),
    ("bench", ["run=tiny", "choose_del=true", "ssd_exits=[2,2]"],
     "ssd_exits=[2, 2]: an exit is listed twice"),
    ("bench", ["run=tiny", "choose_del=true", "ssd_exits=[1,5]", DATA],
     "ssd_exits=[1, 5]: 5 is outside 1..3"),
]
# Not bad input: a k far beyond any budget drafts what the budget allows.
HUGE_K = ("infer", ["run=tiny", "prompt=The game", "mode=ssd", "draft_layer=2",
                    f"k={10 ** 9}", "max_new_tokens=8"])


@pytest.fixture(scope="module")
def workdir(trained_tiny, wikitext_path, hf_llama_folder, tmp_path_factory) -> Path:
    """A working folder with copies of the tiny run, broken in the ways the cases need."""
    work = tmp_path_factory.mktemp("bad-input")
    runs = work / "checkpoints"
    for name in ("tiny", "badtok", "badcfg", "badstate", "oldonly", "bigtok", "noshard",
                 "nomanifest"):
        shutil.copytree(trained_tiny[2], runs / name)
    (runs / "badtok" / "checkpoint" / "tokenizer.model").write_bytes(b"\x0a\x05garbage")
    (runs / "badcfg" / "checkpoint" / "config.json").write_bytes(b'{"name": "\xff"}')
    (runs / "badstate" / "checkpoint" / "train_state.pt").write_bytes(b"PK\x03\x04 torn")
    os.replace(runs / "oldonly" / "checkpoint", runs / "oldonly" / ".checkpoint-old")
    # A two-rank sharded checkpoint that lost rank 1's shard.
    shards = runs / "noshard" / "checkpoint" / "sharded"
    shards.mkdir()
    (shards / ".metadata").write_bytes(b"not read: the check comes first")
    (shards / "__0_0.distcp").write_bytes(b"rank 0's shard")
    (shards.parent / "sharded.json").write_text(json.dumps(
        {"world_size": 2, "files": [".metadata", "__0_0.distcp", "__1_0.distcp"]}))
    shutil.copytree(shards, runs / "nomanifest" / "checkpoint" / "sharded")  # (no sharded.json)
    lines, _ = load_lines(DataConfig(path=wikitext_path, max_rows=1000))
    train_tokenizer(lines["train"], DataConfig(vocab_size=400),
                    runs / "bigtok" / "checkpoint" / "tokenizer.model")
    hf = config_to_hf(ModelConfig(rope_scaling=RopeScaling()))
    del hf["rope_scaling"]["low_freq_factor"]
    (work / "hf_missing").mkdir()
    (work / "hf_missing" / "config.json").write_text(json.dumps(hf))
    (work / "hf_badcfg").mkdir()
    (work / "hf_badcfg" / "config.json").write_bytes(b'{"vocab_size": "\xe9"}')
    (work / "hf_mistral").mkdir()
    (work / "hf_mistral" / "config.json").write_text(json.dumps(
        {**config_to_hf(ModelConfig()), "model_type": "mistral",
         "architectures": ["MistralForCausalLM"]}))
    hf_llama_folder(work / "hf_llama")
    # A continual run that started from weights other than hf_llama's.
    shutil.copytree(work / "hf_llama", runs / "cont" / "checkpoint")
    (runs / "cont" / "checkpoint" / "source.json").write_text(json.dumps(
        {"path": "/elsewhere", "weights_hash": "0" * 64}))
    (work / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (work / "ragged.txt").write_text(f"the game\n{LONG_PROMPT}\n")       # a batch of two
    (work / "bad.gguf").write_bytes(b"GGUF but not really")
    (work / "exists").mkdir()
    # Real exit modules at exit 2 only, on the tiny run.
    backbone = runs / "tiny" / "checkpoint"
    save_exit_modules(runs / "tiny-mods", ExitModules(trained_tiny[0].config, [2], "norm"),
                      {"path": str(backbone), "format": "tinyskip",
                       "weights_hash": backbone_hash(backbone)})
    (work / "exists" / "a-file").write_text("not a cache")
    # Exit modules whose recorded backbone hash is not the backbone's.
    exits = runs / "exits-other" / "exits"
    exits.mkdir(parents=True)
    (exits / "exit_modules.json").write_text(json.dumps({
        "kind": "norm", "exit_layers": [2], "backbone": {
            "path": str(runs / "tiny" / "checkpoint"), "format": "tinyskip", "weights_hash": "0" * 64}}))
    return work


@pytest.fixture(scope="module")
def expand(tiny_run, tiny_train_overrides, wikitext_path, data_cache):
    def args(a) -> list[str]:
        if isinstance(a, Train):
            return (tiny_train_overrides(wikitext_path, data_cache, "checkpoints", a.run,
                                         **{**tiny_run, **a.train})
                    + ["train=layerskip"] + a.extra)
        data = [f"data.path={wikitext_path}", f"data.cache_dir={data_cache}",
                "data.max_rows=1000", "data.vocab_size=300"]
        return [x for arg in a for x in (data if arg == DATA else [arg])]
    return args


@pytest.fixture(scope="module")
def results(repo, workdir, expand, data_cache, tmp_path_factory):
    cases = [{"entry": entry, "args": expand(args), "cwd": str(workdir), "watch": [data_cache],
              "env": args.env if isinstance(args, Train) else {}}
             for entry, args, *_ in CASES + [HUGE_K]]
    io = tmp_path_factory.mktemp("runner")
    (io / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, str(repo / "tests" / "entry" / "entry_runner.py"),
                           str(io / "cases.json"), str(io / "results.json")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((io / "results.json").read_text())


def case_id(case) -> str:
    entry, args, _ = case
    shown = [f"run={args.run}", *args.extra, *(f"{k}={v}" for k, v in args.train.items())] \
        if isinstance(args, Train) else args
    return f"{entry} " + " ".join(a[:30] for a in shown)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_bad_input_is_one_error_line_with_exit_2_and_nothing_written(results, i):
    _, _, message = CASES[i]
    r = results[i]
    assert r["rc"] == 2, r["stderr"][-3000:]
    assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"][-3000:]
    assert message in lines[0]
    assert r["touched"] == [] and r["logged"] == []


def test_enough_cases_across_every_entry_point():
    entries = [entry for entry, *_ in CASES]
    assert len(CASES) >= 30
    assert set(SCHEMAS) == set(entries)


def test_a_huge_k_drafts_only_what_the_budget_allows(results):
    r = results[len(CASES)]
    assert r["rc"] == 0, r["stderr"][-3000:]
    assert "ssd E=2 k=1000000000 [8 new tokens" in r["stdout"] and r["touched"] == []
    assert r["logged"], "a job that ran left no run folder: the runner watches the wrong place"


def test_an_upload_that_fails_is_one_line_and_leaves_the_export_written(workdir, tmp_path):
    # The real upload (huggingface_hub's create_repo and upload_folder) against a Hub
    # endpoint where nothing listens: it fails at once, as it does offline.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_TOKEN": "hf_not_a_token", "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = tmp_path / "tiny-hf"
    done = subprocess.run([sys.executable, "-m", "tinyskip.export",
                           f"checkpoint={workdir / 'checkpoints' / 'tiny'}", f"out={out}",
                           "evaluate=false", "push=someone/tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot upload {out} as someone/tiny "
                                                   "to the Hub: "), done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("i", [1, 29])
def test_the_runner_reports_what_a_real_subprocess_reports(results, workdir, expand, i):
    entry, args, _ = CASES[i]
    done = subprocess.run([sys.executable, "-m", f"tinyskip.{entry}", *expand(args)],
                          cwd=workdir, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stderr) == (results[i]["rc"], results[i]["stderr"])
