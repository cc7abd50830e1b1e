"""The ``transformers`` baselines of the benchmark: the same weights in the same dtype (the
Hugging Face folder a model was loaded from, or a tinyskip checkpoint exported through
``export_hf``), decoded by ``LlamaForCausalLM.generate`` greedily, plain and with
``assistant_early_exit=E`` (Hugging Face's self-speculation: the draft shares weights but
keeps its own cache, and verification recomputes all L layers)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..storage.hf_llama import export_hf
from ..storage.loading import Loaded


def hf_rows(loaded: Loaded, prompts: list[torch.Tensor], max_new_tokens: int,
            early_exits: list[int], reference: list[list[int]]) -> list[dict]:
    """tokens/s of ``generate`` per configuration (prefill excluded as in tinyskip's rows:
    a one-token generate per prompt is timed and subtracted) and agreement with
    ``reference`` (tinyskip's full greedy tokens). Empty when transformers is missing."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not installed: the Hugging Face baselines are skipped")
        return []
    dtype = loaded.model.embed_tokens.weight.dtype
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(loaded.source) if loaded.fmt == "hf" else \
            export_hf(loaded.model, loaded.tokenizer_file, Path(tmp) / "hf", torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    # The benchmark's tinyskip rows never stop early: neither does generate.
    hf.generation_config.eos_token_id = None
    rows = []
    for label, extra in [("hf generate", {})] + [
            (f"hf assistant_early_exit={e}", {"assistant_early_exit": e}) for e in early_exits]:
        def gen(prompt, n):
            # An explicit mask: without one, generate masks every prompt token equal to
            # the pad id.
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                               do_sample=False, pad_token_id=0, **extra)
        gen(prompts[0], max_new_tokens)                                   # warm-up
        tokens, seconds, agree, outs = 0, 0.0, 0, []
        for prompt, ref in zip(prompts, reference):
            with torch.no_grad():
                t0 = time.perf_counter()
                gen(prompt, 1)
                t1 = time.perf_counter()
                out = gen(prompt, max_new_tokens)[0, prompt.shape[1]:].tolist()
                t2 = time.perf_counter()
            seconds += (t2 - t1) - (t1 - t0)
            tokens += len(out)      # as tinyskip counts: every new token, prefill's time excluded
            agree += sum(a == b for a, b in zip(out, ref))
            outs.append(out)
        rows.append({"mode": label, "dtype": str(hf.dtype).removeprefix("torch."),
                     "tokens_per_s": tokens / seconds,
                     "agreement": agree / sum(len(r) for r in reference), "generated": outs})
    return rows
