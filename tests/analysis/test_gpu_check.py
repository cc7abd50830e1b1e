"""The GPU check's logic, on the CPU (CI has no GPU): its rows, its verdicts, its skip."""

import subprocess
import sys

import pytest
import torch

from tinyskip.analysis.gpu_check import agreement, gpu_tests, random_model, run_checks
from tinyskip.cli import compose_job
from tinyskip.decode.steps import compile_options


def test_without_cuda_the_check_says_it_skipped_and_exits_0(repo, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, "-m", "tinyskip.gpu_check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "TINYSKIP_LOGS": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-800:]
    assert done.stdout.startswith("gpu_check: skipped, no CUDA device here")


def test_the_checks_run_on_the_cpu_and_report_every_row():
    job = compose_job("gpu_check", ["device=cpu", "model=l4_d64", "dtype=float32", "tests=false",
                                    "compile=false", "stream_mib=16", "max_new_tokens=12",
                                    "prompt_len=8", "draft_layer=2", "k=3"])
    rows = run_checks(job)
    assert [r.check for r in rows] == ["streaming read", "model", "full, eager", "ssd E=2 k=3",
                                       "fsdp, 2 x CPU process"]
    assert all(r.ok for r in rows), [r.result for r in rows]
    full, ssd = rows[2].figures, rows[3].figures
    assert ssd["agreement_with_full"] == 1.0
    assert 0 < full["floor_fraction"] and full["tok_per_s"] > 0
    assert ssd["speedup"] == pytest.approx(ssd["tok_per_s"] / full["tok_per_s"])
    # FSDP over two gloo processes: the sharded model is the whole one, and it learns.
    fsdp = rows[4].figures
    assert fsdp["world"] == 2 and len(fsdp["losses"]) == job.fsdp_steps
    assert fsdp["parameters"] == rows[1].figures["parameters"]     # (4 blocks, 8000 tokens)
    assert rows[1].figures["parameters"] == sum(
        p.numel() for p in random_model(job.model, torch.device("cpu"), torch.float32, 0).parameters())


def test_random_weights_are_built_in_their_dtype_with_unit_norms(tiny_config):
    cfg = tiny_config(tie_word_embeddings=False)
    model = random_model(cfg, torch.device("cpu"), torch.bfloat16, seed=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert bool((model.norm.weight == 1).all())
    w = model.layers[0].mlp.up_proj.weight.float()
    assert abs(w.std().item() - cfg.initializer_range) < 0.2 * cfg.initializer_range
    tied = random_model(tiny_config(), torch.device("cpu"), torch.float32, seed=1)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert torch.isfinite(tied(torch.tensor([[1, 2, 3]]))[0]).all()


@pytest.mark.parametrize("body, ok, summary", [
    ("def test_a():\n    assert True\n", True, "1 passed"),
    ("def test_a():\n    assert False\n", False, "1 failed"),
])
def test_the_gpu_tests_row_reports_pytest_verdict(tmp_path, body, ok, summary):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("import pytest\n\npytestmark = pytest.mark.gpu\n"
                                                 + body)
    (tmp_path / "tests" / "test_unmarked.py").write_text("def test_b():\n    assert False\n")
    row = gpu_tests(tmp_path / "tests")
    assert row.ok is ok and summary in row.result and "deselected" in row.result


def test_no_gpu_test_selected_fails_the_row(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_unmarked.py").write_text("def test_b():\n    assert True\n")
    assert not gpu_tests(tmp_path / "tests").ok


def test_compiled_steps_replay_as_cuda_graphs_on_a_gpu_and_wrap_in_cpp_on_the_cpu():
    assert compile_options(torch.device("cuda")) == {"mode": "reduce-overhead"}
    assert compile_options(torch.device("cpu")) == {"options": {"cpp_wrapper": True}}


def test_agreement_counts_missing_positions_as_different():
    assert agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert agreement([[1, 2, 3, 4]], [[1, 9]]) == 0.25


def test_tokens_may_part_from_full_decoding_only_at_near_ties(tiny_config):
    """The decoding rows' verdict: equal, or (bf16) parted where the full model's top two
    logits are within rel of each other; in fp32 not parted at all."""
    from tinyskip.analysis.gpu_check import parts_at_near_ties
    from tinyskip.decode import generate

    torch.manual_seed(0)
    model = random_model(tiny_config(), torch.device("cpu"), torch.float32, seed=0)
    prompt = torch.randint(0, 97, (1, 6))
    want = generate(model, prompt, 12).tokens[0]
    other = want[:3] + [(want[3] + 1) % 97] + want[4:]
    assert parts_at_near_ties(model, [prompt], [want], [want], exact=True)
    assert not parts_at_near_ties(model, [prompt], [want], [other], exact=True)
    assert not parts_at_near_ties(model, [prompt], [want], [other], rel=0.0)
    assert parts_at_near_ties(model, [prompt], [want], [other], rel=1e9)
    assert not parts_at_near_ties(model, [prompt], [want], [want[:-1]])      # cut short
    # The gap is relative to the top logit, and fp32 allows no part even at a tie.
    ids = torch.cat([prompt[0], torch.tensor(want[:3])])[None]
    top = model(ids)[0, 0, -1].topk(2).values
    ratio = float((top[0] - top[1]) / top[0].abs())
    assert parts_at_near_ties(model, [prompt], [want], [other], rel=ratio * 1.01)
    assert not parts_at_near_ties(model, [prompt], [want], [other], rel=ratio * 0.99)
    assert not parts_at_near_ties(model, [prompt], [want], [other], exact=True, rel=1e9)
