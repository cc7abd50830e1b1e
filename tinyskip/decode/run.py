"""The decoding job behind ``python -m tinyskip.infer``: the mode a job asks for (a DEE
threshold from its calibration file), the prompts (given, from a file, from standard
input, or the test split's paragraph openings), and each prompt's generation and statistics.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..config import DataConfig, DEEConfig, UserError
from ..jobs import InferJob
from ..runtime import pick_device
from ..storage.data import load_lines
from ..storage.loading import (Loaded, check_calibrated_length, default_calibration,
                               draft_vocabulary, exit_classifier_for, load_source,
                               read_calibration, run_data_config)
from . import ModeSpec, Steps, decode
from .steps import ragged_batch

# New tokens per prompt when max_new_tokens is not given and no calibration file decides.
DEFAULT_NEW_TOKENS = 64


def calibration_file(job: InferJob, loaded: Loaded) -> Path:
    """``calibration=``, else the run's own (``default_calibration``)."""
    path = Path(job.calibration) if job.calibration else default_calibration(loaded)
    if not path.is_file():
        raise UserError(f"mode=dee needs threshold=<value> or a calibration file; "
                        f"{str(path)!r} does not exist (python -m tinyskip.calibrate writes it)")
    return path


def calibrated_decoder(job: InferJob, path: Path, loaded: Loaded) -> tuple[DEEConfig, int]:
    """The decoder a calibration file certifies and the generation length it covers (the
    job's ``max_new_tokens`` if given and covered, else the calibrated length). The
    options that change the decoder were refused with the job (``InferJob``)."""
    cal = read_calibration(path, loaded)
    for name, value in (("measure", job.measure), ("cache", job.cache)):
        if value is not None and value != cal[name]:
            raise UserError(f"{name}={value!r}: the calibration file {str(path)!r} holds a "
                            f"threshold for {name}={cal[name]!r}")
    n = job.max_new_tokens or cal["max_new_tokens"]
    check_calibrated_length(path, cal, n)
    return DEEConfig(cal["measure"], cal["threshold"], cal["exits"], cache=cal["cache"]), n


def mode_spec(job: InferJob, loaded: Loaded) -> tuple[ModeSpec, int, Optional[Path]]:
    """The decoding mode a job asks for, validated against the loaded model; the new
    tokens per prompt; the calibration file it runs under, if any."""
    n, cal_path, dee = job.max_new_tokens or DEFAULT_NEW_TOKENS, None, None
    if job.calibrated:
        cal_path = calibration_file(job, loaded)
        dee, n = calibrated_decoder(job, cal_path, loaded)
    elif job.mode == "dee":
        dee = job.dee()
    spec = ModeSpec(job.mode, job.exit_layer, job.ssd() if job.mode == "ssd" else None, dee)
    spec.validate(loaded.model.num_layers)
    spec.classifier = exit_classifier_for(loaded, spec)
    return spec, n, cal_path


def read_prompts(job: InferJob, fallback: Callable[[], list[str]]) -> Iterator[str]:
    """``prompt=``, else ``prompts_file=``, else standard input's lines; standard input
    that is not a terminal and gives none falls back to ``fallback()`` (so the bare
    command decodes something when run from a script)."""
    if job.prompt is not None:
        yield job.prompt
        return
    if job.prompts_file is None:
        given = False
        for line in _stdin_prompts():
            given = True
            yield line
        if not given and (sys.stdin is None or not sys.stdin.isatty()):
            prompts = fallback()
            print(f"no prompt= or prompts_file= and nothing on standard input: continuing "
                  f"the openings of {len(prompts)} test-split paragraphs", file=sys.stderr)
            yield from prompts
        return
    path = Path(job.prompts_file)
    if not path.is_file():
        raise UserError(f"prompts_file={job.prompts_file!r}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompts_file={job.prompts_file!r} is not UTF-8 text ({e.reason} at "
                        f"byte {e.start})")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts_file={job.prompts_file!r} holds no prompt")
    yield from prompts


def _stdin_prompts() -> Iterator[str]:
    if sys.stdin is None:           # a detached process has no standard input at all
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def opening_prompts(data: DataConfig, n: int = 3, words: int = 12) -> list[str]:
    """About the first ``words`` words of the test split's first ``n`` paragraphs
    (headings, the " = Title = " lines, skipped), cut mid-sentence: never at a
    punctuation mark nor just before one, so the text asks to be continued (an opening
    that ends a sentence invites the end of the text at once)."""
    lines = [line.strip() for line in load_lines(data)[0]["test"]]
    paragraphs = [line.split() for line in lines if line and not line.startswith("=")]
    return [" ".join(p[:opening_length(p, words)])
            for p in paragraphs if len(p) > words][:n]


def opening_length(paragraph: list[str], words: int) -> int:
    """How many of ``paragraph``'s words (at most ``words``) an opening keeps: it backs off
    until its last word is a word and the next one is not a punctuation mark."""
    def mark(word: str) -> bool:
        return not any(c.isalnum() for c in word)

    cut = words
    while cut > 1 and (mark(paragraph[cut - 1]) or mark(paragraph[cut])):
        cut -= 1
    return cut


def continuation(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Text of the new tokens as they read after the prompt (spacing kept), EOS as a newline."""
    stops = tok.stop_ids()
    text = tok.decode(prompt_ids + [t for t in new_ids if t not in stops])
    eos = "\n" if new_ids and new_ids[-1] in stops else ""
    return text[len(tok.decode(prompt_ids)):] + eos


def generations(job: InferJob) -> Iterator[dict]:
    """Decode the prompts as they come (standard input is read lazily), ``batch_size`` at
    a time: a batch's rows each get their text, and the batch's statistics (``batch``: its
    number of rows, the row's index in it)."""
    sampling = job.sampling()
    device = pick_device(job.device)
    loaded = load_source(job.run, job.checkpoint, job.checkpoint_root, job.model, device, job.dtype,
                         job.quantize)
    model, tok = loaded.model, loaded.tokenizer
    spec, max_new_tokens, cal_path = mode_spec(job, loaded)
    draft_ids = draft_vocabulary(loaded, spec, job.data)
    eos = tok.stop_ids() if job.stop_at_eos else None
    generator = torch.Generator(device=device).manual_seed(job.seed)
    steps = Steps(model, compile=job.compile)       # shared, so graphs compile once
    note = True                                     # the regime note goes with the first
    prompts = read_prompts(job, lambda: opening_prompts(run_data_config(loaded.run_dir,
                                                                          job.data)))
    for texts in groups(prompts, job.batch_size):
        ids = [tok.encode(text) for text in texts]
        prompt, lengths = ragged_batch(ids, device)
        gen = decode(model, prompt, max_new_tokens, spec, sampling, eos, generator, draft_ids,
                     steps, lengths if len(ids) > 1 else None)
        for row, (text, prompt_ids, tokens) in enumerate(zip(texts, ids, gen.tokens)):
            yield {"prompt": text, "mode": spec.label, "prompt_ids": prompt_ids, "ids": tokens,
                   "text": continuation(tok, prompt_ids, tokens), "stats": gen.stats.as_dict(),
                   "batch": {"rows": len(ids), "row": row},
                   "ended": bool(tokens) and tokens[-1] in tok.stop_ids(),
                   "compiled": steps.compiled and spec.mode != "dee",   # DEE's steps: eager
                   "calibration": str(cal_path) if cal_path else None,
                   "note": regime_note(model, spec.mode) if note else None}
            note = False


def groups(items: Iterator[str], n: int) -> Iterator[list[str]]:
    """``items`` n at a time (the last group may be shorter), read as they come."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


# Weights below about this size stay in a CPU's last-level cache (32 MiB measured here):
# there a step is bound by compute and per-op overhead, not by reading the weights.
CACHE_RESIDENT_BYTES = 32 * 2 ** 20


def regime_note(model, mode: str) -> Optional[str]:
    """One honest line for an early-exit mode on a model small enough to live in cache,
    where early exit does not pay (docs/results/decoding.md shows it measured)."""
    if mode not in ("ssd", "dee") or model.lm_head.weight.device.type != "cpu":
        return None
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= CACHE_RESIDENT_BYTES:
        return None
    return (f"note: this model's weights ({size / 2 ** 20:.1f} MiB) fit in a CPU cache, where "
            f"a step costs compute and per-op overhead rather than reading weights, so "
            f"mode={mode} is usually slower than full decoding here; early exit pays on "
            "models bound by reading their weights (docs/results/decoding.md; compare with "
            "python -m tinyskip.bench)")


def infer(job: InferJob) -> list[dict]:
    return list(generations(job))


def shown_text(r: dict) -> str:
    """A generation as ``infer`` prints it: the prompt, ``->``, the continuation; ``<end>``
    where the model ended the text, and ``[...]`` where the length limit cut it, after
    the last whole word (a cut token can be half a word)."""
    text = r["text"].rstrip("\n")
    if r["ended"]:
        return f"{r['prompt']} -> {text.strip()} <end>"
    words = text.split()
    # Cut by the limit: the last word may go on in the next token, so it is left out.
    return f"{r['prompt']} -> {' '.join(words[:-1] if len(words) > 1 else words)} [...]"


def stats_line(r: dict) -> str:
    """A generation's statistics; the time compiling graphs is shown apart, never in tok/s."""
    s = r["stats"]
    steps = "compiled steps" if r["compiled"] else "eager steps"
    rows = r.get("batch", {}).get("rows", 1)
    if rows > 1:
        steps += f", a batch of {rows} prompts"
    if r["ended"] and s["new_tokens"] == 1 and rows == 1:
        line = f"[the model ended the text at once: no decoding speed to report, {steps}"
    else:
        line = f"[{s['new_tokens']} new tokens, {s['tokens_per_s']:.1f} tok/s, {steps}"
    if s["compile_s"]:
        line += f" (compiling the decoding steps took {s['compile_s']:.1f} s, not counted)"
    line += (f", prefill {s['prompt_tokens']} tokens in {s['prefill_s'] * 1e3:.1f} ms, "
             f"{s['layers_per_token']:.2f} layers/token, {s['heads_per_token']:.2f} heads/token")
    if "acceptance" in s:
        line += f", acceptance {s['acceptance']:.2f}, mean accepted {s['mean_accepted']:.2f}"
    if s.get("mean_exit") is not None:
        line += f", mean exit {s['mean_exit']:.2f}"
    if s.get("exit_rounds"):            # choose=del: the exits and draft counts it chose
        by_exit = ", ".join(f"E={e}: {n}" for e, n in sorted(s["exit_rounds"].items()))
        line += f", rounds by exit {{{by_exit}}} (E=L: full steps), by drafts {s['draft_hist']}"
    return line + "]"
