"""The evaluation job behind ``python -m tinyskip.evaluate``: per-exit loss, word-level
perplexity and agreement with the last exit on a split, and the table it prints."""

from __future__ import annotations

from typing import Optional

from ..config import DataConfig, UserError
from ..jobs import EvaluateJob
from ..runtime import pick_device
from ..storage.loading import Loaded, corpus_of, load_source, run_data_config, trained_seq_len
from .perplexity import exit_perplexities


def evaluate(job: EvaluateJob) -> dict:
    """Per-exit quality of a run (through its exit modules, for an exit-module run)."""
    loaded = load_source(job.run, job.checkpoint, job.checkpoint_root, None,
                         pick_device(job.device))
    return exit_quality(loaded, job.data, job.split, job.seq_len, job.batch_size,
                        job.max_batches, job.stride)


def exit_quality(loaded: Loaded, data: DataConfig, split: str, seq_len: Optional[int] = None,
                 batch_size: int = 16, max_batches: int = 0, stride: Optional[int] = None,
                 progress: bool = True) -> dict:
    """``exit_perplexities`` of a loaded model on a split of its run's data as it reads it
    (``corpus_of``; ``data``'s fields at their defaults come from the run's job.json),
    in windows of ``seq_len`` (None: the run's training seq_len)."""
    model = loaded.model
    seq_len = seq_len or trained_seq_len(loaded)
    ctx = model.config.max_position_embeddings
    if seq_len > ctx:
        raise UserError(f"seq_len={seq_len}: longer than the model's context "
                        f"(max_position_embeddings={ctx})")
    corpus = corpus_of(loaded, run_data_config(loaded.run_dir, data))
    ev = exit_perplexities(model, corpus.tokens[split], corpus.words[split], seq_len,
                           batch_size, max_batches, progress=progress, stride=stride)
    return {"checkpoint": str(loaded.exits or loaded.source), "split": split, "seq_len": seq_len,
            "stride": stride, "words": corpus.words[split], "tokens": ev["tokens"],
            "loss": ev["loss"], "word_ppl": ev["word_ppl"], "agreement": ev["agreement"],
            "p_last_top": ev["p_last_top"]}


def report(result: dict) -> str:
    """The evaluation as a table, one row per exit (exit E = the head after E blocks)."""
    lines = [f"{result['checkpoint']} on {result['split']} ({result['tokens']} tokens, "
             f"{result['words']} words, windows of {result['seq_len']}"
             + (f" every {result['stride']}" if result["stride"] else "") + ")",
             f"{'exit':>4} {'loss/token':>10} {'word ppl':>10} {'top-1 agree':>11} "
             f"{'p(last top)':>11}"]
    for exit, row in enumerate(zip(result["loss"], result["word_ppl"], result["agreement"],
                                   result["p_last_top"]), start=1):
        loss, ppl, agree, p_top = row
        lines.append(f"{exit:>4} {loss:>10.4f} {ppl:>10.2f} {agree:>11.3f} {p_top:>11.3f}")
    return "\n".join(lines)
