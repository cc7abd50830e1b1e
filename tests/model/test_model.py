import pytest
import torch

from tinyskip.model.kv_cache import CacheError, KVCache
from tinyskip.model.transformer import LayerIndexError, Transformer


def decode_token_by_token(model, ids, depth):
    cache = KVCache(model.config, batch_size=ids.shape[0])
    out = []
    for t in range(ids.shape[1]):
        h = model.embed(ids[:, t:t + 1])
        h = model.run_layers(h, 0, depth, cache=cache, pos=t)
        out.append(model.head(h))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("depth", [4, 2])
def test_cached_decoding_equals_uncached_forward(tiny_model, depth):
    ids = torch.randint(0, 97, (2, 20))
    full = tiny_model(ids, exits=[depth])[0]
    cached = decode_token_by_token(tiny_model, ids, depth)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_then_decode_equals_uncached(tiny_model):
    ids = torch.randint(0, 97, (1, 16))
    cache = KVCache(tiny_model.config)
    h = tiny_model.run_layers(tiny_model.embed(ids[:, :9]), 0, 4, cache, 0)
    first = tiny_model.head(h)
    h = tiny_model.run_layers(tiny_model.embed(ids[:, 9:]), 0, 4, cache, 9)
    chunked = torch.cat([first, tiny_model.head(h)], dim=1)
    torch.testing.assert_close(chunked, tiny_model(ids)[0], atol=1e-5, rtol=1e-5)


def test_stale_cache_entries_past_the_query_are_masked(tiny_model):
    # A rejected speculative draft leaves entries at positions 10..13; re-decoding from
    # position 10 must not see them (no cropping).
    ids = torch.randint(0, 97, (1, 14))
    cache = KVCache(tiny_model.config)
    tiny_model.run_layers(tiny_model.embed(ids), 0, 4, cache, 0)
    other = torch.randint(0, 97, (1, 3))
    h = tiny_model.run_layers(tiny_model.embed(other), 0, 4, cache, 10)
    reference = tiny_model(torch.cat([ids[:, :10], other], dim=1))[0][:, 10:]
    torch.testing.assert_close(tiny_model.head(h), reference, atol=1e-5, rtol=1e-5)


def test_last_exit_is_the_normal_output_and_all_exits_share_the_head(tiny_model):
    ids = torch.randint(0, 97, (2, 12))
    exits = tiny_model(ids, exits=range(1, 5))
    assert exits.shape == (4, 2, 12, 97)
    torch.testing.assert_close(exits[-1], tiny_model(ids)[0])
    h = tiny_model.embed(ids)
    for layer in range(4):
        h = tiny_model.run_layers(h, layer, layer + 1)
        torch.testing.assert_close(exits[layer], tiny_model.head(h), atol=1e-5, rtol=1e-5)


def test_exits_differ_between_layers(tiny_model):
    exits = tiny_model(torch.randint(0, 97, (1, 8)), exits=[1, 4])
    assert not torch.allclose(exits[0], exits[1])


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tiny_config, tied):
    model = Transformer(tiny_config(tie_word_embeddings=tied))
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    names = set(dict(model.named_parameters()))
    assert ("lm_head.weight" in names) == (not tied)
    assert {"embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.3.mlp.down_proj.weight", "layers.1.input_layernorm.weight",
            "layers.1.post_attention_layernorm.weight"} <= names


def test_causality(tiny_model):
    ids = torch.randint(0, 97, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 97
    a, b = tiny_model(ids, exits=range(1, 5)), tiny_model(changed, exits=range(1, 5))
    torch.testing.assert_close(a[:, :, :10], b[:, :, :10])
    assert not torch.allclose(a[:, :, 10:], b[:, :, 10:])


def test_layerdrop_probability_one_is_identity_for_that_block(tiny_model):
    ids = torch.randint(0, 97, (3, 10))
    tiny_model.train()
    dropped = tiny_model(ids, exits=range(1, 5), layer_drop=[0.0, 1.0, 0.0, 0.0])
    tiny_model.eval()
    h0 = tiny_model.run_layers(tiny_model.embed(ids), 0, 1)
    torch.testing.assert_close(dropped[1], tiny_model.head(h0))      # block 1 skipped
    h = tiny_model.run_layers(h0, 2, 4)
    torch.testing.assert_close(dropped[3], tiny_model.head(h), atol=1e-5, rtol=1e-5)


def test_layerdrop_is_per_sample(tiny_model):
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (64, 6))
    tiny_model.train()
    out = tiny_model(ids, exits=[1], layer_drop=[0.5, 0.0, 0.0, 0.0])[0]
    identity = tiny_model.head(tiny_model.embed(ids))
    same = torch.isclose(out, identity).flatten(1).all(dim=1)
    assert 10 < int(same.sum()) < 54          # some rows dropped block 0, others ran it


def test_layerdrop_has_no_effect_in_eval(tiny_model):
    ids = torch.randint(0, 97, (2, 10))
    a = tiny_model(ids, exits=range(1, 5), layer_drop=[1.0] * 4)
    b = tiny_model(ids, exits=range(1, 5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_rejects_positions_beyond_its_size(tiny_model):
    cache = KVCache(tiny_model.config, max_seq_len=8)
    h = tiny_model.embed(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(CacheError, match="position 8 is beyond the cache size 8"):
        tiny_model.run_layers(h, 0, 4, cache, 8)
    with pytest.raises(CacheError, match="exceeds the model's context"):
        KVCache(tiny_model.config, max_seq_len=65)


def test_bad_layer_ranges_are_refused(tiny_model):
    h = tiny_model.embed(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(LayerIndexError, match=r"\[0, 5\) is outside"):
        tiny_model.run_layers(h, 0, 5)
    with pytest.raises(LayerIndexError, match="exit 5 is outside 1..4"):
        tiny_model(torch.zeros(1, 2, dtype=torch.long), exits=[5])


@pytest.mark.parametrize("native", [False, True])
def test_bf16_products_on_a_cpu_without_onednn_bf16_run_in_fp32_and_round_once(native,
                                                                               monkeypatch):
    """Where ATen's bf16 GEMM would be a scalar loop (``CPU_BF16_GEMM`` false: an AVX2-only
    CPU), a bf16 product of many rows (prefill) widens to fp32 and rounds its output once;
    elsewhere it stays ATen's bf16 product."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tinyskip.model import kernels

    class Dtypes(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm,
                                       torch.ops.aten.bmm):
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(kernels, "CPU_BF16_GEMM", native)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 64, generator=g).bfloat16()
    w = torch.randn(48, 64, generator=g).bfloat16()
    with Dtypes():
        y = kernels.linear(x, w, in_graph=False)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 32, 48)
    assert Dtypes.seen == [torch.bfloat16 if native else torch.float32]
    if not native:
        assert torch.equal(y, torch.nn.functional.linear(x.float(), w.float()).bfloat16())
