import numpy as np
import pytest

from tinyskip.config import DataConfig
from tinyskip.storage.data import (IGNORE, DataError, count_words, eval_windows, get_batch,
                                   load_lines, prepare_corpus)


@pytest.fixture(scope="module")
def cfg(wikitext_path, data_cache):
    return DataConfig(path=wikitext_path, cache_dir=data_cache, max_rows=1000, vocab_size=300)


def test_local_copy_loads_every_split(wikitext_path):
    lines, fingerprint = load_lines(DataConfig(path=wikitext_path, max_rows=50))
    assert set(lines) == {"train", "validation", "test"}
    assert all(len(v) == 50 for v in lines.values())
    assert lines["train"][0] == "" and lines["train"][1] == " = Valkyria Chronicles III = \n"


def test_corpus_is_cached_and_reused(cfg):
    first = prepare_corpus(cfg)
    mtime = first.tokenizer_file.stat().st_mtime_ns
    second = prepare_corpus(cfg)
    assert second.tokenizer_file == first.tokenizer_file
    assert second.tokenizer_file.stat().st_mtime_ns == mtime
    assert np.array_equal(first.tokens["train"], second.tokens["train"])
    assert first.vocab_size == 300 and first.tokens["train"].max() < 300


def test_cache_key_changes_with_tokenizer_settings(cfg):
    other = DataConfig(**{**cfg.__dict__, "vocab_size": 320})
    assert prepare_corpus(other).tokenizer_file != prepare_corpus(cfg).tokenizer_file


def test_lines_end_in_eos_and_round_trip(cfg):
    corpus = prepare_corpus(cfg)
    sp = corpus.tokenizer()
    lines, _ = load_lines(cfg)
    kept = [l.strip() for l in lines["validation"] if l.strip()]
    ids = corpus.tokens["validation"].tolist()
    assert ids.count(corpus.eos_id) == len(kept)
    first_line = ids[: ids.index(corpus.eos_id)]
    assert sp.decode(first_line) == kept[0]


def test_word_counts_are_whitespace_words_plus_line_ends(cfg):
    assert count_words(["", " a b c \n", "d\n", " \n"]) == 6
    corpus = prepare_corpus(cfg)
    lines, _ = load_lines(cfg)
    # Counted another way: every word of the split, plus one line end per EOS token
    # (the token array ends each non-empty line with one).
    line_ends = int((corpus.tokens["test"] == corpus.eos_id).sum())
    assert 0 < line_ends < len(lines["test"])            # blank lines have no line end
    assert corpus.words["test"] == len(" ".join(lines["test"]).split()) + line_ends


def test_batches_depend_only_on_seed_and_step(cfg):
    tokens = prepare_corpus(cfg).tokens["train"]
    x1, y1 = get_batch(tokens, 4, 16, seed=1, step=7)
    x2, y2 = get_batch(tokens, 4, 16, seed=1, step=7)
    x3, _ = get_batch(tokens, 4, 16, seed=1, step=8)
    assert x1.equal(x2) and y1.equal(y2) and not x1.equal(x3)
    assert x1[:, 1:].equal(y1[:, :-1])
    # Data-parallel ranks take disjoint rows of the same global batch.
    assert get_batch(tokens, 4, 16, 1, 7, slice(1, None, 2))[0].equal(x1[1::2])


def test_eval_windows_score_every_token_after_the_first_once():
    tokens = np.arange(103, dtype=np.uint16)
    ys = np.concatenate([y.flatten().numpy() for _, y in eval_windows(tokens, 10, 3)])
    assert np.array_equal(ys, np.arange(1, 103))


def test_missing_data_path_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="data.path='.*nope': no such folder"):
        load_lines(DataConfig(path=str(tmp_path / "nope")))


def _text_folder(folder, splits=("train", "validation", "test")):
    folder.mkdir()
    for s in splits:
        (folder / f"{s}.txt").write_text(f"The {s} text, first line.\n\nAnd a second.\n" * 40)
    return folder


def test_folder_of_plain_text_loads_each_file_as_its_split(tmp_path, data_cache):
    # data.name is WikiText's by default: a text folder has no configurations to name.
    cfg = DataConfig(path=str(_text_folder(tmp_path / "docs")), cache_dir=data_cache,
                     vocab_size=40)
    lines, _ = load_lines(cfg)
    assert lines["test"][:3] == ["The test text, first line.", "", "And a second."]
    assert len(lines["validation"]) == 120
    corpus = prepare_corpus(cfg)                   # a tokenizer trains on its train.txt
    assert corpus.words["test"] == 40 * (5 + 1 + 3 + 1)
    assert corpus.tokens["test"].max() < 40


def test_folder_of_plain_text_missing_a_split_is_one_clear_error(tmp_path):
    folder = _text_folder(tmp_path / "docs", ("train", "test"))
    with pytest.raises(DataError, match=r"plain text without \['validation.txt'\]"):
        load_lines(DataConfig(path=str(folder)))


def test_vocabulary_larger_than_the_data_supports_is_refused(wikitext_path, data_cache):
    cfg = DataConfig(path=wikitext_path, cache_dir=data_cache, max_rows=200, vocab_size=60000)
    with pytest.raises(DataError, match=r"data.vocab_size=60000 cannot be trained .*<= \d+"):
        prepare_corpus(cfg)


@pytest.mark.parametrize("stride", [1, 3, 7, 10])
def test_strided_windows_score_every_token_once_with_the_stated_context(stride):
    tokens = np.arange(103, dtype=np.uint16)
    seen = []
    for x, y in eval_windows(tokens, 10, 4, stride=stride):
        assert x.shape == y.shape and x.shape[1] == 10
        for xs, ys in zip(x.numpy(), y.numpy()):
            for j in np.flatnonzero(ys != IGNORE):
                seen.append(ys[j])
                # Window-relative position j: j + 1 tokens of context; the first window
                # is the only one allowed less than seq_len - stride.
                assert j + 1 >= 10 - stride or xs[0] == 0
    assert seen == list(range(1, 103))


def test_stride_larger_than_the_window_is_one_clear_error():
    with pytest.raises(DataError, match="stride=11: must be in 1..seq_len=10"):
        next(eval_windows(np.arange(50, dtype=np.uint16), 10, 2, stride=11))
