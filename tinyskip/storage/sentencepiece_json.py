"""A SentencePiece model as a ``tokenizers`` tokenizer (tokenizer.json), without protobuf.

transformers and tokenizers convert a SentencePiece file through protobuf, which an
install with ``.[hf]`` lacks, so a folder holding only tokenizer.model does not load
with ``AutoTokenizer``. The model file is a small protobuf message: this reads the few
fields the conversion needs (pieces, model type, normaliser flags) from its wire format
and builds the equivalent tokenizer. Ids and decoded text equal SentencePiece's (tested on
WikiText-2 and edge cases), except for the literal strings of special tokens ("</s>"),
which Hugging Face tokenizers match as special tokens.

What tinyskip trains is supported (unigram or BPE, identity normalisation, no byte
fallback, no user-defined symbols); anything else is refused, never converted wrongly.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

from ..config import UserError

# Field numbers and enum values of sentencepiece_model.proto.
MODEL_PIECES, MODEL_TRAINER, MODEL_NORMALIZER = 1, 2, 3
PIECE_TEXT, PIECE_SCORE, PIECE_TYPE = 1, 2, 3
TRAINER_MODEL_TYPE, TRAINER_WHITESPACE_AS_SUFFIX, TRAINER_BYTE_FALLBACK = 3, 24, 35
NORM_CHARSMAP, NORM_DUMMY_PREFIX, NORM_REMOVE_EXTRA_SPACES, NORM_ESCAPE_SPACES = 2, 3, 4, 5
UNIGRAM, BPE = 1, 2
NORMAL, UNKNOWN, CONTROL = 1, 2, 3
SPACE = "\u2581"      # SentencePiece's visible space


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _message(buf: bytes) -> dict[int, list]:
    """Field number -> values of a protobuf message (varints as ints, the rest as bytes)."""
    fields: dict[int, list] = defaultdict(list)
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        fields[key >> 3].append(value)
    return fields


def _first(fields: dict[int, list], number: int, default):
    return fields[number][0] if fields.get(number) else default


def to_tokenizer(model_file: Path):
    """The ``tokenizers.Tokenizer`` equivalent to a SentencePiece model file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE as BPEModel, Unigram

    def refuse(what: str) -> UserError:
        return UserError(f"{model_file}: {what} is not supported by the tokenizer.json export")

    try:
        top = _message(Path(model_file).read_bytes())
        trainer = _message(_first(top, MODEL_TRAINER, b""))
        norm = _message(_first(top, MODEL_NORMALIZER, b""))
        pieces = []
        for raw in top[MODEL_PIECES]:
            p = _message(raw)
            pieces.append((p[PIECE_TEXT][0].decode("utf-8"),
                           struct.unpack("<f", _first(p, PIECE_SCORE, bytes(4)))[0],
                           _first(p, PIECE_TYPE, NORMAL)))
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise UserError(f"{model_file} is not a SentencePiece model ({e})")
    model_type = _first(trainer, TRAINER_MODEL_TYPE, UNIGRAM)
    if model_type not in (UNIGRAM, BPE):
        raise refuse(f"model type {model_type} (only unigram and BPE)")
    if _first(trainer, TRAINER_BYTE_FALLBACK, 0) or _first(trainer, TRAINER_WHITESPACE_AS_SUFFIX, 0):
        raise refuse("byte fallback or whitespace as suffix")
    if _first(norm, NORM_CHARSMAP, b""):
        raise refuse("a normalisation rule other than identity")
    odd = sorted({t for _, _, t in pieces} - {NORMAL, UNKNOWN, CONTROL})
    if odd:
        raise refuse(f"piece types {odd} (user-defined, byte or unused pieces)")
    unk = next(i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN)

    if model_type == UNIGRAM:
        model = Unigram([(text, score) for text, score, _ in pieces], unk_id=unk,
                        byte_fallback=False)
    else:
        # SentencePiece BPE merges the adjacent pair whose concatenation is the
        # highest-scoring piece: every split of a piece into two pieces is a merge,
        # ranked by the piece's score. Consecutive unknown characters become one <unk>.
        vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
        normal = {text for text, _, t in pieces if t == NORMAL}
        merges = sorted((-score, i, vocab[text[:k]], (text[:k], text[k:]))
                        for i, (text, score, t) in enumerate(pieces) if t == NORMAL
                        for k in range(1, len(text))
                        if text[:k] in normal and text[k:] in normal)
        model = BPEModel(vocab=vocab, merges=[m[-1] for m in merges],
                         unk_token=pieces[unk][0], fuse_unk=True)
    tok = Tokenizer(model)
    steps = []
    if _first(norm, NORM_REMOVE_EXTRA_SPACES, 1):      # strip, and collapse runs of spaces
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if _first(norm, NORM_DUMMY_PREFIX, 1):
        steps.append(normalizers.Prepend(SPACE))
    if _first(norm, NORM_ESCAPE_SPACES, 1):
        steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    # SentencePiece shows an unknown piece as " \u2047 " when decoding.
    undo = [decoders.Replace(pieces[unk][0], " \u2047 "), decoders.Replace(SPACE, " "),
            decoders.Fuse()]
    if _first(norm, NORM_DUMMY_PREFIX, 1):
        undo.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(undo)
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False)
                            for text, _, t in pieces if t in (UNKNOWN, CONTROL)])
    return tok
