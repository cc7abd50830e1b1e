"""The SSD round's price list: the calls it measures and the acceptance arithmetic."""

import pytest
import torch

from tinyskip.bench import benchmark
from tinyskip.cli import compose_job
from tinyskip.decode import Steps
from tinyskip.ssd_costs import acceptance_needed, format_round_costs, round_costs, round_seconds


def test_round_costs_prices_every_call_a_round_makes(tiny_model):
    costs = round_costs(tiny_model, Steps(tiny_model), pos=5, layers=[1, 2], ks=[1, 3], reps=2,
                        draft_ids=torch.arange(20))
    assert costs["ks"] == [1, 3] and costs["compiled"] is False and costs["full"] > 0
    assert list(costs["exits"]) == [1, 2]
    for c in costs["exits"].values():
        assert c["draft"] > 0 and c["blocks"] > 0
        assert list(c["verify"]) == [2, 3, 4]        # widths k + 1 for every k up to 3
        assert all(s > 0 for s in c["verify"].values())


def test_acceptance_needed_inverts_the_round_arithmetic():
    # full 1.0; a k = 2 round at E = 1: 2 * 0.3 + 0.25 + 1.2 = 2.05 (units of seconds).
    costs = {"full": 1.0, "ks": [2], "compiled": True,
             "exits": {1: {"draft": 0.3, "blocks": 0.25, "verify": {3: 1.2}}}}
    assert round_seconds(costs, 1, 2) == pytest.approx(2.05)
    # Break-even: 2.05 tokens per round = 1 + 2 * 0.525.
    assert acceptance_needed(costs, 1, 2, 1.0) == pytest.approx(0.525)
    # 1.5x needs 3.075 tokens per round: more than 2 drafts can give.
    need = acceptance_needed(costs, 1, 2, 1.5)
    assert need == pytest.approx(1.0375) and need > 1
    costs["measured"] = [[1, 2, 0.6]]
    row = next(l for l in format_round_costs(costs).splitlines() if l.startswith("| 1 | 2 |"))
    assert row == "| 1 | 2 | 300000 | 250000 | 1200000 | 2050000 | 0.52 | 1.04 | 0.60 |"


def test_the_benchmark_prices_rounds_beside_the_acceptance_its_rows_measured(trained_tiny,
                                                                            wikitext_path,
                                                                            data_cache):
    _, _, run_dir = trained_tiny
    job = compose_job("bench", [f"checkpoint={run_dir}", f"data.path={wikitext_path}",
                                f"data.cache_dir={data_cache}", "data.max_rows=1000",
                                "data.vocab_size=300", "n_prompts=2", "max_new_tokens=8",
                                "static_layers=[]", "ssd_layers=[2]", "ssd_k=[2]",
                                "ssd_costs=true", "out_dir=null"])
    res = benchmark(job)
    ssd = next(r for r in res["rows"] if r["mode"] == "ssd E=2 k=2")
    assert res["ssd_costs"]["measured"] == [[2, 2, ssd["acceptance"]]]
    assert list(res["ssd_costs"]["exits"][2]["verify"]) == [2, 3]
