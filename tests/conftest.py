import os
import tempfile
from pathlib import Path

import pytest
import torch

from tinyskip.config import ModelConfig
from tinyskip.model.transformer import Transformer

# The offline WikiText-2 copy beside the checkout (see README: never copied into the repo).
WIKITEXT = Path(os.environ.get("TINYSKIP_WIKITEXT",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext"))

# Run folders (Hydra's, the benchmark's) of every command the tests start, in-process or
# not, go to a temporary folder: the suite leaves the project's tree as it found it
# (checked by ``project_tree_untouched``).
os.environ["TINYSKIP_LOGS"] = tempfile.mkdtemp(prefix="tinyskip-test-logs-")
# Likewise the converted-model cache (GGUF files), which defaults to ~/.cache/tinyskip.
os.environ["TINYSKIP_CACHE"] = tempfile.mkdtemp(prefix="tinyskip-test-cache-")

# Tiny tensors gain nothing from threads, and one thread per test process keeps the
# suite fast when other work (or the DDP test's two ranks) shares the cores.
torch.set_num_threads(1)


REPO = Path(__file__).resolve().parents[1]


def make_tiny_config(**overrides) -> ModelConfig:
    fields = dict(name="tiny", vocab_size=97, hidden_size=32, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture(scope="session")
def repo() -> Path:
    """The project's folder (where ``python -m tinyskip.*`` finds conf/)."""
    return REPO


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**overrides)``: a 4-block ModelConfig small enough for any test."""
    return make_tiny_config


@pytest.fixture
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(make_tiny_config()).eval()


def make_hf_llama(tie=False, kv_heads=2, rope_scaling=None, seed=0):
    """A tiny random transformers LlamaForCausalLM: vocab 120, 3 blocks of width 64."""
    import transformers

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


def make_llama_tokenizer(bos_template: bool, vocab_size: int = 80):
    """A Llama-style BPE tokenizer.json trained here: <unk> <s> </s> = 0 1 2, with or
    without a post-processor that puts BOS in front."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    words = "the game was played in a new season by the band and the team won first".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<unk>", "<s>", "</s>"]))
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    return tok


def make_hf_folder(path, bos_template=False, tokenizer_class="LlamaTokenizer", eos=2,
                   vocab_size=80, tie=False):
    """A Llama checkpoint folder whose tokenizer_config.json has no add_bos_token key;
    returns the transformers model it holds."""
    import json

    model = make_hf_llama(tie)
    model.config.eos_token_id = eos
    model.save_pretrained(path)
    make_llama_tokenizer(bos_template, vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))
    return model


@pytest.fixture(scope="session")
def hf_llama():
    """``hf_llama(tie, kv_heads, rope_scaling, seed)``: a tiny random transformers Llama."""
    pytest.importorskip("transformers")
    return make_hf_llama


@pytest.fixture(scope="session")
def hf_llama_folder():
    """``hf_llama_folder(path, bos_template, tokenizer_class, eos, vocab_size, tie)``: a
    tiny random Llama folder with a tokenizer.json (the transformers model it holds)."""
    pytest.importorskip("transformers")
    return make_hf_folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A real SentencePiece model (60 pieces) that fits tiny_config's vocabulary of 97."""
    import random

    import sentencepiece as spm

    words = "the a of and to in was game band first new season played team".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix),
                                   vocab_size=60, model_type="bpe", unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def wikitext_path() -> str:
    if not (WIKITEXT / "wikitext-2-raw-v1").is_dir():
        pytest.skip(f"local WikiText-2 copy not found at {WIKITEXT} (set TINYSKIP_WIKITEXT)")
    return str(WIKITEXT)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenizer/token-array cache shared by the tests of a session."""
    return str(tmp_path_factory.mktemp("tinyskip-cache"))


# The recipe of the trained_tiny run, on top of the layerskip preset. Every exit on every
# token: a tiny model with 8 x 32-token batches learns usable exits in 150 steps only so
# (the DEE tests need exits that leave at mixed depths). e_scale pinned: the tests need
# early exits that still differ from the last one, whatever the preset's own value.
TINY_RUN = {"max_steps": 150, "eval_every": 150, "exit_token_fraction": 1.0, "e_scale": 0.2}


def make_train_overrides(wikitext_path: str, data_cache: str, root, run: str, **train) -> list[str]:
    """Overrides for a seconds-long training run of a tiny model on a WikiText-2 slice."""
    base = {"max_steps": 40, "batch_size": 8, "seq_len": 32, "warmup_steps": 5, "lr": 1e-2,
            "eval_every": 20, "eval_batches": 2, "save_every": 10, "bf16": False,
            "compile": False}
    base.update(train)
    return ([f"data.path={wikitext_path}", f"data.cache_dir={data_cache}", "data.max_rows=1000",
             "data.vocab_size=300", "model=l4_d64", "model.hidden_size=32",
             "model.intermediate_size=64", "model.max_position_embeddings=128",
             f"checkpoint_root={root}", f"run={run}"]
            + [f"train.{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="session")
def tiny_run() -> dict:
    """The trained_tiny run's recipe (TINY_RUN)."""
    return dict(TINY_RUN)


@pytest.fixture(scope="session")
def tiny_train_overrides():
    """``tiny_train_overrides(wikitext_path, data_cache, root, run, **train)``: overrides
    for a seconds-long training run of a tiny model on a WikiText-2 slice."""
    return make_train_overrides


def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a folder's event files, as TensorBoard's own reader sees them
    (earlier files' purged steps left out): tag -> [(step, value)]."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})     # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()[SCALARS]}


@pytest.fixture(scope="session")
def tensorboard_scalars():
    """``tensorboard_scalars(folder)``: tag -> [(step, value)] read back by TensorBoard."""
    return read_tensorboard


def metrics_val_tags(rows: list[dict]) -> dict[str, list]:
    """What TensorBoard must hold of metrics.jsonl's evaluations ``rows``: each per-exit
    value once, under val/<name>/exit_<e> (as float32: approx)."""
    return {f"val/{name}/exit_{e}": [(r["step"], pytest.approx(r[f"val_{name}"][e - 1], rel=1e-6))
                                     for r in rows]
            for name in ("loss", "word_ppl", "agreement", "p_last_top")
            for e in range(1, len(rows[0]["val_loss"]) + 1)}


@pytest.fixture(scope="session")
def val_tags():
    """``val_tags(metrics rows)``: the val/* scalars TensorBoard must hold of them."""
    return metrics_val_tags


@pytest.fixture(scope="session")
def trained_tiny(wikitext_path, data_cache, tmp_path_factory):
    """A tiny layerskip-trained checkpoint (seconds of training): (model, corpus, run dir)."""
    from tinyskip.cli import compose_job
    from tinyskip.storage.checkpoint import load_model
    from tinyskip.storage.data import prepare_corpus
    from tinyskip.training.trainer import train

    root = tmp_path_factory.mktemp("trained")
    job = compose_job("train", make_train_overrides(wikitext_path, data_cache, root, "tiny",
                                                    **TINY_RUN)
                      + ["train=layerskip"])
    train(job, progress=False)
    model, ckpt = load_model(root / "tiny")
    corpus = prepare_corpus(job.data, ckpt / "tokenizer.model")
    return model, corpus, root / "tiny"


@pytest.fixture
def no_cxx():
    """Inductor pointed at a C++ compiler that does not exist (and no cached graphs to fall
    back on), through its own ``config.patch``: monkeypatching the config module's entries
    deletes them on undo, which breaks every later compile in the session."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch({"fx_graph_cache": False, "cpp.cxx": (None, "no-such-c++-compiler")}):
        yield
    torch._dynamo.reset()


def _project_files() -> dict[str, tuple]:
    """Every file and folder of the checkout with its size and modification time, less
    what running Python itself leaves (bytecode, the test cache, virtual environments, the
    editable install's metadata) and git's own folder."""
    skip = (".git", "__pycache__", ".pytest_cache")
    found = {}
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".venv")
                   and not d.endswith(".egg-info")]
        rel = os.path.relpath(folder, REPO)
        found[rel] = ("folder",)
        for name in names:
            st = os.stat(os.path.join(folder, name))
            found[os.path.join(rel, name)] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="session", autouse=True)
def project_tree_untouched():
    """The whole suite writes under temporary folders only: a file or folder it creates,
    changes or removes in the checkout (a run folder, a checkpoint, a cache) fails the
    session."""
    before = _project_files()
    yield
    after = _project_files()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"the tests changed the project's tree: {changed[:10]}"
