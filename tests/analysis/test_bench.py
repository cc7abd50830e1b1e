"""The benchmark: the sweep it runs, the quality it reports, and the files it writes."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinyskip.analysis.bench import Quality, benchmark
from tinyskip.analysis.bench_report import format_table, write_results
from tinyskip.analysis.plots import pareto_front, ssd_grid
from tinyskip.analysis.quality import RougeL, continuation_nll
from tinyskip.cli import compose_job
from tinyskip.storage.loading import load_source


@pytest.fixture(scope="module")
def run_args(trained_tiny, wikitext_path, data_cache):
    _, _, run_dir = trained_tiny
    return [f"checkpoint={run_dir}", f"data.path={wikitext_path}", f"data.cache_dir={data_cache}",
            "data.max_rows=1000", "data.vocab_size=300"]


def test_bench_prints_a_table_with_speedups_measured_in_one_run(run_args):
    job = compose_job("bench", run_args + ["n_prompts=2", "max_new_tokens=8", "draft_layer=[2]",
                                           "k=[2]", "exit_layer=[2]", "draft_vocab=100",
                                           "out_dir=null"])
    res = benchmark(job)
    labels = [r["mode"] for r in res["rows"]]
    assert labels == ["full", "static E=2", "ssd E=2 k=2", "ssd E=2 k=2 vocab=100"]
    assert res["rows"][0]["speedup"] == 1.0 and res["rows"][2]["agreement"] == 1.0
    assert res["rows"][3]["heads_per_token"] < res["rows"][2]["heads_per_token"]
    # Greedy SSD reproduces full decoding, so its quality is full's, number for number.
    full, ssd = res["rows"][0], res["rows"][2]
    assert (ssd["ppl"], ssd["rouge_l"]) == (full["ppl"], full["rouge_l"])
    assert sum(ssd["accept_hist"]) > 0 and ssd["draft_layer"] == 2 and ssd["k"] == 2
    table = format_table(res)
    assert "outside blocks and head" in table and "effic." in table and "rougeL" in table


def test_ngram_k_adds_the_lookup_rows_again_with_longer_drafts(run_args):
    args = run_args + ["n_prompts=1", "max_new_tokens=8", "draft_layer=[2]", "k=[1]",
                       "exit_layer=[]", "ngram=1", "ngram_k=[3]", "out_dir=null"]
    rows = {r["mode"]: r for r in benchmark(compose_job("bench", args))["rows"]}
    assert list(rows) == ["full", "ssd E=2 k=1", "ssd E=2 k=1 ngram=1",
                          "ssd E=2 k=1 ngram=1 ngram_k=3"]
    assert rows["ssd E=2 k=1 ngram=1 ngram_k=3"]["ngram_k"] == 3
    assert rows["ssd E=2 k=1 ngram=1"]["ngram_k"] == 1 and rows["ssd E=2 k=1"]["ngram_k"] is None


def test_two_levers_add_a_row_with_both_and_sampled_rows_draw_reproducibly(run_args):
    args = run_args + ["n_prompts=2", "max_new_tokens=8", "draft_layer=[2]", "k=[2]",
                       "exit_layer=[]", "draft_vocab=100", "ngram=1", "out_dir=null"]
    res = benchmark(compose_job("bench", args + ["temperature=0.7", "seed=3"]))
    rows = {r["mode"]: r for r in res["rows"]}
    assert list(rows) == ["full", "ssd E=2 k=2", "ssd E=2 k=2 vocab=100", "ssd E=2 k=2 ngram=1",
                          "ssd E=2 k=2 vocab=100 ngram=1"]
    both = rows["ssd E=2 k=2 vocab=100 ngram=1"]
    assert (both["draft_vocab"], both["ngram"]) == (100, 1) and both["lookup_share"] is not None
    assert "sampled at temperature 0.7" in format_table(res)
    # Sampled, not greedy: some row parts from the full row's draw; a second run draws alike.
    assert min(r["agreement"] for r in res["rows"]) < 1.0
    again = benchmark(compose_job("bench", args + ["temperature=0.7", "seed=3"]))
    drawn = lambda rs: [(r["ppl"], r["rouge_l"], r["agreement"]) for r in rs["rows"]]
    assert drawn(again) == drawn(res)
    other = benchmark(compose_job("bench", args + ["temperature=0.7", "seed=4"]))
    assert drawn(other) != drawn(res)                        # the seed is the one used
def test_choose_del_adds_a_row_per_k_that_chooses_its_exit(run_args):
    res = benchmark(compose_job("bench", run_args + [
        "n_prompts=2", "max_new_tokens=8", "draft_layer=[2]", "k=[2]", "exit_layer=[]",
        "choose_del=true", "ssd_exits=[1,2,3]", "out_dir=null"]))
    assert [r["mode"] for r in res["rows"]] == ["full", "ssd E=2 k=2", "ssd del exits=1,2,3 k=2"]
    row = res["rows"][2]
    assert row["agreement"] == 1.0 and row["choose"] == "del" and row["ssd_exits"] == [1, 2, 3]
    assert set(row["exit_rounds"]) <= {1, 2, 3, 4} and sum(row["draft_hist"]) == \
        sum(row["exit_rounds"].values()) == sum(row["accept_hist"])
    assert ssd_grid(res["rows"])[:2] == ([2], [2])       # the fixed rows' grid only


def test_batch_rows_decode_ragged_prompts_together_and_count_every_rows_tokens(run_args):
    res = benchmark(compose_job("bench", run_args + [
        "n_prompts=1", "max_new_tokens=6", "draft_layer=[2]", "k=[2]", "exit_layer=[]",
        "batch_sizes=[1,3]", "out_dir=null"]))
    rows = {(r["batch_size"], r["mode"]): r for r in res["batch"]}
    assert list(rows) == [(1, "full"), (1, "ssd E=2 k=2"), (3, "full"), (3, "ssd E=2 k=2")]
    for r in rows.values():      # three prompts (the largest batch) at every batch size
        assert r["prompts"] == 3 and 3 <= r["new_tokens"] <= 18
    # Greedy: the same tokens whatever the batch, SSD's as full's at its batch size.
    assert rows[3, "ssd E=2 k=2"]["exact_match"] == 1.0 and rows[3, "full"]["speedup"] == 1.0
    assert rows[3, "ssd E=2 k=2"]["acceptance"] is not None
    assert "| 3 | ssd E=2 k=2 | no | 3 |" in format_table(res)


def test_static_rows_default_to_every_exit_below_the_last(run_args):
    job = compose_job("bench", run_args + ["draft_layer=[]", "out_dir=null"])
    assert job.exit_layer is None
    res = benchmark(compose_job("bench", run_args + ["n_prompts=1", "max_new_tokens=2",
                                                     "draft_layer=[]", "out_dir=null"]))
    assert [r["exit_layer"] for r in res["rows"]] == [None, 1, 2, 3]


def test_continuation_nll_is_the_teacher_forced_loss_of_the_new_tokens(trained_tiny):
    model = trained_tiny[0]
    prompt, new = torch.tensor([[5, 9, 3]]), [7, 2, 11, 4]
    ids = torch.tensor([[5, 9, 3, 7, 2, 11, 4]])
    # By hand: the full model's log-probabilities of the new tokens, one prefix at a time.
    expected = -sum(F.log_softmax(model(ids[:, :i])[0, 0, -1], -1)[ids[0, i]].item()
                    for i in range(3, 7))
    assert continuation_nll(model, prompt, new) == pytest.approx(expected, rel=1e-5)
    assert continuation_nll(model, prompt, []) == 0.0


def test_quality_scores_rouge_against_the_reference_continuation(trained_tiny, run_args):
    run_dir = trained_tiny[2]
    loaded = load_source(None, str(run_dir), "checkpoints", None, torch.device("cpu"))
    reference = loaded.tokenizer.encode("the band played the first game of the season")
    q = Quality(loaded, [torch.tensor([[5, 9]])], [reference])
    assert q([reference])["rouge_l"] == 1.0
    other = loaded.tokenizer.encode("a new team")
    assert q([other])["rouge_l"] == 0.0
    half = loaded.tokenizer.encode("the band played")
    # ROUGE-L F: LCS 3 words, precision 3/3, recall 3/9 -> 2PR/(P+R) = 0.5
    assert q([half])["rouge_l"] == pytest.approx(0.5)
    assert RougeL()("the band played", "the band played") == 1.0


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(1.0, 1.0), (2.0, 0.9), (1.5, 0.8), (3.0, 0.2), (2.5, 0.1), (0.8, 1.0)]
    assert pareto_front(points) == [0, 1, 3]
    # A tie on quality keeps only the faster point; lower-is-better (perplexity) flips y.
    assert pareto_front(points, lower_is_better=True) == [4, 3]


def test_ssd_grid_places_each_variant_at_its_draft_layer_and_k():
    rows = [{"family": "ssd", "draft_layer": e, "k": k, "draft_vocab": v, "speedup": e + k / 10,
             "compiled": False, "adaptive_threshold": 0.0}
            for e in (1, 3) for k in (2, 4) for v in (0, 100)]
    layers, ks, grid = ssd_grid(rows)
    assert (layers, ks, grid) == ([1, 3], [2, 4], [[1.2, 1.4], [3.2, 3.4]])
    assert ssd_grid(rows, compiled=True) == ([], [], [])


def test_the_entry_point_writes_json_csv_markdown_and_a_pareto_plot(run_args, tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "tinyskip.bench", *run_args, "n_prompts=2",
                           "max_new_tokens=6", "exit_layer=[1]", "draft_layer=[2]", "k=[2]",
                           f"out_dir={out}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    # Its output is a pipe, not a terminal: the sweep still reports its progress in lines.
    assert re.search(r"^sweep: 6/6, \d+:\d\d elapsed$", done.stderr, re.M), done.stderr[-1500:]
    res = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["mode"] for r in table] == [r["mode"] for r in res["rows"]] == \
        ["full", "static E=1", "ssd E=2 k=2"]
    assert float(table[2]["speedup"]) == pytest.approx(res["rows"][2]["speedup"])
    assert json.loads(table[2]["accept_hist"]) == res["rows"][2]["accept_hist"]
    md = (out / "results.md").read_text().splitlines()
    assert md[2].startswith("| mode |") and sum(line.startswith("| ssd E=2 k=2 |") for line in md) == 1
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "tensorboard").exists()                  # tensorboard=false
    assert not math.isnan(res["rows"][0]["ppl"]) and 0.0 <= res["rows"][0]["rouge_l"] <= 1.0
    # Achieved bandwidth: the bytes each token read over its time, beside a streaming read.
    assert 0 < res["stream_gb_per_s_min"] <= res["stream_gb_per_s"] <= res["stream_gb_per_s_max"]
    assert res["stream_samples"] == 2                          # one read before each prompt
    for r in res["rows"]:
        assert r["gb_per_s"] == pytest.approx(r["bytes_per_token"] * r["tokens_per_s"] / 1e9)
    assert res["rows"][1]["bytes_per_token"] < res["rows"][0]["bytes_per_token"]  # exit 1: less


def test_tensorboard_gets_each_rows_measurements_under_its_label(run_args, tmp_path,
                                                                  tensorboard_scalars):
    job = compose_job("bench", run_args + ["n_prompts=1", "max_new_tokens=4", "exit_layer=[1]",
                                           "draft_layer=[2]", "k=[2]", "tensorboard=true",
                                           f"out_dir={tmp_path / 'bench'}"])
    res = benchmark(job)
    write_results(res, Path(job.out_dir), job.tensorboard)
    tags = tensorboard_scalars(tmp_path / "bench" / "tensorboard")
    rows = {r["mode"]: r for r in res["rows"]}
    assert list(rows) == ["full", "static E=1", "ssd E=2 k=2"]
    for tag, points in tags.items():              # <column>/<row label>, one point at step 0
        column, label = tag.split("/", 1)
        assert points == [(0, pytest.approx(rows[label][column], rel=1e-6))], tag
    for label in rows:
        for column in ("tokens_per_s", "speedup", "agreement", "ppl", "rouge_l", "gb_per_s"):
            assert f"{column}/{label}" in tags
    # A mode logs only what it measures: full and static draft nothing.
    assert "acceptance/ssd E=2 k=2" in tags and "acceptance/full" not in tags
    assert "acceptance/static E=1" not in tags


def test_bench_without_the_tensorboard_package_stops_before_the_sweep(run_args, tmp_path):
    """As users run it (the import made to fail first): one error line, exit status 2."""
    code = ("import runpy, sys; sys.modules['torch.utils.tensorboard'] = None; "
            "sys.argv[0] = 'tinyskip.bench'; runpy.run_module('tinyskip.bench', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, *run_args, "tensorboard=true",
                           f"out_dir={tmp_path / 'bench'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-1500:]
    assert done.stderr.strip() == ("error: tensorboard=true needs the tensorboard package: "
                                   "pip install -e '.[tensorboard]'")
    assert not (tmp_path / "bench").exists()


def test_median_extra_seconds_is_what_the_first_call_adds_to_the_second():
    import time

    from tinyskip.analysis.unit_costs import median_extra_seconds

    extra = median_extra_seconds(lambda: time.sleep(0.003), lambda: None, 9, torch.device("cpu"))
    assert 0.002 < extra < 0.05
    assert median_extra_seconds(lambda: None, lambda: time.sleep(0.003), 9,
                                torch.device("cpu")) == 0.0      # never negative


def test_unit_costs_take_fewer_reps_of_a_slow_call_within_their_budget():
    import time

    from tinyskip.analysis import unit_costs as uc

    cpu = torch.device("cpu")
    assert uc.budgeted_reps(lambda: None, 100, cpu) == 100              # a tiny model's calls
    slow = uc.BUDGET_S / 40                                             # 40 fit in the budget
    n = uc.budgeted_reps(lambda: time.sleep(slow), 100, cpu)
    assert 30 <= n <= 40
    assert uc.budgeted_reps(lambda: time.sleep(slow), 100, cpu, calls_per_rep=4) == uc.MIN_REPS
    assert uc.budgeted_reps(lambda: time.sleep(slow), 3, cpu) == 3      # asked for fewer


def test_median_extra_seconds_is_not_biased_by_which_call_comes_first():
    import time

    from tinyskip.analysis.unit_costs import median_extra_seconds

    calls = []

    def call():             # the same work either way; the first call of a pair is slower
        time.sleep(0.004 if len(calls) % 2 == 0 else 0.001)
        calls.append(1)

    assert median_extra_seconds(call, call, 9, torch.device("cpu")) < 0.001


def test_the_pareto_plot_names_only_the_front_and_offsets_the_names():
    from matplotlib.figure import Figure

    from tinyskip.analysis.plots import plot_pareto
    rows = [{"mode": m, "family": f, "speedup": s, "agreement": a}
            for m, f, s, a in [("full", "full", 1.0, 1.0), ("static E=1", "static", 3.0, 0.2),
                               ("static E=2", "static", 2.0, 0.1), ("ssd E=2 k=2", "ssd", 0.9, 1.0),
                               ("dee", "dee", 1.5, 0.6)]]
    ax = Figure().subplots()
    plot_pareto(ax, rows)
    named = [t.get_text() for t in ax.texts]
    assert named == ["full", "dee", "static E=1"]          # the front, by speed
    assert len({t.get_position() for t in ax.texts}) == 3 # each nudged its own way


def test_the_table_says_why_early_exit_ran_slower_only_when_it_did():
    """Each SSD or DEE row against full decoding run the same way: a compiled row that
    beats eager full but not compiled full is slower. Full decoding at a further precision
    (precisions=) is no reference for the sweep's rows."""
    from tinyskip.analysis.bench_report import regime_line

    def res(*rows):
        return {"weights_bytes": 1_000_000,
                "rows": [{"family": f, "compiled": c, "tokens_per_s": s, "precision": p}
                         for f, c, s, p in [("full", False, 100.0, "float32"),
                                            ("full", True, 300.0, "float32"),
                                            *[(*r, "float32") for r in rows],
                                            ("full", False, 900.0, "bfloat16+int8"),
                                            ("full", True, 990.0, "bfloat16+int8")]]}
    line = regime_line(res(("ssd", False, 120.0), ("dee", False, 80.0), ("ssd", True, 240.0)))
    assert "2 of the SSD/DEE rows ran slower than full decoding run the same way (down to " \
           "0.80x)" in line
    assert regime_line(res(("ssd", False, 110.0), ("dee", False, 140.0),
                           ("ssd", True, 330.0))) == ""
    # Why, by the model's size: cache-resident (above, 1 MB) or read from memory.
    assert "stay in the CPU's cache" in line
    big = {**res(("dee", False, 80.0)), "weights_bytes": 538_000_000}
    assert "weights (538 MB) are read from memory at every step" in regime_line(big)
    assert "CPU's cache" not in regime_line(big)


def test_bytes_per_token_is_the_blocks_kv_buffers_and_head_counted_by_hand(tiny_config):
    """A full generation of n tokens on a 4-block model: every token's pass reads each
    block's weights and its whole KV buffers once, and the head once."""
    from tinyskip.analysis.bandwidth import bytes_per_token, call_bytes
    from tinyskip.decode import generate
    from tinyskip.decode.steps import cache_size
    from tinyskip.model.transformer import Transformer

    cfg = tiny_config(tie_word_embeddings=False)          # d 32, 4 heads of 8, 2 kv, I 64, V 97
    model = Transformer(cfg).eval()
    g = generate(model, torch.tensor([[3, 4, 5]]), 6)
    slots = cache_size(model, 3 + 6)
    block = 4 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32)   # q, k+v, o, mlp, norms
    kv = 4 * 2 * slots * 2 * 8
    head = 4 * (97 * 32 + 32)                                              # lm_head and norm
    assert bytes_per_token(g.stats.calls, g.stats.new_tokens, model, slots) == \
        4 * (block + kv) + head
    # DEE's propagation into a skipped block: its norm, key and value projections.
    assert call_bytes(model, slots)["kv"] == 4 * (32 + 2 * 32 * 16)


@pytest.mark.slow
def test_the_transformers_baseline_runs_the_same_weights_from_either_source(run_args,
                                                                             trained_tiny,
                                                                             tmp_path):
    """A tinyskip checkpoint (exported for transformers) and a Hugging Face folder (read
    as it is): generate's greedy tokens equal tinyskip's full decoding in fp32."""
    from tinyskip.storage.hf_llama import export_run
    folder = export_run(trained_tiny[2], tmp_path / "hf")
    data = [a for a in run_args if a.startswith("data.")]
    common = ["n_prompts=2", "max_new_tokens=6", "exit_layer=[]", "draft_layer=[]",
              "hf_baseline=true", "out_dir=null"]
    for source in ([run_args[0]], ["model=hf_llama", f"model.path={folder}"]):
        res = benchmark(compose_job("bench", source + data + common))
        [hf] = res["hf"]
        assert hf["mode"] == "hf generate" and hf["agreement"] == 1.0 and hf["tokens_per_s"] > 0
        assert hf["dtype"] == "float32"
    # The same dtype as tinyskip's rows: generate in bf16 when they run in bf16.
    res = benchmark(compose_job("bench", ["model=hf_llama", f"model.path={folder}",
                                          "dtype=bfloat16"] + data + common))
    assert res["hf"][0]["dtype"] == "bfloat16"


def test_a_call_reads_its_weights_once_whatever_its_width(tiny_config):
    """A verify of 3 positions reads each block once, not three times; a head call over a
    draft vocabulary reads its share."""
    from tinyskip.analysis.bandwidth import bytes_per_token, call_bytes
    from tinyskip.model.transformer import Transformer

    model = Transformer(tiny_config())
    price = call_bytes(model, 256)
    assert bytes_per_token({"layer:3": 2, "head:3": 1, "head:1": 0.25}, 1, model, 256) == \
        2 * price["layer"] + 1.25 * price["head"]


def test_further_precisions_decode_the_same_prompts_beside_the_main_rows(run_args):
    """precisions= adds full decoding on the same weights in bf16 and as int8, interleaved
    with the main rows: each row says its precision, what it reads, how it agrees with the
    fp32 reference row and the test text's perplexity under its own weights; prefill_len=
    prefills one long prompt per precision beside its dtype's matrix peak."""
    res = benchmark(compose_job("bench", run_args + [
        "n_prompts=2", "max_new_tokens=6", "exit_layer=[]", "draft_layer=[]", "out_dir=null",
        "precisions=[bfloat16,float32+int8,float32,bfloat16]", "prefill_len=40"]))
    rows = {r["mode"]: r for r in res["rows"]}
    assert list(rows) == ["full", "full bfloat16", "full float32+int8"]    # each once
    assert [r["precision"] for r in rows.values()] == ["float32", "bfloat16", "float32+int8"]
    full, bf16, int8 = rows.values()
    # Bytes per weight: 4, 2, and 1 plus a scale per row (the KV cache stays in the dtype).
    assert bf16["bytes_per_token"] < full["bytes_per_token"]
    assert int8["bytes_per_token"] < 0.5 * full["bytes_per_token"]
    # The same text scored under each precision's weights: close, and not the same number.
    assert int8["text_ppl"] != full["text_ppl"]
    assert int8["text_ppl"] == pytest.approx(full["text_ppl"], rel=0.05)
    assert bf16["text_ppl"] == pytest.approx(full["text_ppl"], rel=0.05)
    assert int8["agreement"] > 0.5 and int8["predicted"] is None
    assert [p["precision"] for p in res["prefill"]] == ["float32", "bfloat16", "float32+int8"]
    for p in res["prefill"]:
        assert p["prefill_tokens"] == 40 and p["prefill_tokens_per_s"] > 0
        assert p["prefill_of_peak"] == pytest.approx(p["prefill_tflops"] / p["matrix_peak_tflops"])
    table = format_table(res)
    assert "| float32+int8 | 40 |" in table and "full float32+int8" in table


def test_the_streaming_read_reports_the_median_and_range_of_its_samples():
    from tinyskip.analysis.bandwidth import StreamRead

    stream = StreamRead(torch.device("cpu"), mib=1)
    stream.samples = [9e9, 1e9, 2e9]
    assert stream.summary() == {"stream_gb_per_s": 2.0, "stream_gb_per_s_min": 1.0,
                                "stream_gb_per_s_max": 9.0, "stream_samples": 3}
    assert stream.sample() > 0 and len(stream.samples) == 4
