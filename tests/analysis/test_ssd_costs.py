"""The SSD round's price list: the calls it measures and the acceptance arithmetic."""

import inspect
import json

import pytest
import torch

from tinyskip.analysis.bench import benchmark
from tinyskip.analysis.ssd_costs import (acceptance_needed, format_round_costs, round_costs,
                                         round_seconds)
from tinyskip.cli import compose_job
from tinyskip.config import SSDConfig
from tinyskip.decode import Steps
from tinyskip.decode.full import generate
from tinyskip.decode.ssd import ssd_generate
from tinyskip.model.transformer import Transformer


def _recording(steps: Steps) -> list:
    """Wrap the steps' calls to record what a compiled graph is specialised on: the method,
    its block range and exit_kv, every tensor's shape, stride and dtype, the cache's size
    and the head's weight shape."""
    calls = []

    def describe(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), a.stride(), a.dtype)
        if hasattr(a, "k"):                                          # the KV cache
            return ("cache", tuple(a.k[0].shape))
        if hasattr(a, "weight"):                                     # an ExitHead
            return ("head", tuple(a.weight.shape))
        return a

    for name in ("token", "blocks", "states"):
        inner = getattr(steps, name)

        def call(*args, _name=name, _inner=inner, **kw):
            # Keywords and defaults (exit_kv, capture) as if given positionally.
            bound = inspect.signature(_inner).bind(*args, **kw)
            bound.apply_defaults()
            calls.append((_name,) + tuple(describe(a) for a in bound.args))
            return _inner(*bound.args)
        setattr(steps, name, call)
    return calls


@pytest.mark.parametrize("draft_ids", [None, torch.arange(40)])
def test_round_costs_makes_the_calls_a_real_round_makes(tiny_config, draft_ids):
    torch.manual_seed(0)
    # A context above 256 and a generation past 256 positions: its cache is 512 slots.
    model = Transformer(tiny_config(max_position_embeddings=1024)).eval()
    prompt, n_new, E, k = torch.randint(0, 97, (1, 200)), 100, 2, 3
    real = Steps(model)
    real_calls = _recording(real)
    ssd_generate(model, prompt, n_new, SSDConfig(E, k), draft_ids=draft_ids, steps=real)
    generate(model, prompt, n_new, steps=real)          # the full step it is priced against
    priced = Steps(model)
    priced_calls = _recording(priced)
    costs = round_costs(model, priced, 250, 300, [E], [k], draft_ids, reps=1)
    assert set(priced_calls) <= set(real_calls)
    # Every kind of call is priced, the verify at width k + 1 only.
    assert {c[0] for c in priced_calls} == {"token", "blocks", "states"}
    assert {c[1][1][1] for c in priced_calls if c[0] == "states"} == {k + 1}
    assert sorted(costs) == sorted(["layers", "ks", "compiled", "full", f"draft:{E}",
                                    f"blocks:{E}", f"verify:{E}:{k + 1}"])


def test_acceptance_needed_inverts_the_round_arithmetic():
    # full 1.0; a k = 2 round at E = 1: 2 * 0.3 + 0.25 + 1.2 = 2.05 (units of seconds).
    costs = {"full": 1.0, "layers": [1], "ks": [2], "compiled": True,
             "draft:1": 0.3, "blocks:1": 0.25, "verify:1:3": 1.2}
    assert round_seconds(costs, 1, 2) == pytest.approx(2.05)
    # Break-even: 2.05 tokens per round = 1 + 2 * 0.525.
    assert acceptance_needed(costs, 1, 2, 1.0) == pytest.approx(0.525)
    # 1.5x needs 3.075 tokens per round: more than 2 drafts can give.
    assert acceptance_needed(costs, 1, 2, 1.5) == pytest.approx(1.0375)
    costs["measured"] = [[1, 2, 0.6]]
    row = next(l for l in format_round_costs(costs).splitlines() if l.startswith("| 1 | 2 |"))
    assert row == "| 1 | 2 | 300000 | 250000 | 1200000 | 2050000 | 0.52 | none (1.04) | 0.60 |"


def test_the_benchmark_prices_rounds_beside_the_acceptance_its_rows_measured(trained_tiny,
                                                                            wikitext_path,
                                                                            data_cache):
    _, _, run_dir = trained_tiny
    job = compose_job("bench", [f"checkpoint={run_dir}", f"data.path={wikitext_path}",
                                f"data.cache_dir={data_cache}", "data.max_rows=1000",
                                "data.vocab_size=300", "n_prompts=2", "max_new_tokens=8",
                                "exit_layer=[]", "draft_layer=[2]", "k=[2]",
                                "draft_vocab=100", "ssd_costs=true", "out_dir=null"])
    res = benchmark(job)
    ssd = next(r for r in res["rows"] if r["mode"] == "ssd E=2 k=2 vocab=100")
    assert res["ssd_costs"]["measured"] == [[2, 2, ssd["acceptance"]]]
    # What results.json holds formats the same table once read back.
    back = json.loads(json.dumps(res["ssd_costs"]))
    assert format_round_costs(back) == format_round_costs(res["ssd_costs"])
