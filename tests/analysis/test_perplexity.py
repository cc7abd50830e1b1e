import math

import numpy as np
import torch
import torch.nn.functional as F

from tinyskip.analysis.perplexity import exit_perplexities


def nll(model, window: np.ndarray) -> list[float]:
    """Summed NLL of a window's next tokens at every exit, in one uncached pass."""
    ids = torch.from_numpy(window.astype(np.int64))[None]
    logits = model(ids[:, :-1], exits=list(range(1, model.num_layers + 1)))
    return [F.cross_entropy(l[0], ids[0, 1:], reduction="sum").item() for l in logits]


@torch.no_grad()
def test_word_perplexity_is_exp_of_total_nll_over_words(tiny_model):
    tokens = np.random.default_rng(0).integers(0, 97, 61).astype(np.uint16)
    words = 17
    ev = exit_perplexities(tiny_model, tokens, words, seq_len=60)
    expected = nll(tiny_model, tokens)
    assert ev["tokens"] == 60
    for got, total in zip(ev["word_ppl"], expected):
        assert math.isclose(got, math.exp(total / words), rel_tol=1e-5)
    assert np.allclose(ev["loss"], [t / 60 for t in expected], rtol=1e-5)


@torch.no_grad()
def test_a_prefix_scores_its_share_of_the_words(tiny_model):
    """max_batches=1 of two windows of 10 scores 20 of the 60 predicted tokens, so a
    third of the split's words."""
    tokens = np.random.default_rng(1).integers(0, 97, 61).astype(np.uint16)
    words = 30
    ev = exit_perplexities(tiny_model, tokens, words, seq_len=10, batch_size=2, max_batches=1)
    expected = [a + b for a, b in zip(nll(tiny_model, tokens[:11]), nll(tiny_model, tokens[10:21]))]
    assert ev["tokens"] == 20
    for got, total in zip(ev["word_ppl"], expected):
        assert math.isclose(got, math.exp(total / (words * 20 / 60)), rel_tol=1e-5)


@torch.no_grad()
def test_agreement_with_the_last_exit_equals_a_hand_computation(tiny_model):
    tiny_model.layers[-1].mlp.down_proj.weight.mul_(300.0)     # a last block that changes things
    tokens = np.random.default_rng(2).integers(0, 97, 41).astype(np.uint16)
    ev = exit_perplexities(tiny_model, tokens, 10, seq_len=40)
    ids = torch.from_numpy(tokens.astype(np.int64))[None, :-1]
    logits = tiny_model(ids, exits=list(range(1, tiny_model.num_layers + 1)))   # (L, 1, 40, V)
    top = logits[-1].argmax(-1)
    for e in range(tiny_model.num_layers):
        agree = (logits[e].argmax(-1) == top).float().mean().item()
        p_top = torch.softmax(logits[e], -1).gather(-1, top[..., None]).mean().item()
        confidence = torch.softmax(logits[e], -1).max(-1).values.mean().item()
        assert math.isclose(ev["agreement"][e], agree, rel_tol=1e-6)
        assert math.isclose(ev["p_last_top"][e], p_top, rel_tol=1e-5)
        assert math.isclose(ev["confidence"][e], confidence, rel_tol=1e-5)
        assert ev["confidence"][e] >= ev["p_last_top"][e]
    assert ev["agreement"][-1] == 1.0 and 0 < ev["agreement"][0] < 1


@torch.no_grad()
def test_strided_evaluation_scores_each_token_once_in_its_window(tiny_model):
    """41 tokens, windows of 20 every 10: window 0 scores targets 1..20, the window from
    10 targets 21..30 (10+ tokens of context), the one from 20 targets 31..40; agreement
    and the last exit's argmax probability count those scored positions only."""
    tiny_model.layers[-1].mlp.down_proj.weight.mul_(300.0)     # a last block that changes things
    tokens = np.random.default_rng(3).integers(0, 97, 41).astype(np.uint16)
    ev = exit_perplexities(tiny_model, tokens, 12, seq_len=20, batch_size=2, stride=10)
    ids = torch.from_numpy(tokens.astype(np.int64))
    L = tiny_model.num_layers
    expected, agree, p_top = [0.0] * L, [0.0] * L, [0.0] * L
    for start, first in ((0, 0), (10, 10), (20, 10)):
        window = ids[start: start + 21][None]
        logits = tiny_model(window[:, :-1], exits=list(range(1, L + 1)))[:, 0, first:]
        top = logits[-1].argmax(-1)
        for e in range(L):
            expected[e] += F.cross_entropy(logits[e], window[0, 1 + first:], reduction="sum").item()
            agree[e] += (logits[e].argmax(-1) == top).sum().item()
            p_top[e] += torch.softmax(logits[e], -1).gather(-1, top[:, None]).sum().item()
    assert ev["tokens"] == 40
    for e in range(L):
        assert math.isclose(ev["word_ppl"][e], math.exp(expected[e] / 12), rel_tol=1e-5)
        assert math.isclose(ev["agreement"][e], agree[e] / 40, rel_tol=1e-6)
        assert math.isclose(ev["p_last_top"][e], p_top[e] / 40, rel_tol=1e-5)
    assert 0 < ev["agreement"][0] < 1


def test_the_progress_total_counts_every_batch_of_windows():
    """eval's progress bar ends at its total (the remainder window is one more batch)."""
    from tinyskip.analysis.perplexity import window_batches
    from tinyskip.storage.data import eval_windows

    for n in (2, 33, 129, 1001):
        for seq_len in (1, 4, 32, 128):
            for batch_size in (1, 3, 16):
                for stride in {None, 1, 3, seq_len} - ({3} if seq_len < 3 else set()):
                    for cap in (0, 1, 2, 50):
                        count = sum(1 for _ in eval_windows(np.arange(n), seq_len, batch_size,
                                                            cap, stride))
                        assert window_batches(n - 1, seq_len, batch_size, stride, cap) == count
