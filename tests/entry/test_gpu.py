"""Checks that need CUDA; they skip cleanly on machines without it (CI has no GPU)."""

import pytest
import torch

from tinyskip.config import SSDConfig
from tinyskip.decode import generate, ssd_generate
from tinyskip.model.transformer import Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
