import pytest
import torch

from tinyskip.config import SSDConfig, UserError
from tinyskip.decode import SamplingConfig, generate, ssd_generate
from tinyskip.model.exits import frequent_tokens


def naive_greedy(model, prompt, n, exit_layer=None):
    """Reference: recompute the whole sequence without a cache for every token."""
    L = model.num_layers
    ids = prompt.clone()
    for _ in range(n):
        logits = model(ids, exits=[exit_layer or L])[0][:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:].tolist()


@pytest.fixture(scope="module")
def model_and_prompts(trained_tiny):
    model, corpus, _ = trained_tiny
    test = torch.from_numpy(corpus.tokens["test"][:4000].astype("int64"))
    prompts = [test[s:s + n][None] for s, n in [(0, 12), (500, 5), (1200, 30), (2500, 1)]]
    return model, prompts, corpus.eos_id


def test_full_and_static_decoding_equal_uncached_recomputation(model_and_prompts):
    model, prompts, _ = model_and_prompts
    for exit_layer in (None, 2):
        got = generate(model, prompts[0], 15, exit_layer=exit_layer).tokens
        assert got == naive_greedy(model, prompts[0], 15, exit_layer)


def test_static_exit_at_the_last_layer_is_full_decoding(model_and_prompts):
    model, prompts, eos = model_and_prompts
    full = generate(model, prompts[2], 25, eos_id=eos)
    static = generate(model, prompts[2], 25, exit_layer=model.num_layers, eos_id=eos)
    assert static.tokens == full.tokens
    assert full.stats.as_dict()["layers_per_token"] == model.num_layers


def test_batched_decoding_equals_one_row_at_a_time(model_and_prompts):
    model, _, _ = model_and_prompts
    batch = torch.randint(0, 300, (3, 9))
    together = generate(model, batch, 10, exit_layer=3).tokens
    assert together == [generate(model, row[None], 10, exit_layer=3).tokens[0] for row in batch]


@pytest.mark.parametrize("E,k", [(1, 1), (2, 4), (3, 1), (3, 3), (2, 8)])
def test_greedy_ssd_equals_greedy_full_token_for_token(model_and_prompts, E, k):
    model, prompts, _ = model_and_prompts
    for prompt in prompts:
        # A stop token the model does produce (after a few tokens), so EOS boundaries occur.
        produced = generate(model, prompt, 12).tokens[0]
        for max_new in (1, 2, 7, 40):
            for stop in (None, produced[-1]):
                full = generate(model, prompt, max_new, eos_id=stop).tokens
                ssd = ssd_generate(model, prompt, max_new, SSDConfig(E, k), eos_id=stop)
                assert ssd.tokens == full, (E, k, max_new, stop)
                assert ssd.stats.new_tokens == len(full[0])


def test_ssd_accepts_drafts_of_a_trained_model(model_and_prompts):
    model, prompts, _ = model_and_prompts
    stats = ssd_generate(model, prompts[2], 60, SSDConfig(3, 4)).stats
    assert stats.accepted > 0 and stats.rounds < 60


def test_ssd_stops_at_eos(model_and_prompts):
    model, prompts, _ = model_and_prompts
    tokens = generate(model, prompts[2], 30).tokens[0]
    stop = tokens[20]
    ssd = ssd_generate(model, prompts[2], 30, SSDConfig(2, 4), eos_id=stop).tokens[0]
    assert ssd == tokens[: tokens.index(stop) + 1] and len(ssd) < 30


def test_drafting_with_the_full_model_accepts_every_draft(model_and_prompts):
    model, prompts, _ = model_and_prompts
    stats = ssd_generate(model, prompts[0], 30, SSDConfig(model.num_layers, 4)).stats.as_dict()
    assert stats["acceptance"] == 1.0 and stats["drafted"] > 0


@pytest.mark.parametrize("cfg", [SSDConfig(2, 4, draft_vocab=50), SSDConfig(2, 6, adaptive_threshold=0.5),
                                 SSDConfig(1, 3, draft_vocab=20, adaptive_threshold=0.3)])
def test_small_draft_vocabulary_and_adaptive_drafting_keep_greedy_output(model_and_prompts,
                                                                        trained_tiny, cfg):
    model, prompts, _ = model_and_prompts
    ids = frequent_tokens(trained_tiny[1].tokens["train"], model.config.vocab_size, cfg.draft_vocab) \
        if cfg.draft_vocab else None
    for prompt in prompts:
        assert ssd_generate(model, prompt, 30, cfg, draft_ids=ids).tokens == \
            generate(model, prompt, 30).tokens


def test_frequent_tokens_picks_the_most_common_ids():
    import numpy as np
    tokens = np.array([5, 5, 5, 2, 2, 9, 1, 1, 1, 1], dtype=np.uint16)
    assert frequent_tokens(tokens, 10, 2).tolist() == [1, 5]


def test_sampling_is_seeded(model_and_prompts):
    model, prompts, _ = model_and_prompts
    s = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)
    run = lambda seed: generate(model, prompts[0], 10, sampling=s,
                                generator=torch.Generator().manual_seed(seed)).tokens
    assert run(3) == run(3) and run(3) != run(4)
    runs = lambda seed: ssd_generate(model, prompts[0], 10, SSDConfig(2, 3), sampling=s,
                                     generator=torch.Generator().manual_seed(seed)).tokens
    assert runs(3) == runs(3) and runs(3) != runs(4)


@pytest.mark.parametrize("bad,match", [
    (dict(draft_layer=0), r"draft_layer=0: must be in 1..4"),
    (dict(draft_layer=5), r"draft_layer=5: must be in 1..4"),
    (dict(draft_layer=2, k=0), r"k=0: must be >= 1"),
])
def test_bad_ssd_settings_are_one_clear_error(model_and_prompts, bad, match):
    model, prompts, _ = model_and_prompts
    with pytest.raises(UserError, match=match):
        ssd_generate(model, prompts[0], 5, SSDConfig(**bad))


def test_bad_prompts_and_layers_are_one_clear_error(model_and_prompts):
    model, prompts, _ = model_and_prompts
    with pytest.raises(UserError, match="exit_layer=5: must be in 1..4"):
        generate(model, prompts[0], 5, exit_layer=5)
    with pytest.raises(UserError, match="the prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(UserError, match="the prompt has 128 tokens, longer than the context"):
        ssd_generate(model, torch.zeros(1, 128, dtype=torch.long), 5, SSDConfig(2, 2))
    with pytest.raises(UserError, match="max_new_tokens=0"):
        generate(model, prompts[0], 0)
    with pytest.raises(UserError, match="ngram=2: prompt-lookup drafts decode one prompt at a time"):
        ssd_generate(model, torch.zeros(2, 3, dtype=torch.long), 5, SSDConfig(2, 2, ngram=2))


def test_generation_stops_at_the_end_of_the_context(model_and_prompts):
    model, _, _ = model_and_prompts
    prompt = torch.randint(0, 300, (1, 120))               # context is 128
    full = generate(model, prompt, 50).tokens
    assert len(full[0]) == 8
    assert ssd_generate(model, prompt, 50, SSDConfig(2, 4)).tokens == full


def test_greedy_ssd_breaks_exact_ties_as_full_decoding_does(tiny_config):
    """Two vocabulary rows made identical and dominant: every step is an exact tie between
    them, and both decoders must pick the same one (argmax takes the first), although the
    verify computes its logits at another width than the one-token steps."""
    from tinyskip.model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight[3] *= 20.0         # large enough to win often
        model.lm_head.weight[7] = model.lm_head.weight[3]     # rows 3 and 7 equal, bit for bit
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    full = generate(model, prompt, 30).tokens
    assert full[0].count(3) >= 5 and 7 not in full[0]      # ties exercised, all go to 3
    for E, k in [(1, 3), (2, 2), (3, 4)]:
        assert ssd_generate(model, prompt, 30, SSDConfig(E, k)).tokens == full


def test_greedy_ssd_differs_from_full_only_at_near_ties(tiny_config):
    """Width-(m+1) verification sums in another order than one-token steps, so equality is
    exact up to reassociation: wherever SSD and full decoding part, the full model's two
    candidates there must be within float32 rounding of each other."""
    from tinyskip.model.transformer import Transformer
    torch.manual_seed(1)
    model = Transformer(tiny_config()).eval()
    parted = 0
    for seed in range(20):
        prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(seed))
        full = generate(model, prompt, 40).tokens[0]
        ssd = ssd_generate(model, prompt, 40, SSDConfig(2, 4)).tokens[0]
        if ssd == full:
            continue
        parted += 1
        i = next(j for j, (a, b) in enumerate(zip(full, ssd)) if a != b)
        ids = torch.cat([prompt, torch.tensor([full[:i]])], 1)
        logits = model(ids)[0, 0, -1]
        assert abs(float(logits[full[i]] - logits[ssd[i]])) < 1e-4, (seed, i)
    assert parted <= 2          # a random model's logits are near-flat: rare, not common


@pytest.mark.parametrize("mode", ["full", "static", "ssd", "dee"])
def test_decoding_records_no_autograd_graph(tiny_model, mode):
    """Every decoder runs under no_grad: a step that records a graph for backward is
    slower (measured 20% on l6_d128) and holds memory it never frees."""
    from tinyskip.config import DEEConfig
    from tinyskip.decode import ModeSpec, decode

    grad = []
    hook = tiny_model.lm_head.register_forward_hook(
        lambda module, args, out: grad.append(torch.is_grad_enabled()))
    spec = {"full": ModeSpec("full"), "static": ModeSpec("static", exit_layer=2),
            "ssd": ModeSpec("ssd", ssd=SSDConfig(2, 2)),
            "dee": ModeSpec("dee", dee=DEEConfig("softmax", [0.5]))}[mode]
    try:
        decode(tiny_model, torch.tensor([[1, 2, 3]]), 6, spec)
    finally:
        hook.remove()
    assert grad and not any(grad)
