"""Prompt-lookup drafts (decode/lookup.py) and SSD rounds that take them (``ngram``)."""

import pytest
import torch

from tinyskip.config import ConfigError, SSDConfig
from tinyskip.decode import generate, ssd_generate
from tinyskip.decode.lookup import lookup
from tinyskip.decode.steps import Steps


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    ctx = [1, 2, 3, 4, 9, 1, 2, 5, 6, 7, 1, 2]
    assert lookup(ctx, 2, 3) == [5, 6, 7]           # the latest earlier "1 2", not the first
    assert lookup(ctx, 2, 1) == [5]
    assert lookup(ctx, 3, 3) == []                  # "7 1 2" never occurred before
    assert lookup([5, 5, 5], 2, 4) == [5, 5, 5, 5]  # overlapping the key: its period
    assert lookup([1, 2, 3, 1, 2], 2, 5) == [3, 1, 2, 3, 1]     # the copy runs on
    assert lookup([1, 2, 3], 2, 2) == []
    assert lookup([1, 2], 5, 2) == [] and lookup(ctx, 0, 2) == [] and lookup(ctx, 2, 0) == []


def repeating_prompt(model, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt, the model's own greedy continuation of it, then the prompt's last 4
    tokens again: lookups find the continuation, which the model partly repeats."""
    cont = generate(model, prompt, 8).tokens[0]
    return torch.cat([prompt, torch.tensor([cont]), prompt[:, -4:]], dim=1)


@pytest.fixture(scope="module")
def model_and_prompts(trained_tiny):
    model, corpus, _ = trained_tiny
    test = torch.from_numpy(corpus.tokens["test"][:4000].astype("int64"))
    prompts = [test[s:s + n][None] for s, n in [(0, 12), (500, 6), (1200, 30), (2500, 8)]]
    return model, [repeating_prompt(model, p) for p in prompts] + prompts


@pytest.mark.parametrize("E,k,n,nk", [(1, 1, 1, 0), (2, 4, 2, 0), (3, 3, 3, 0), (2, 8, 1, 0),
                                      (2, 1, 2, 6), (3, 4, 1, 2)])
def test_greedy_ssd_with_lookup_drafts_equals_full_decoding(model_and_prompts, E, k, n, nk):
    model, prompts = model_and_prompts
    lookups = drafted = accepted = 0
    for prompt in prompts:
        for max_new in (1, 7, 40):
            full = generate(model, prompt, max_new).tokens
            ssd = ssd_generate(model, prompt, max_new, SSDConfig(E, k, ngram=n, ngram_k=nk))
            assert ssd.tokens == full, (E, k, n, nk, max_new)
            lookups += ssd.stats.lookup_rounds
            drafted, accepted = drafted + ssd.stats.drafted, accepted + ssd.stats.accepted
    # Rounds took lookup drafts, and drafts were both accepted and rejected.
    assert lookups > 0 and 0 < accepted < drafted


def test_compiled_ssd_with_lookup_drafts_equals_full_decoding(model_and_prompts):
    model, prompts = model_and_prompts
    steps = Steps(model, compile=True)
    for prompt in prompts[:2]:
        full = generate(model, prompt, 30).tokens
        for cfg in (SSDConfig(2, 4, ngram=2), SSDConfig(2, 2, ngram=2, ngram_k=6)):
            ssd = ssd_generate(model, prompt, 30, cfg, steps=steps)
            assert ssd.tokens == full and ssd.stats.lookup_rounds > 0
    assert steps.compiled


def test_ngram_k_sets_how_many_tokens_a_lookup_round_drafts(model_and_prompts):
    """Exit rounds draft k, lookup rounds up to ngram_k: with k = 1 and ngram_k = 6,
    some round accepts more than one draft, and without ngram_k none can."""
    model, prompts = model_and_prompts
    longest = {}
    for nk in (0, 6):
        hist = []
        for prompt in prompts[:4]:
            gen = ssd_generate(model, prompt, 40, SSDConfig(2, 1, ngram=2, ngram_k=nk))
            hist = [a + b for a, b in zip(gen.stats.accept_hist + [0] * 8, hist + [0] * 8)]
        longest[nk] = max(a for a, n in enumerate(hist) if n)
    assert longest[0] == 1 and longest[6] > 1, longest


def test_a_round_without_a_repeat_drafts_from_the_exit(tiny_config):
    from tinyskip.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompt = torch.arange(10, 20)[None]              # no token repeats
    gen = ssd_generate(model, prompt, 3, SSDConfig(2, 1, ngram=3))
    assert gen.stats.lookup_rounds == 0 and gen.stats.drafted == 1


def test_a_negative_ngram_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"ngram=-1: must be >= 1"):
        SSDConfig(2, 4, ngram=-1)
    with pytest.raises(ConfigError, match=r"ngram_k=-2: must be >= 1"):
        SSDConfig(2, 4, ngram=2, ngram_k=-2)
    with pytest.raises(ConfigError, match=r"ngram_k=8: the length of prompt-lookup drafts"):
        SSDConfig(2, 4, ngram_k=8)


def test_a_repeat_inside_the_prompt_drafts_the_first_round(tiny_config):
    from tinyskip.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=50)).eval()
    # Every token once: whatever the first new token is, the prompt holds it.
    prompt = torch.arange(50)[None]
    gen = ssd_generate(model, prompt, 3, SSDConfig(2, 1, ngram=1))
    assert gen.stats.lookup_rounds >= 1 and gen.stats.drafted >= 1
    assert gen.tokens == generate(model, prompt, 3).tokens



def test_lookup_finds_repeats_in_the_generated_text(tiny_config):
    """A prompt without repeats whose greedy continuation loops: the lookup rounds come
    from what was generated, so the context lookup reads must grow with every round."""
    from tinyskip.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompt = torch.arange(10, 20)[None]              # no token repeats
    full = generate(model, prompt, 40).tokens[0]
    pairs = list(zip(full, full[1:]))
    assert len(set(pairs)) < len(pairs)              # the continuation repeats itself
    gen = ssd_generate(model, prompt, 40, SSDConfig(2, 2, ngram=2))
    assert gen.tokens[0] == full and gen.stats.lookup_rounds > 0
