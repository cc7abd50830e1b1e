"""Prefill against the matrix peak (analysis/prefill.py): the FLOPs counted, and the peak's
product sized to the GEMM's speed."""

import torch


def test_prefill_flops_counted_by_hand(tiny_config):
    """T = 10 tokens on the 4-block model (d 32, 4 heads of 8, kv 2 x 8, I 64, V 97)."""
    from tinyskip.analysis.prefill import prefill_flops
    from tinyskip.model.transformer import Transformer

    block = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64       # multiply-adds per token
    attention = 2 * (10 * 10 / 2) * 32                          # scores and sum, causal
    assert prefill_flops(Transformer(tiny_config()), 10) == 2 * (4 * (10 * block + attention)
                                                                 + 97 * 32)


def test_the_matrix_peak_grows_its_product_only_until_one_call_is_long_enough():
    """n doubles from 256 while a product takes under call_s: a slow GEMM (bf16 on a CPU
    without AVX512-BF16) is measured on a smaller product, not for minutes at n_max."""
    from torch.utils.flop_counter import FlopCounterMode

    from tinyskip.runtime import matrix_peak

    def products(**kw) -> float:      # how many 256^3 products' worth of FLOPs it ran
        with FlopCounterMode(display=False) as counter:
            assert matrix_peak(torch.device("cpu"), torch.float32, reps=3, **kw) > 0
        return counter.get_total_flops() / (2 * 256 ** 3)

    # Stopping at once: 2 calls to size it up, 5 warm-up calls, 3 timed.
    assert products(n_max=1024, call_s=0.0) == 10
    # Never long enough: 256 and 512 sized up (2 calls each); n_max is not timed first,
    # so 1024 takes its setup call, 5 warm-up calls and 3 timed.
    assert products(n_max=1024, call_s=float("inf")) == 2 + 2 * 8 + 9 * 64
