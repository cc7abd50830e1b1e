"""Weight-only int8: the rounding, the logits it gives against the float model on every
path a product takes (eager, ATen's int8 kernel, the compiled one-row loop), and what it
reads per token."""

import pytest
import torch

from tinyskip.config import SSDConfig, UserError

from tinyskip.analysis.bandwidth import bytes_per_token
from tinyskip.decode import ModeSpec, decode, generate
from tinyskip.decode.steps import Steps, cache_size
from tinyskip.model.kernels import Linear
from tinyskip.model.quantize import int8_rows, quantize_int8
from tinyskip.model.transformer import Transformer
from tinyskip.storage.loading import default_calibration, load_source, read_calibration


def models(tiny_config, dtype=torch.float32, **overrides):
    """A float model and an int8 copy of the same weights, in ``dtype``."""
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    float_model = Transformer(cfg).to(dtype).eval()
    int8_model = Transformer(cfg).to(dtype).eval()
    int8_model.load_state_dict(float_model.state_dict())
    return float_model, quantize_int8(int8_model)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_rows_round_each_entry_to_within_half_its_rows_step():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]      # rows of every scale
    q, s = int8_rows(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert q.abs().amax(dim=1).eq(127).all()          # each row's largest entry uses the range
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


def test_every_block_projection_and_the_head_become_int8_and_the_embedding_stays(tiny_config):
    float_model, model = models(tiny_config)
    linears = [m for m in [*model.layers.modules(), model.lm_head] if isinstance(m, Linear)]
    assert all(m.weight.dtype == torch.int8 and m.weight_scale is not None for m in linears)
    assert float_model.lm_head.weight_scale is None
    # The tied head got its own int8 copy; the embedding keeps the float table.
    assert model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.embed_tokens.weight, float_model.embed_tokens.weight)


# The stated tolerance: int8 logits within 2% (relative L2) of the float model's, in the
# float model's own dtype. A wrong scale, a missing one or a transposed weight is off by
# 30% or more; the rounding itself costs about 0.5% on these weights.
TOLERANCE = 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_logits_stay_within_the_tolerance_of_the_float_model(tiny_config, dtype):
    """Whole sequences (F.linear of the widened weight in fp32; ATen's int8 kernel in
    bf16) and one-token steps through the cache."""
    float_model, model = models(tiny_config, dtype)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        want, got = float_model(ids)[0], model(ids)[0]
        assert rel_error(got, want) < TOLERANCE
        caches = [m.new_cache(2, 16) for m in (float_model, model)]
        steps = [m.head(m.run_layers(m.embed(ids[:, :1]), 0, 4, c, 0))
                 for m, c in zip((float_model, model), caches)]
    assert rel_error(steps[1], steps[0]) < TOLERANCE


def test_the_compiled_int8_step_matches_the_eager_one(tiny_config):
    """The compiled one-row loop (int8 widened to fp32 inside inductor's loop) decodes the
    tokens eager int8 decodes."""
    _, model = models(tiny_config)
    prompt = torch.randint(0, 97, (1, 5))
    eager = generate(model, prompt, 12)
    steps = Steps(model, compile=True)
    compiled = generate(model, prompt, 12, steps=steps)
    assert steps.compiled and compiled.stats.compile_s > 0     # compiled, not fallen back
    assert compiled.tokens == eager.tokens


def test_an_int8_model_reads_one_byte_per_weight_and_its_scales_counted_by_hand(tiny_config):
    """As the float count (tests/analysis/test_bench.py), with int8 weights and fp32
    scales (one per output row) in place of fp32 weights; norms and KV stay fp32."""
    _, model = models(tiny_config, tie_word_embeddings=False)    # d 32, 4 heads of 8, 2 kv, I 64
    g = generate(model, torch.tensor([[3, 4, 5]]), 6)
    slots = cache_size(model, 3 + 6)
    weights = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64          # q, k+v, o, mlp
    scales = 4 * (32 + 2 * 16 + 32 + 2 * 64 + 32)                   # per output row
    block = weights + scales + 4 * 2 * 32                           # + the two norms
    kv = 4 * 2 * slots * 2 * 8
    head = 97 * 32 + 4 * 97 + 4 * 32                                 # int8 head, scales, norm
    assert bytes_per_token(g.stats.calls, g.stats.new_tokens, model, slots) == \
        4 * (block + kv) + head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_ssd_on_int8_weights_equals_full_decoding(trained_tiny, dtype):
    """Drafts accepted and rejected, the verify of k + 1 positions through the compiled
    graph (ATen's int8 kernel inside it in bf16), and the steps stay compiled. In fp32
    greedy SSD is full decoding token for token; in bf16 the verify's kernel and the
    one-row loop round differently, so a near-tie may part them later on (as the design
    notes say), and the first tokens are checked."""
    model = Transformer(trained_tiny[0].config).to(dtype).eval()
    model.load_state_dict(trained_tiny[0].state_dict())          # (copied into dtype)
    quantize_int8(model)
    prompt = torch.tensor([trained_tiny[1].tokens["test"][:12].tolist()])
    full = generate(model, prompt, 24)
    steps = Steps(model, compile=True)
    ssd = decode(model, prompt, 24, ModeSpec("ssd", ssd=SSDConfig(1, 3)), steps=steps)
    assert steps.compiled and 0 < ssd.stats.accepted < ssd.stats.drafted
    if dtype == torch.float32:
        assert ssd.tokens == full.tokens
    else:
        assert ssd.tokens[0][:8] == full.tokens[0][:8]


def test_a_calibration_made_on_float_weights_is_refused_for_int8_ones(trained_tiny, tmp_path):
    """The weights a result is keyed by include the quantisation."""
    import json

    run_dir = trained_tiny[2]
    plain = load_source(None, str(run_dir), "checkpoints", None, torch.device("cpu"))
    int8 = load_source(None, str(run_dir), "checkpoints", None, torch.device("cpu"),
                       quantize="int8")
    assert int8.quantize == "int8" and int8.weights_hash() != plain.weights_hash()
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"measure": "softmax", "exits": [1, 2, 3], "threshold": 0.9,
                               "weights_hash": plain.weights_hash(), "cache": "propagate",
                               "max_new_tokens": 8}))
    assert read_calibration(cal, plain)["threshold"] == [0.9]
    with pytest.raises(UserError, match="was made for other weights"):
        read_calibration(cal, int8)
    # Each has its own default file: calibrating int8 weights never overwrites the other.
    assert default_calibration(plain) == run_dir / "calibration.json"
    assert default_calibration(int8) == run_dir / "calibration-int8.json"


def test_an_int8_head_over_a_draft_vocabulary_scores_its_tokens_as_the_whole_head(tiny_config):
    """Each restricted row keeps its own scale."""
    from tinyskip.model.exits import ExitHead

    _, model = models(tiny_config)
    ids = torch.tensor([3, 17, 40, 41, 96])
    h = torch.randn(1, 2, 32)
    with torch.no_grad():
        whole = ExitHead(model).logits(h, 4)
        part = ExitHead(model, ids).logits(h, 4)
    torch.testing.assert_close(part, whole[..., ids])


def test_compiled_int8_logits_stay_within_the_tolerance_of_eager_ones(tiny_config):
    """The compiled one-row loop applies each row's scale (rows of very different scales)."""
    from tinyskip.decode.steps import positions
    from tinyskip.model.exits import ExitHead

    torch.manual_seed(0)
    cfg = tiny_config()
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Linear):
                m.weight.mul_(torch.logspace(-1, 1, m.weight.shape[0])[:, None])
    quantize_int8(model)
    head, tok = ExitHead(model), torch.tensor([[7]])
    outs = []
    for compile in (False, True):
        steps, cache = Steps(model, compile=compile), model.new_cache(1, 16)
        with torch.no_grad():
            outs.append(steps.token(tok, 4, cache, positions(0, 1, "cpu"), head)[1])
    assert steps.compiled and rel_error(outs[1], outs[0]) < 1e-4
