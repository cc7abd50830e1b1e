"""WikiText-2 through ``datasets`` (or any text: a Hub dataset with a ``text`` column, or a
folder of ``train.txt``, ``validation.txt`` and ``test.txt``), a SentencePiece tokenizer,
cached token arrays, batches.

Each non-empty line of a split is encoded and followed by EOS (the line break is a
token the model predicts); blank lines are skipped. Word-level perplexity divides the
total NLL by the split's word count, so it is comparable across tokenizers: the
whitespace-separated words plus one line end per *non-empty* line (244,102 on
WikiText-2's test split). The published word-level convention also gives each blank line
an end-of-line word (245,569): tinyskip never models blank lines, so it does not count
them, which makes its perplexities slightly higher (ppl ** (244102 / 245569) is an
optimistic bound on the published-convention figure: it leaves out the blank lines' loss).

Caches live under ``DataConfig.cache_dir`` (default ``$TINYSKIP_CACHE`` or
``~/.cache/tinyskip``), keyed by the dataset fingerprint, the tokenizer settings (or
the tokenizer file's bytes) and ``CODE_VERSION``; each is written to a temporary folder
and renamed into place, so an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..atomic import make_dirs, publish_dir, publish_file, temp_dir
from ..config import DataConfig, UserError, first_line

# Bump when tokenisation or the array layout changes: it invalidates every cache.
CODE_VERSION = 1
SPLITS = ("train", "validation", "test")


class DataError(UserError):
    """The data or tokenizer cannot be prepared as configured."""


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("TINYSKIP_CACHE") or "~/.cache/tinyskip"
    return Path(root).expanduser()


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def text_files(path: str) -> Optional[dict[str, str]]:
    """A folder of plain text, one file per split (``train.txt``, ``validation.txt``,
    ``test.txt``), as ``{split: file}``; None for anything else. Such a folder has no
    configurations, so ``data.name`` does not apply to it."""
    if not os.path.isdir(path):
        return None
    files = {s: os.path.join(path, f"{s}.txt") for s in SPLITS}
    missing = [os.path.basename(f) for f in files.values() if not os.path.isfile(f)]
    if len(missing) == len(files):
        return None
    if missing:
        raise DataError(f"data.path={path!r} is a folder of plain text without {missing} "
                        "(give train.txt, validation.txt and test.txt)")
    return files


def load_lines(cfg: DataConfig) -> tuple[dict[str, list[str]], str]:
    """Rows of every split (as ``load_dataset(path, name)`` returns them, or a plain-text
    folder's lines: ``text_files``) and their fingerprint."""
    import datasets

    path = os.path.expanduser(cfg.path)
    if _is_local(path) and not os.path.isdir(path):
        raise DataError(f"data.path={cfg.path!r}: no such folder (give a local copy of the "
                        "dataset in the Hub's layout, a folder of train/validation/test .txt "
                        "files, or a Hub id such as Salesforce/wikitext)")
    files = text_files(path) if _is_local(path) else None
    try:
        ds = datasets.load_dataset("text", data_files=files) if files else \
            datasets.load_dataset(path, cfg.name)
    except Exception as e:  # datasets raises many types; all mean "cannot load this"
        raise DataError(f"cannot load data.path={cfg.path!r} data.name={cfg.name!r}: "
                        f"{first_line(e)}")
    missing = [s for s in SPLITS if s not in ds]
    if missing:
        raise DataError(f"data.path={cfg.path!r} has no split(s) {missing} (found {list(ds)})")
    lines = {s: ds[s]["text"][: cfg.max_rows] if cfg.max_rows else ds[s]["text"] for s in SPLITS}
    fingerprint = _digest(None if files else cfg.name, cfg.max_rows,
                          *(ds[s]._fingerprint for s in SPLITS))
    return lines, fingerprint


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def count_words(lines: list[str]) -> int:
    """Whitespace-separated words plus one line end per non-empty line (blank lines are
    not modelled, so not counted: see the module's docstring)."""
    return sum(len(line.split()) + 1 for line in lines if line.strip())


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place (a concurrent winner is kept)."""
    try:
        publish_dir(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def train_tokenizer(lines: list[str], cfg: DataConfig, out: Path) -> None:
    import sentencepiece as spm

    sentences = [line.strip() for line in lines if line.strip()]
    make_dirs(out.parent)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prefix = os.path.join(tmp, "sp")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_prefix=prefix,
                vocab_size=cfg.vocab_size, model_type=cfg.tokenizer_model_type,
                character_coverage=1.0, normalization_rule_name="identity",
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
                num_threads=2, minloglevel=2)
        except RuntimeError as e:
            # Keep sentencepiece's sentence, drop its source-location prefix.
            msg = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]
            raise DataError(f"data.vocab_size={cfg.vocab_size} cannot be trained on this "
                            f"data: {msg}")
        publish_file(Path(prefix + ".model"), out)


def tokenizer_path(cfg: DataConfig, lines: dict[str, list[str]], fingerprint: str) -> Path:
    """The cached tokenizer for these settings, trained on the train split if missing."""
    key = _digest("tok", CODE_VERSION, fingerprint, cfg.vocab_size, cfg.tokenizer_model_type)
    path = cache_root(cfg) / "tokenizers" / f"{key}.model"
    if not path.exists():
        train_tokenizer(lines["train"], cfg, path)
    return path


@dataclass
class Corpus:
    """Token arrays of every split, the tokenizer they were made with, and word counts."""

    tokenizer_file: Path
    tokens: dict[str, np.ndarray]        # split -> (N,) memmap of token ids
    words: dict[str, int]
    vocab_size: int
    eos_id: int
    bos_id: int

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_file)


def load_tokenizer(path: Path | str):
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"tokenizer file {path} is not a SentencePiece model ({reason})")


def encode_lines(sp, lines: list[str]) -> np.ndarray:
    kept = [line.strip() for line in lines if line.strip()]
    ids = sp.encode(kept)
    eos = sp.eos_id()
    flat = [t for row in ids for t in (*row, eos)]
    dtype = np.uint16 if sp.get_piece_size() < 2 ** 16 else np.int32
    return np.asarray(flat, dtype=dtype)


def encode_text(encode_line, eos: int, text: str) -> list[int]:
    """Any text as the corpus is encoded (``encode_lines``): each line stripped and
    encoded by ``encode_line``, then EOS for each line break that ends a non-blank line;
    blank lines add nothing. Prompts and harness documents that span lines read to the
    model as its training text did."""
    lines = text.split("\n")
    ids: list[int] = []
    for i, line in enumerate(lines):
        if line.strip():
            ids += encode_line(line.strip())
            if i + 1 < len(lines):
                ids.append(eos)
    return ids


def prepare_corpus(cfg: DataConfig, tokenizer_file: Optional[Path | str] = None) -> Corpus:
    """Load (or build and cache) the tokenized splits.

    Without ``tokenizer_file`` the tokenizer is trained on the train split (cached);
    with one (a checkpoint's), the splits are tokenized with it.
    """
    lines, fingerprint = load_lines(cfg)
    tok = Path(tokenizer_file) if tokenizer_file else tokenizer_path(cfg, lines, fingerprint)
    sp = load_tokenizer(tok)
    key = _digest("arr", CODE_VERSION, fingerprint, hashlib.sha256(tok.read_bytes()).hexdigest())
    folder = cache_root(cfg) / "tokens" / key
    if not (folder / "meta.json").exists():
        tmp = temp_dir(folder.parent, ".tmp-")
        meta = {"dtype": None, "words": {}, "tokens": {}}
        for split in SPLITS:
            arr = encode_lines(sp, lines[split])
            arr.tofile(tmp / f"{split}.bin")
            meta["dtype"] = arr.dtype.name
            meta["words"][split] = count_words(lines[split])
            meta["tokens"][split] = int(arr.size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, folder)
    meta = json.loads((folder / "meta.json").read_text())
    tokens = {s: np.memmap(folder / f"{s}.bin", dtype=meta["dtype"], mode="r") for s in SPLITS}
    for split, arr in tokens.items():
        if arr.size < 2:
            raise DataError(f"split {split!r} of data.path={cfg.path!r} holds no text")
    return Corpus(tok, tokens, meta["words"], sp.get_piece_size(), sp.eos_id(), sp.bos_id())


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int,
              rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (x, y), each (B, T), drawn from a generator seeded by (seed, step).

    The draw depends only on (seed, step), so a resumed run sees the same data order,
    and data-parallel ranks take disjoint ``rows`` of the same global batch.
    """
    if tokens.size <= seq_len + 1:
        raise DataError(f"train.seq_len={seq_len} is longer than the split "
                        f"({tokens.size} tokens)")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.size - seq_len - 1, (batch_size,), generator=g)[rows]
    # (B, T+1) windows, then shift by one for the targets.
    win = torch.from_numpy(np.stack([tokens[s: s + seq_len + 1] for s in starts.tolist()])
                           .astype(np.int64))
    return win[:, :-1], win[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0,
                 stride: Optional[int] = None):
    """Yield (x, y) batches of windows that score every token after the first once.

    Without ``stride``: consecutive non-overlapping windows (a token's context is what
    precedes it in its window). With one: windows of seq_len every ``stride`` tokens, each
    scoring only its last ``stride`` targets (the first window scores all of its own), so
    every scored token sees at least seq_len - stride tokens of context; unscored targets
    are IGNORE (-100, cross-entropy's ignore_index).
    """
    if stride is not None:
        yield from _strided_windows(tokens, seq_len, batch_size, max_batches, stride)
        return
    n = (tokens.size - 1) // seq_len
    starts = list(range(0, n * seq_len, seq_len))
    tail = n * seq_len
    for b, i in enumerate(range(0, len(starts), batch_size)):
        if max_batches and b >= max_batches:
            return
        chunk = np.stack([tokens[s: s + seq_len + 1] for s in starts[i: i + batch_size]])
        win = torch.from_numpy(chunk.astype(np.int64))
        yield win[:, :-1], win[:, 1:]
    if not max_batches and tail < tokens.size - 1:
        # The remainder as one shorter window, so every token after the first is scored.
        win = torch.from_numpy(np.asarray(tokens[tail:], dtype=np.int64))[None]
        yield win[:, :-1], win[:, 1:]


IGNORE = -100


def _strided_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int,
                     stride: int):
    if not 1 <= stride <= seq_len:
        raise DataError(f"stride={stride}: must be in 1..seq_len={seq_len}")
    last = tokens.size - 1                   # targets are tokens 1..last
    T = min(seq_len, last)
    # Window starts 0, stride, 2*stride, ..., and one that ends exactly on the last target.
    starts = list(range(0, last - T + 1, stride))
    if starts[-1] + T < last:
        starts.append(last - T)
    scored_to = 0                            # targets up to this index are scored already
    rows = []
    for s in starts:
        win = np.asarray(tokens[s: s + T + 1], dtype=np.int64)
        y = win[1:].copy()
        y[: max(scored_to - s, 0)] = IGNORE  # (B, T) targets s+1..s+T; earlier ones done
        scored_to = s + T
        rows.append((win[:-1], y))
    for b, i in enumerate(range(0, len(rows), batch_size)):
        if max_batches and b >= max_batches:
            return
        chunk = rows[i: i + batch_size]
        yield (torch.from_numpy(np.stack([x for x, _ in chunk])),
               torch.from_numpy(np.stack([y for _, y in chunk])))
