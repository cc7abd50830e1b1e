"""The compiled one-token step's levers: what they change in the generated code, that
they compute what the eager ops compute, and the benchmark's measurement of each."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from tinyskip.analysis.engine_levers import LEVERS, format_levers, step_levers
from tinyskip.model.kernels import DECODE_KERNELS, Kernels, linear, one_query_attention


def _external_calls(model, gemv: bool, attention: bool) -> set[str]:
    """The ATen kernels the compiled one-token step calls out to (C++ wrapper)."""
    cache = model.new_cache(1, 16)

    kernels = Kernels(gemv, attention)

    def step(tok, pos):
        h = model.run_layers(model.embed(tok), 0, model.num_layers, cache, pos, kernels=kernels)
        return model.head(h, kernels)

    try:
        torch._dynamo.reset()
        fn = torch.compile(step, fullgraph=True, options={"cpp_wrapper": True})
        with torch.no_grad():
            _, code = run_and_get_code(fn, torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]))
    finally:
        torch._dynamo.reset()
    return set(re.findall(r"aoti_torch_cpu_(\w+)", "\n".join(code)))


@pytest.mark.slow
def test_the_compiled_one_token_step_calls_no_external_gemm_or_attention_kernel(tiny_model):
    assert _external_calls(tiny_model, True, True) == set()
    off = _external_calls(tiny_model, False, False)
    assert "mm_out" in off and any("scaled_dot_product" in c for c in off)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (6, 1)])
def test_one_query_attention_equals_sdpa_with_gqa(n_heads, n_kv):
    torch.manual_seed(0)
    B, S, hd = 2, 11, 8
    q = torch.randn(B, n_heads, 1, hd)
    k, v = torch.randn(B, n_kv, S, hd), torch.randn(B, n_kv, S, hd)
    mask = torch.arange(S)[None, :] <= 6                       # (1, S): positions 0..6
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv != n_heads)
    torch.testing.assert_close(one_query_attention(q, k, v, mask), ref, atol=1e-6, rtol=1e-5)


def test_the_linear_lever_is_the_eager_product():
    """Outside a compiled graph ``linear`` is F.linear (1-D inputs included); compiled,
    its multiply-and-sum computes the same product."""
    x, w = torch.randn(3, 1, 5), torch.randn(7, 5)
    assert torch.equal(linear(x, w), F.linear(x, w))
    assert torch.equal(linear(x[0, 0], w), F.linear(x[0, 0], w))
    compiled = torch.compile(linear, fullgraph=True)
    torch.testing.assert_close(compiled(x, w), F.linear(x, w), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_step_levers_measures_every_lever_and_leaves_decoding_as_it_was(tiny_model):
    res = step_levers(tiny_model, 5, 10, reps=2)
    assert DECODE_KERNELS == Kernels(products_in_graph=True, attention_in_graph=True)
    assert list(res["levers"]) == [name for name, *_ in LEVERS]
    assert all(s > 0 for s in res["levers"].values()) and res["floor"] > 0
    table = format_levers(res)
    assert table.count("\n") == len(LEVERS) + 2 and "floor" in table
