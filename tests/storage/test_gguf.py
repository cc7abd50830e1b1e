"""GGUF files: a tiny Llama written here with the gguf package's own writer, in
llama.cpp's layout (its tensor names, its reordering of the query and key rows, a
byte-level BPE tokenizer in the file), loaded through ``model.path=FILE.gguf``."""

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tinyskip.decode import generate  # noqa: E402
from tinyskip.storage.gguf import GGUFError, gguf_folder  # noqa: E402
from tinyskip.storage.hf_llama import HFTokenizer, load_hf_llama  # noqa: E402

BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}


def llama_cpp_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q_proj / k_proj rows: each head's two rotary
    halves interleaved, (heads, 2, hd/2, in) -> (heads, hd/2, 2, in)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2) \
        .reshape(w.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the transformers model, the GGUF file, the tokenizer's vocabulary)."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["he", "Ġt", "Ġthe", "<|endoftext|>"]
    merges = ["h e", "Ġ t", "Ġt he"]
    eos = len(tokens) - 1
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=10000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False, bos_token_id=eos,
                                   eos_token_id=eos)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    for name, t in hf.state_dict().items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            if module == "self_attn.q_proj":
                t = llama_cpp_order(t, 4)
            elif module == "self_attn.k_proj":
                t = llama_cpp_order(t, 2)
            gname = f"blk.{i}.{BLOCK[module]}.{kind}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        w.add_tensor(gname, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, path, tokens


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSKIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_llama_gives_the_logits_and_greedy_tokens_of_the_model_written(tiny):
    hf, path, _ = tiny
    model, folder = load_hf_llama(str(path))
    ids = torch.tensor([[5, 80, 200, 258, 7, 7, 31]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=1e-5)
        want = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert generate(model, ids, 10).tokens[0] == want
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_the_tokenizer_comes_from_the_file_with_its_own_rules(tiny, cache):
    hf, path, tokens = tiny
    model, folder = load_hf_llama(str(path))
    tok = HFTokenizer(folder, model.config)
    ids = tok.encode("the hehe")
    # Byte-level BPE as the file's merges build it ("Ġhe" is no token), and no BOS: the
    # file says add_bos_token false.
    assert [tokens[i] for i in ids] == ["t", "he", "Ġ", "he", "he"]
    assert tok.decode(ids) == "the hehe"
    assert tok.stop_ids() == {len(tokens) - 1}


def test_the_conversion_is_cached_and_a_bad_file_leaves_nothing(tiny, cache, tmp_path):
    _, path, _ = tiny
    first = gguf_folder(str(path))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert gguf_folder(str(path)) == first                          # converted once
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        gguf_folder(str(bad))
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [first.name]


def _bad_gguf(path, arch="llama", drop=None, f64=False):
    """A one-tensor GGUF that is wrong in one way."""
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    for key, add in [("block_count", w.add_block_count), ("head_count", w.add_head_count),
                     ("embedding_length", w.add_embedding_length)]:
        if key != drop:
            add(4 if key != "embedding_length" else 8)
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float64 if f64 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind,message", [
    ("gpt2", "architecture 'gpt2'; tinyskip reads llama GGUF files"),
    ("no-heads", "has no llama.attention.head_count in its metadata"),
    ("f64", "tensor output_norm.weight is F64, a type the gguf reader cannot dequantise"),
    ("truncated", "is not a GGUF file"),
])
def test_a_gguf_tinyskip_cannot_read_is_one_line_and_leaves_nothing(tiny, cache, tmp_path,
                                                                    kind, message):
    path = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        path.write_bytes(tiny[1].read_bytes()[:1000])
    else:
        _bad_gguf(path, arch="gpt2" if kind == "gpt2" else "llama",
                  drop="head_count" if kind == "no-heads" else None, f64=kind == "f64")
    with pytest.raises(GGUFError, match=message) as e:
        gguf_folder(str(path))
    assert "\n" not in str(e.value)
    assert not any((cache / "gguf").iterdir())
