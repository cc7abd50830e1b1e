import pytest

from tinyskip.config import DataConfig, UserError
from tinyskip.storage.data import load_lines, load_tokenizer, train_tokenizer
from tinyskip.storage.sentencepiece_json import to_tokenizer

pytest.importorskip("tokenizers")

EDGE = ["", " ", "a", "  lead and trail  ", "a  b   c", "In 1994 , the band", "12,345.67 @-@ km",
        "日本語 テキスト", "x😀y 😀😀 z", "tab\there", "ÀÉÎ café naïve"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_ids_and_text_equal_sentencepieces(wikitext_path, tmp_path, model_type):
    cfg = DataConfig(path=wikitext_path, max_rows=1000, vocab_size=300,
                     tokenizer_model_type=model_type)
    lines, _ = load_lines(cfg)
    train_tokenizer(lines["train"], cfg, tmp_path / "sp.model")
    sp, tok = load_tokenizer(tmp_path / "sp.model"), to_tokenizer(tmp_path / "sp.model")
    texts = EDGE + [line.strip() for line in lines["validation"] if line.strip()]
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text).ids == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == sp.decode(ids), text


def test_a_file_that_is_not_a_sentencepiece_model_is_one_line(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(UserError, match=r"bad.model is not a SentencePiece model \("):
        to_tokenizer(tmp_path / "bad.model")
