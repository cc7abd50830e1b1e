"""The hand-written one-row products (model/cpu_matvec.cpp): against a float reference,
every vector loop this CPU runs (AVX-512, AVX2) against the portable one, and
decoding actually running through them."""

import importlib.util
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinyskip.decode import generate
from tinyskip.decode.steps import Steps
from tinyskip.model import cpu_matvec
from tinyskip.model.quantize import int8_rows, quantize_int8
from tinyskip.model.transformer import Transformer

TOOLS = platform.machine().lower() in ("x86_64", "amd64") and \
    shutil.which(os.environ.get("CXX", "c++")) is not None and \
    (shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None)
pytestmark = pytest.mark.skipif(not TOOLS, reason="not x86, or no C++ compiler or ninja")


@pytest.fixture(scope="module", autouse=True)
def built():
    # With the tools there, a kernel that does not build is a failure, not a skip.
    assert cpu_matvec.load(), "cpu_matvec.cpp did not build (see the warning)"


def loops(dtype: torch.dtype) -> list[str]:
    """The loops this CPU runs for weights of ``dtype``, fastest first."""
    bf16, int8 = torch.ops.tinyskip.loops()
    return bf16 if dtype == torch.bfloat16 else int8


def fast(dtype: torch.dtype) -> bool:
    return loops(dtype)[0] != "portable"


def runs(loop: str, dtype: torch.dtype) -> None:
    if loop != "best" and loop not in loops(dtype):
        pytest.skip(f"this CPU has no {loop} loop")


def cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_fast_loops_are_the_ones_this_cpu_can_run():
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert loops(torch.int8) == ["avx512"] * ({"avx512f", "avx512bw", "avx512vl"} <= flags) + \
        ["avx2"] * ("avx2" in flags) + ["portable"]
    assert loops(torch.bfloat16) == \
        ["avx512"] * ({"avx512f", "avx512bw", "avx512_bf16"} <= flags) + \
        ["avx2"] * ({"avx2", "fma"} <= flags) + ["portable"]


def test_a_loop_the_product_lacks_is_refused_by_name():
    # No product has an 'sse' loop; AVX-512 and AVX2 ones only where the CPU does.
    x, w = torch.randn(1, 1, 32).bfloat16(), torch.randn(4, 32).bfloat16()
    with pytest.raises(RuntimeError, match=r"loop='sse' is not one this product has on "
                                           r"this CPU \((avx512, )?(avx2, )?portable, best\)"):
        torch.ops.tinyskip.matvec_bf16(x, w, "sse")
    for loop in {"avx512", "avx2"} - set(loops(torch.bfloat16)):
        with pytest.raises(RuntimeError, match=f"loop='{loop}' is not one this product has"):
            torch.ops.tinyskip.matvec_bf16(x, w, loop)
    q, s = int8_rows(torch.randn(4, 32))
    for loop in {"avx512", "avx2", "sse"} - set(loops(torch.int8)):
        with pytest.raises(RuntimeError, match=f"loop='{loop}' is not one this product has"):
            torch.ops.tinyskip.matvec_int8(x, q, s.bfloat16(), loop)


# Widths with and without a tail (K % 32 below and above 16, K % 16), rows with and without
# a partial block (N % 4), one sequence, three, and seven (a group of four rows of x and one
# of three).
BF16_LOOPS = ["best", "avx512", "avx2", "portable"]
INT8_LOOPS = ["best", "avx512", "avx2", "portable"]
SHAPES = [(1, 576, 192), (1, 100, 7), (3, 120, 6), (3, 1536, 576), (2, 32, 1), (1, 40, 4097),
          (2, 8, 5), (7, 130, 5)]


@pytest.mark.parametrize("loop", BF16_LOOPS)
@pytest.mark.parametrize("B,K,N", SHAPES)
def test_bf16_products_match_fp32_products_of_the_same_bf16_numbers(B, K, N, loop):
    runs(loop, torch.bfloat16)
    torch.manual_seed(0)
    x = torch.randn(B, 1, K).bfloat16()
    w = torch.randn(N, K).bfloat16()
    y = torch.ops.tinyskip.matvec_bf16(x, w, loop)
    assert y.shape == (B, 1, N) and y.dtype == torch.bfloat16
    # Products of bf16 numbers are exact in fp32: what is left is summation order and the
    # output's rounding to bf16 (2^-8 relative).
    assert rel_error(y, F.linear(x.float(), w.float())) < 4e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loop", INT8_LOOPS)
@pytest.mark.parametrize("B,K,N", SHAPES + [(1, 1100, 9)])
def test_int8_products_apply_each_rows_scale(B, K, N, loop, dtype):
    runs(loop, torch.int8)
    torch.manual_seed(0)
    x = torch.randn(B, 1, K).to(dtype)
    # Rows of very different scales: a scale applied to the wrong row shows.
    q, s = int8_rows(torch.randn(N, K) * torch.logspace(-3, 1, N)[:, None])
    s = s.to(dtype)
    y = torch.ops.tinyskip.matvec_int8(x, q, s, loop)
    assert y.shape == (B, 1, N) and y.dtype == dtype
    ref = F.linear(x.float(), q.float()) * s.float()
    # x is rounded to int16, each entry by at most half a step of its row's largest entry
    # / 32767 (1% more for the fp32 rounding of x / step), so an output moves by at most
    # that times sum |q| * scale of its weight row (x rounded to int8 would move it 129
    # times as far); the fp32 reference's own summation adds 1e-6 of sum |x q| * scale,
    # and a bf16 output rounds by 2^-8 of itself on top.
    half_step = x.float().abs().amax(dim=-1, keepdim=True) / 32767 / 2
    magnitude = F.linear(x.float().abs(), q.float().abs()) * s.float()
    bound = half_step * q.float().abs().sum(dim=-1) * s.float() * 1.01 + 1e-6 * magnitude
    if dtype == torch.bfloat16:
        bound = bound * (1 + 2 ** -8) + 2 ** -8 * ref.abs()
    assert ((y.float() - ref).abs() <= bound).all()


@pytest.mark.parametrize("loop", INT8_LOOPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,K,N", [(1, 576, 9), (3, 1541, 5), (7, 130, 5)])
def test_int8_products_are_x_rounded_to_int16_then_exact_integer_sums(B, K, N, loop, dtype):
    """Every int8 loop to the bit: each row of x rounded to int16 at 32767 / its largest
    |entry| (to nearest, ties to even), the integer sum against W, times x's scale and W's
    in fp32, rounded to x's dtype."""
    runs(loop, torch.int8)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, K, generator=g) * 3).to(dtype)
    if dtype == torch.float32:      # a row whose scale is 1: its halves are ties
        x[0, :8] = torch.tensor([32767, 2.5, -3.5, 0.5, 1.5, -0.5, -2.5, 4.5])
    q, s = int8_rows(torch.randn(N, K, generator=g))
    s = s.to(dtype)
    y = torch.ops.tinyskip.matvec_int8(x, q, s, loop)
    amax = x.float().abs().amax(dim=1)
    x_scale = torch.where(amax > 0, amax / 32767, torch.ones(()))
    x16 = torch.round(x.float() * (1 / x_scale)[:, None]).clamp(-32767, 32767).long()
    total = x16 @ q.long().T                                               # (B, N), exact
    expected = (total.float() * x_scale[:, None] * s.float()).to(dtype)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("loop", ["avx512", "avx2"])
@pytest.mark.parametrize("B,K,N", SHAPES + [(1, 1100, 9)])
def test_int8_vector_loops_sum_exactly_what_the_portable_one_sums(B, K, N, loop):
    # All add integer products exactly (int32 in chunks of 512 columns, then int64), so
    # they agree to the bit, across chunk boundaries (K = 1100) and tails; at the largest
    # products (+-32767 x +-127 in every column) too.
    runs(loop, torch.int8)
    torch.manual_seed(0)
    x = torch.randn(B, 1, K) * 100
    x[0, 0, :] = 5.0 * torch.tensor([1.0, -1.0]).repeat(K)[:K]      # every entry at the row's max
    q, s = int8_rows(torch.randn(N, K))
    q[0] = torch.where(x[0, 0] > 0, 127, -127).to(torch.int8)
    vector = torch.ops.tinyskip.matvec_int8(x, q, s, loop)
    assert torch.equal(vector, torch.ops.tinyskip.matvec_int8(x, q, s, "portable"))


def test_two_threads_split_the_rows_and_give_what_one_thread_gives():
    """Every loop's rows are split between threads in blocks of 4 (the tests otherwise run
    on one thread, where one block range covers them all): the same bits either way."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 1, 120).bfloat16(), torch.randn(1030, 120).bfloat16()
    q, s = int8_rows(w.float())
    products = [lambda loop=loop: torch.ops.tinyskip.matvec_bf16(x, w, loop)
                for loop in loops(torch.bfloat16)] + \
               [lambda loop=loop: torch.ops.tinyskip.matvec_int8(x, q, s.bfloat16(), loop)
                for loop in loops(torch.int8)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [product() for product in products]
        torch.set_num_threads(2)
        two = [product() for product in products]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_a_nan_in_a_row_of_x_makes_that_rows_int8_outputs_nan_and_no_other():
    x = torch.randn(2, 1, 64).bfloat16()
    x[1, 0, 5] = float("nan")
    q, s = int8_rows(torch.randn(8, 64))
    y = torch.ops.tinyskip.matvec_int8(x, q, s.bfloat16())
    assert y[1].isnan().all() and not y[0].isnan().any()


def test_an_int8_draft_vocabulary_head_keeps_each_rows_scale_through_the_kernel(tiny_config):
    from tinyskip.model.exits import ExitHead

    torch.manual_seed(0)
    model = quantize_int8(Transformer(tiny_config()).to(torch.bfloat16).eval())
    cpu_matvec.enable_for(model)
    ids = torch.tensor([3, 17, 40, 41, 96])
    h = torch.randn(1, 1, 32).bfloat16()
    with torch.no_grad(), torch.profiler.profile() as prof:
        whole = ExitHead(model).logits(h, 4)
        part = ExitHead(model, ids).logits(h, 4)
    if fast(torch.int8):
        assert any(e.key == "tinyskip::matvec_int8" for e in prof.key_averages())
    torch.testing.assert_close(part, whole[..., ids])


def calls(model: Transformer, compile: bool) -> tuple[list[int], dict[str, int]]:
    """Greedy tokens of a short generation, and how often each tinyskip op ran in it."""
    steps = Steps(model, compile=compile)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    generate(model, prompt, 4, steps=steps)             # compiles, if it does
    with torch.profiler.profile() as prof:
        tokens = generate(model, prompt, 4, steps=steps).tokens[0]
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("tinyskip::")}
    return tokens, counts


@pytest.mark.parametrize("quantize", [False, True])
def test_decoding_bf16_and_int8_weights_on_the_cpu_runs_their_steps_through_the_kernels(
        tiny_config, quantize):
    if not fast(torch.int8 if quantize else torch.bfloat16):
        pytest.skip("this CPU has no vector loop for these kernels")
    torch.manual_seed(0)
    model = Transformer(tiny_config()).to(torch.bfloat16).eval()
    if quantize:
        quantize_int8(model)
    op = "tinyskip::matvec_int8" if quantize else "tinyskip::matvec_bf16"
    per_step = 7 * model.num_layers + 1                 # each projection of each block, the head
    eager, eager_calls = calls(model, compile=False)
    compiled, compiled_calls = calls(model, compile=True)
    # The prefill (5 rows, at most MAX_ROWS) and each of the 3 steps after it.
    assert eager_calls.get(op) == compiled_calls.get(op) == 4 * per_step
    assert compiled == eager


@pytest.mark.parametrize("quantize", [False, True])
def test_fp32_activations_keep_their_other_paths(tiny_config, quantize):
    # int8 weights in an fp32 model included: the kernel would round x to int16.
    model = Transformer(tiny_config()).eval()
    if quantize:
        quantize_int8(model)
    _, counts = calls(model, compile=False)
    assert counts == {}


def test_products_that_need_a_gradient_keep_their_other_paths(tiny_config):
    model = Transformer(tiny_config()).to(torch.bfloat16)
    cpu_matvec.enable_for(model)
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    assert not cpu_matvec.takes(x, model.lm_head.weight, None)      # grad mode on
    with torch.no_grad():
        assert cpu_matvec.takes(x, model.lm_head.weight, None) == fast(torch.bfloat16)


def test_a_non_contiguous_weight_keeps_its_other_path(tiny_config):
    # The kernels read W row by row: a transposed view would fail inside them.
    model = Transformer(tiny_config()).to(torch.bfloat16)
    cpu_matvec.enable_for(model)
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    w = torch.randn(32, 48, dtype=torch.bfloat16).t()                  # (48, 32), not contiguous
    with torch.no_grad():
        assert not cpu_matvec.takes(x, w, None)
        assert cpu_matvec.takes(x, w.contiguous(), None) == fast(torch.bfloat16)



def test_more_than_max_rows_keep_their_other_path(tiny_config):
    # A long prefill is a matrix product: ATen's GEMM gains there, measured (cpu_matvec.py).
    model = Transformer(tiny_config()).to(torch.bfloat16)
    cpu_matvec.enable_for(model)
    w = model.lm_head.weight
    rows = cpu_matvec.MAX_ROWS
    with torch.no_grad():
        assert not cpu_matvec.takes(torch.randn(1, rows + 1, 32, dtype=torch.bfloat16), w, None)
        assert not cpu_matvec.takes(torch.randn(2, rows, 32, dtype=torch.bfloat16), w, None)
        assert cpu_matvec.takes(torch.randn(1, rows, 32, dtype=torch.bfloat16), w, None) == \
            fast(torch.bfloat16)
        # One row per sequence (decoding steps) at any batch.
        assert cpu_matvec.takes(torch.randn(16, 1, 32, dtype=torch.bfloat16), w, None) == \
            fast(torch.bfloat16)
