"""Checks that need CUDA; they skip cleanly on machines without it (CI has no GPU).
``python -m tinyskip.gpu_check`` runs them (``pytest -m gpu``) with its benchmark."""

import pytest
import torch

from tinyskip.config import SSDConfig
from tinyskip.decode import Steps, generate, ssd_generate
from tinyskip.model.transformer import Transformer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_logits_match_cpu_and_greedy_ssd_equals_full_on_gpu(tiny_config):
    torch.manual_seed(0)
    cpu = Transformer(tiny_config()).eval()
    gpu = Transformer(tiny_config()).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    ids = torch.randint(0, 97, (2, 24))
    torch.testing.assert_close(gpu(ids.cuda())[0].cpu(), cpu(ids)[0], atol=1e-4, rtol=1e-4)
    prompt = ids[:1, :8].cuda()
    full = generate(gpu, prompt, 20).tokens
    assert ssd_generate(gpu, prompt, 20, SSDConfig(2, 3)).tokens == full


def test_bf16_decoding_on_gpu_runs_every_mode(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval().cuda().to(torch.bfloat16)
    prompt = torch.randint(0, 97, (1, 8), device="cuda")
    for gen in (generate(model, prompt, 10), generate(model, prompt, 10, exit_layer=2),
                ssd_generate(model, prompt, 10, SSDConfig(2, 2))):
        assert len(gen.tokens[0]) == 10


def test_compiled_steps_replay_as_cuda_graphs_and_decode_what_eager_decodes(tiny_config):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval().cuda()
    prompt = torch.randint(0, 97, (1, 8), device="cuda")
    eager = generate(model, prompt, 24).tokens
    skips = counters["inductor"]["cudagraph_skips"]
    steps = Steps(model, compile=True)
    for _ in range(2):      # the second generation's new cache re-records, never recompiles
        assert generate(model, prompt, 24, steps=steps).tokens == eager
        assert ssd_generate(model, prompt, 24, SSDConfig(2, 3), steps=steps).tokens == eager
    # Ragged rows together: batched SSD reads draft states across compiled calls.
    from tinyskip.decode.steps import ragged_batch
    batch, lengths = ragged_batch([prompt[0], prompt[0, :3]])
    full = generate(model, batch, 24, lengths=lengths).tokens
    assert ssd_generate(model, batch, 24, SSDConfig(2, 3), steps=steps,
                        lengths=lengths).tokens == full
    assert steps.compiled
    # A mutated input that is not a static address would have made the graph skip.
    assert counters["inductor"]["cudagraph_skips"] == skips


def test_the_gpu_check_runs_end_to_end_on_a_tiny_model():
    from tinyskip.analysis.gpu_check import run_checks
    from tinyskip.cli import compose_job

    job = compose_job("gpu_check", ["model=l4_d64", "dtype=float32", "tests=false",
                                    "fsdp=false", "stream_mib=256", "max_new_tokens=16",
                                    "draft_layer=2", "k=3"])
    rows = run_checks(job)
    assert all(r.ok for r in rows), [r.result for r in rows]
    assert rows[3].check == "full, CUDA graphs" and rows[3].figures["cudagraph_skips"] == 0
