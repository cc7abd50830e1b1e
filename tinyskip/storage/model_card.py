"""The README.md model card of an export: Hub metadata (YAML front matter), the recipe
from the run's job.json, per-exit test numbers, the exit modules and calibration that
travel with the weights, and how to load them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import yaml

from ..config import DataConfig, ModelConfig


@dataclass
class CardFacts:
    """What the card says, gathered by the export (``analysis/export.py``)."""

    name: str                          # the export's folder name
    ref: str                           # what users load: the Hub repo id, else the folder
    license: str
    dtype: str                         # of the exported weights
    config: ModelConfig                # the exported model's shape
    n_params: int                      # the backbone's, tied embeddings counted once
    job: Optional[dict]                # the run's job.json (None: the run has none)
    data: DataConfig                   # the run's data, as the card's numbers read it
    numbers: Optional[dict] = None     # exit_quality on the test split (None: not measured)
    exits: Optional[dict] = None       # exit_modules.json as exported
    calibration: Optional[dict] = None          # calibration.json as exported
    calibration_note: Optional[str] = None      # why a calibration the run has was left out
    line_break: Optional[str] = None   # the token the model learnt line ends as (a tinyskip
                                       # tokenizer), which its tokenizer.json cannot produce


def hub_dataset(data: DataConfig) -> Optional[str]:
    """The Hub dataset the card's ``datasets:`` names: data.path when it is a Hub id; a
    local WikiText configuration is read from a copy of Salesforce/wikitext in the Hub's
    layout (the only corpus tinyskip's loader is written for); another local folder
    means nothing to a reader of the card, so none is named."""
    path = data.path
    if not path.startswith((".", "/", "~")) and path.count("/") == 1:
        return path
    return "Salesforce/wikitext" if data.name.startswith("wikitext-") else None


def front_matter(facts: CardFacts) -> dict:
    train = (facts.job or {}).get("train", {})
    tags = ["llama", "early-exit", "self-speculative-decoding"]
    if train.get("preset") == "layerskip":
        tags.append("layerskip")
    if facts.exits is not None:
        tags += ["exit-modules", "balcony"]
    if facts.calibration is not None:
        tags.append("calm")
    meta = {"license": facts.license, "library_name": "tinyskip", "tags": tags,
            "pipeline_tag": "text-generation"}
    dataset = hub_dataset(facts.data)
    if dataset is not None:
        meta["datasets"] = [dataset]
    return meta


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def recipe(job: dict, m: ModelConfig) -> list[str]:
    t, d = job.get("train", {}), job.get("data", {})
    tokens = t.get("max_steps", 0) * t.get("batch_size", 0) * t.get("seq_len", 0)
    rows = [
        ("preset", f"`{t.get('preset')}`"),
        # (from the model itself: a run's job.json has the model preset's vocabulary,
        # training sizes it to the tokenizer's)
        ("model", f"{m.num_hidden_layers} layers, hidden {m.hidden_size}, "
                  f"{m.num_attention_heads} heads ({m.num_key_value_heads} key/value), "
                  f"MLP {m.intermediate_size}, vocabulary {m.vocab_size}, "
                  f"context {m.max_position_embeddings}"),
        ("steps", f"{t.get('max_steps')} x batch {t.get('batch_size')} x seq_len "
                  f"{t.get('seq_len')} = {tokens:,} tokens"),
        ("optimiser", f"AdamW, lr {t.get('lr')} (warmup {t.get('warmup_steps')}, cosine to "
                      f"{t.get('min_lr_ratio')} x), weight decay {t.get('weight_decay')}"),
    ]
    if t.get("preset") == "balcony":
        rows.append(("exit modules", f"`{t.get('exit_kind')}` at exits {t.get('exit_layers')} on "
                                     f"a frozen backbone, KL weight {t.get('kl_weight')}, CE "
                                     f"weight {t.get('ce_weight')}"))
    else:
        rows += [
            ("LayerDrop", f"p_max {t.get('layerdrop_p_max')}, depth `{t.get('layerdrop_depth')}`, "
                          f"time `{t.get('layerdrop_time')}`"),
            ("early-exit loss", f"weighting `{t.get('exit_weighting')}`, e_scale "
                                f"{t.get('e_scale')}, curriculum `{t.get('curriculum')}`, "
                                f"exit token fraction {t.get('exit_token_fraction')}, "
                                f"self-distillation {t.get('distill_weight')}")]
    rows.append(("data", f"`{d.get('path')}` / `{d.get('name')}`, SentencePiece "
                         f"{d.get('tokenizer_model_type')} {d.get('vocab_size')}"
                         + (f", first {d['max_rows']} rows" if d.get("max_rows") else "")))
    return _table(rows)


def exit_numbers(numbers: dict, dataset: str) -> list[str]:
    lines = [f"Measured when exported, on the exported weights: {numbers['tokens']:,} tokens of "
             f"the test split of {dataset} in windows of {numbers['seq_len']} (exit E reads "
             "the output of block E; agreement is teacher-forced top-1 agreement with the "
             "last exit).", "",
             "| exit | loss / token | word perplexity | top-1 agreement with the last exit |",
             "|---:|---:|---:|---:|"]
    for e, (loss, ppl, agree) in enumerate(zip(numbers["loss"], numbers["word_ppl"],
                                               numbers["agreement"]), start=1):
        lines.append(f"| {e} | {loss:.4f} | {ppl:.2f} | {agree:.3f} |")
    return lines


def calibration_lines(cal: dict) -> list[str]:
    threshold = "never exit (no threshold met the guarantee)" if cal["threshold"] is None \
        else f"{cal['threshold']:.6g}"
    return ["`calibration.json`: a DEE threshold with CALM's guarantee, made on these weights "
            "(its `weights_hash`; any other weights are refused). `infer mode=dee` reads it "
            "by default."] + [""] + _table([
        ("threshold", threshold), ("measure", f"`{cal['measure']}`"),
        ("checked exits", str(cal["exits"])), ("cache", f"`{cal['cache']}`"),
        ("guarantee", f"expected {cal.get('loss')} loss against full decoding <= delta "
                      f"{cal.get('delta')} with probability >= 1 - epsilon {cal.get('epsilon')}"),
        ("certified length", f"greedy generations of up to {cal['max_new_tokens']} new tokens"),
        ("calibration set", f"{cal.get('n')} prompts of {cal.get('prompt_len')} tokens, "
                            f"{cal.get('split')} split")])


def loading(facts: CardFacts) -> list[str]:
    ref = facts.ref
    dee = ("mode=dee" if facts.calibration is not None else "mode=dee threshold=0.9")
    draft = max(1, facts.config.num_hidden_layers // 2)
    lines = [
        "With transformers (the last exit: plain decoding):", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'tokenizer = AutoTokenizer.from_pretrained("{ref}")',
        f'model = AutoModelForCausalLM.from_pretrained("{ref}")', "```", ""]
    if facts.line_break:
        lines += [f"The model learnt each line end as `{facts.line_break}` and never saw a "
                  "blank line; the tokenizer alone encodes a line break as an unknown "
                  f"piece. Encode text line by line (each line stripped, `{facts.line_break}` "
                  "after it), as tinyskip does itself.", ""]
    return lines + [
        "With tinyskip (every exit"
        + (", through the exit modules" if facts.exits is not None else "")
        + (", and the calibration" if facts.calibration is not None else "") + "):", "",
        "```bash",
        f'python -m tinyskip.infer model=hf_llama model.path={ref} mode=ssd '
        f'draft_layer={draft} prompt="The game"',
        f'python -m tinyskip.infer model=hf_llama model.path={ref} {dee} prompt="The game"',
        "```"]


def model_card(facts: CardFacts) -> str:
    dataset = hub_dataset(facts.data) or f"`{facts.data.path}`"
    preset = (facts.job or {}).get("train", {}).get("preset")
    lines = ["---", yaml.safe_dump(front_matter(facts), sort_keys=False).rstrip(), "---", "",
             f"# {facts.name}", "",
             f"A {facts.config.num_hidden_layers}-layer Llama-style decoder "
             f"({facts.n_params:,} parameters, "
             f"{facts.dtype} safetensors) exported by tinyskip"
             + (f" from a `{preset}` run" if preset else "") + ". Every block's output is an "
             "exit the shared head can read, for early-exit decoding (static exits, "
             "self-speculative decoding, dynamic early exit); transformers loads it as a "
             "plain `LlamaForCausalLM`.", ""]
    lines += ["## Recipe", ""]
    lines += recipe(facts.job, facts.config) if facts.job else \
        ["The run has no job.json: no recipe recorded."]
    lines += ["", "## Per-exit quality (test split)", ""]
    lines += exit_numbers(facts.numbers, dataset) if facts.numbers else \
        ["Not measured (exported with evaluate=false)."]
    if facts.exits is not None:
        lines += ["", "## Exit modules", "",
                  f"`exits/`: `{facts.exits['kind']}` modules at exits "
                  f"{facts.exits['exit_layers']}, "
                  "trained on this backbone with it frozen (tinyskip attaches them when it loads "
                  "the folder and refuses them on other weights; transformers ignores them)."]
    if facts.calibration is not None or facts.calibration_note:
        lines += ["", "## Calibration", ""]
        lines += calibration_lines(facts.calibration) if facts.calibration is not None else \
            [facts.calibration_note]
    lines += ["", "## How to load", ""] + loading(facts)
    return "\n".join(lines) + "\n"
