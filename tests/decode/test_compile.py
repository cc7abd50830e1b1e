"""Compiled decoding steps: same tokens as eager, no graph break, no recompilation as the
sequence grows. Compiling costs seconds per graph on this CPU, hence one module-wide model."""

import pytest
import torch

from tinyskip.config import SSDConfig
from tinyskip.decode import Steps, generate, ssd_generate
from tinyskip.decode.steps import positions
from tinyskip.model.exits import ExitHead
from tinyskip.model.kv_cache import KVCache
from tinyskip.model.transformer import Transformer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return Transformer(tiny_config(max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def compiled(model):
    torch._dynamo.reset()
    return Steps(model, compile=True)


def test_compiled_steps_trace_without_graph_breaks(model):
    steps = Steps(model)
    cache = KVCache(model.config, 1, 32)
    head = ExitHead(model)
    tok = torch.tensor([[5]])
    explain = torch._dynamo.explain(steps._token)(tok, 4, cache, positions(3, 1, "cpu"), head.weight,
                                                  head.scale, None, ())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    explain = torch._dynamo.explain(steps._blocks)(tok, 2, cache, positions(3, 1, "cpu"), (2,), ())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    h = torch.zeros(1, 3, model.config.hidden_size)
    explain = torch._dynamo.explain(steps._states)(h, 2, 4, cache, positions(3, 3, "cpu"),
                                                   head.weight, head.scale, (), ())
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_compiled_and_eager_give_the_same_greedy_tokens(model, compiled):
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    for exit_layer in (None, 2):
        eager = generate(model, prompt, 20, exit_layer=exit_layer).tokens
        assert generate(model, prompt, 20, exit_layer=exit_layer, steps=compiled).tokens == eager
    eager = ssd_generate(model, prompt, 20, SSDConfig(2, 2)).tokens
    assert ssd_generate(model, prompt, 20, SSDConfig(2, 2), steps=compiled).tokens == eager


def test_no_recompilation_as_the_sequence_grows(model, compiled):
    from torch._dynamo.utils import counters

    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    generate(model, prompt, 3, steps=compiled)                  # compiled (or reused) here
    before = counters["stats"]["unique_graphs"]
    assert before > 0                                           # compiled, not the eager fallback
    out = generate(model, prompt, 200, steps=compiled)
    assert len(out.tokens[0]) == 200
    assert counters["stats"]["unique_graphs"] == before         # 200 steps, no new graph


def test_a_second_generation_reuses_every_graph(model, compiled):
    """Each generation builds new heads and caches: graphs must not guard on them."""
    from torch._dynamo.utils import counters

    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    ssd_generate(model, prompt, 12, SSDConfig(2, 2), steps=compiled)
    generate(model, prompt, 12, steps=compiled)
    before = counters["stats"]["unique_graphs"]
    ssd_generate(model, prompt, 12, SSDConfig(2, 2), steps=compiled)
    generate(model, prompt, 12, steps=compiled)
    assert counters["stats"]["unique_graphs"] == before


def test_steps_through_attending_exit_modules_trace_without_graph_breaks(tiny_config):
    from tinyskip.model.exit_modules import ExitModules

    torch.manual_seed(0)
    model = Transformer(tiny_config(max_position_embeddings=256)).eval()
    model.attach_exit_modules(ExitModules(model.config, [2], "block").init_from(model))
    steps, cache, head = Steps(model), model.new_cache(1, 32), ExitHead(model)
    explain = torch._dynamo.explain(steps._token)(torch.tensor([[5]]), 2, cache,
                                                  positions(3, 1, "cpu"), head.weight, head.scale,
                                                  None, ())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    explain = torch._dynamo.explain(steps._blocks)(torch.tensor([[5]]), 2, cache,
                                                   positions(3, 1, "cpu"), (2,), ())
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_a_verify_width_compiles_once_whatever_k_sized_the_state_buffer(model, compiled):
    """E = L accepts every draft, so the verify widths are known: k=2 over 10 tokens
    verifies at width 3 from a 3-wide buffer, k=4 over 4 tokens at width 3 from a 5-wide
    one. The second must reuse the first's graphs (a buffer stride in the guards would not)."""
    from torch._dynamo.utils import counters

    L = model.num_layers
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    ssd_generate(model, prompt, 10, SSDConfig(L, 2), steps=compiled)
    before = counters["stats"]["unique_graphs"]
    g = ssd_generate(model, prompt, 4, SSDConfig(L, 4), steps=compiled)
    assert g.stats.accept_hist[-1] == 1 and len(g.stats.accept_hist) == 3    # one width-3 verify
    assert counters["stats"]["unique_graphs"] == before


def test_compiled_ssd_runs_blocks_eagerly_only_for_the_prompt(model, compiled, monkeypatch):
    """Every per-round call (drafts, the last draft's blocks-only call, the verify) goes
    through a compiled step; only prefill runs blocks op by op."""
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(5))
    ssd_generate(model, prompt, 12, SSDConfig(2, 2), steps=compiled)          # compiles
    eager = []
    real = Transformer.run_layers
    monkeypatch.setattr(Transformer, "run_layers", lambda self, *a, **kw: (
        eager.append(a[0].shape[1]) if not torch.compiler.is_compiling() else None)
        or real(self, *a, **kw))
    g = ssd_generate(model, prompt, 12, SSDConfig(2, 2), steps=compiled)
    assert g.stats.rounds > 1 and eager == [6]


def test_compiled_batched_ssd_of_ragged_prompts_equals_eager(tiny_config):
    """Per-row positions, RoPE rows, cache writes and masks inside compiled graphs: the same
    tokens as eager, drafts accepted and rejected, rows ending at different steps; a second
    generation (other prompts, same lengths) compiles nothing new."""
    from torch._dynamo.utils import counters

    from tinyskip.decode.steps import ragged_batch

    torch.manual_seed(0)
    peaked = Transformer(tiny_config(initializer_range=0.2)).eval()    # exits often disagree
    steps = Steps(peaked, compile=True)
    g = torch.Generator().manual_seed(6)
    for run in range(2):
        batch, lengths = ragged_batch([torch.randint(0, 97, (n,), generator=g) for n in (3, 9, 5)])
        eager = ssd_generate(peaked, batch, 16, SSDConfig(2, 1), lengths=lengths)
        assert 0 < eager.stats.accepted < eager.stats.drafted
        before = counters["stats"]["unique_graphs"]
        got = ssd_generate(peaked, batch, 16, SSDConfig(2, 1), steps=steps, lengths=lengths)
        assert got.tokens == eager.tokens and steps.compiled
        if run:
            assert counters["stats"]["unique_graphs"] == before


def test_compile_time_is_reported_apart_and_never_counted_in_tokens_per_s(model):
    """A generation whose steps compile first: the seconds spent compiling (several, on
    this CPU) are reported in compile_s and left out of decode_s, so tokens/s is what the
    compiled steps run at. (Last in the file: it resets Dynamo's graphs.)"""
    torch._dynamo.reset()
    steps = Steps(model, compile=True)
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(4))
    first = generate(model, prompt, 8, steps=steps).stats
    again = generate(model, prompt, 8, steps=steps).stats
    assert first.compile_s > 0.5 and again.compile_s == 0
    assert first.decode_s < 0.1 * first.compile_s        # eight tiny steps: milliseconds
    ssd = ssd_generate(model, prompt, 8, SSDConfig(2, 2), steps=steps).stats
    assert ssd.compile_s > 0.5 and ssd.decode_s < 0.1 * ssd.compile_s   # draft, verify graphs
