"""``python -m tinyskip.infer mode=ssd draft_layer=3 k=4 run=NAME prompt="..."``.

The model is rebuilt from the checkpoint's own config (not from conf/model/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .checkpoint import write_json_atomic
from .cli import entry_point
from .config import UserError
from .data import prepare_corpus
from .generate import SamplingConfig
from .jobs import InferJob
from .loading import Loaded, load_source
from .modes import ModeSpec, decode
from .ssd import SSDConfig, frequent_tokens
from .trainer import pick_device


def mode_spec(job) -> ModeSpec:
    """The decoding mode a job (infer or bench) asks for."""
    ssd = (SSDConfig(job.draft_layer, job.k, job.adaptive_threshold, job.draft_vocab)
           if job.mode == "ssd" else None)
    return ModeSpec(job.mode, job.exit_layer, ssd)


def read_prompts(job: InferJob) -> list[str]:
    if job.prompt is not None:
        return [job.prompt]
    path = Path(job.prompts_file)
    if not path.is_file():
        raise UserError(f"prompts_file={job.prompts_file!r}: no such file")
    prompts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts_file={job.prompts_file!r} holds no prompt")
    return prompts


def continuation(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Text of the new tokens as they read after the prompt (spacing kept), EOS as a newline."""
    text = tok.decode(prompt_ids + [t for t in new_ids if t != tok.eos_id()])
    eos = "\n" if new_ids and new_ids[-1] == tok.eos_id() else ""
    return text[len(tok.decode(prompt_ids)):] + eos


def draft_vocabulary(loaded: Loaded, spec: ModeSpec, data) -> Optional[torch.Tensor]:
    """The N most frequent training tokens, for ``draft_vocab=N`` (None when off)."""
    if spec.ssd is None or not spec.ssd.draft_vocab:
        return None
    if loaded.tokenizer_file is None:
        raise UserError("draft_vocab needs token frequencies of the training data, known only "
                        "for tinyskip checkpoints")
    train_tokens = prepare_corpus(data, loaded.tokenizer_file).tokens["train"]
    return frequent_tokens(train_tokens, loaded.model.config.vocab_size, spec.ssd.draft_vocab)


def infer(job: InferJob) -> list[dict]:
    spec = mode_spec(job)
    sampling = SamplingConfig(job.temperature, job.top_k, job.top_p)
    device = pick_device(job.device)
    loaded = load_source(job.run, job.checkpoint, job.checkpoint_root, job.model, device, job.dtype)
    model, tok = loaded.model, loaded.tokenizer
    if spec.ssd is not None:
        spec.ssd.validate(model.num_layers)
    draft_ids = draft_vocabulary(loaded, spec, job.data)
    eos = tok.eos_id() if job.stop_at_eos else None
    generator = torch.Generator(device=device).manual_seed(job.seed)
    results = []
    for text in read_prompts(job):
        ids = tok.encode(text)
        prompt = torch.tensor([ids], dtype=torch.long, device=device)
        gen = decode(model, prompt, job.max_new_tokens, spec, sampling, eos, generator, draft_ids)
        tokens = gen.tokens[0]
        results.append({"prompt": text, "mode": spec.label, "prompt_ids": ids, "ids": tokens,
                        "text": continuation(tok, ids, tokens), "stats": gen.stats.as_dict()})
    return results


def stats_line(s: dict) -> str:
    line = (f"[{s['new_tokens']} new tokens, {s['tokens_per_s']:.1f} tok/s, prefill "
            f"{s['prompt_tokens']} tokens in {s['prefill_s'] * 1e3:.1f} ms, "
            f"{s['layers_per_token']:.2f} layers/token, {s['heads_per_token']:.2f} heads/token")
    if "acceptance" in s:
        line += f", acceptance {s['acceptance']:.2f}, mean accepted {s['mean_accepted']:.2f}"
    return line + "]"


@entry_point("infer")
def main(job: InferJob) -> None:
    results = infer(job)
    for r in results:
        print(r['prompt'] + r['text'])
        print(f"{r['mode']} {stats_line(r['stats'])}")
    if job.out:
        write_json_atomic(Path(job.out).resolve(), results)


if __name__ == "__main__":
    main()
