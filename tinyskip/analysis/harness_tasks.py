"""Two lm-evaluation-harness tasks over WikiText-2 wherever the data config points (the
Hub's ``Salesforce/wikitext`` or a local copy in its layout), defined as the harness's
own task configs (``ConfigurableTask`` fields, with functions where YAML has
``!function``), so that they run offline:

``tinyskip_wikitext2``           every test article scored whole (``loglikelihood_rolling``):
                                 the harness's word perplexity, byte perplexity and bits
                                 per byte. The articles are the split's lines joined from
                                 one top-level heading to the next, as in
                                 ``EleutherAI/wikitext_document_level`` (62 in test), and
                                 scored as written (no detokenising), so that the text is
                                 the text ``tinyskip.evaluate`` scores.
``tinyskip_wikitext2_continue``  the opening words of test paragraphs continued
                                 (``generate_until``, greedy, up to 32 tokens or the line
                                 end), scored by ROUGE-L against the paragraph's next
                                 words: a generation task for every decoding mode.
"""

from __future__ import annotations

import os
import re
from functools import partial

from ..config import DataConfig
from ..decode.run import opening_length
from .quality import RougeL

ROLLING, CONTINUE = "tinyskip_wikitext2", "tinyskip_wikitext2_continue"
TASKS = (ROLLING, CONTINUE)

# An article's title line (" = Robert Boulter = \n"); sections are " = = Career = = \n".
HEADING = re.compile(r"^ = [^=].* = \n$")
OPENING_WORDS, REFERENCE_WORDS = 12, 24


def articles(rows, max_rows: int = 0):
    """A split's rows (one line each; the first ``max_rows`` if > 0, as ``data.max_rows``
    reads them) -> one row per article, its lines joined ("page")."""
    import datasets

    pages, lines = [], []
    for text in rows["text"][: max_rows or None]:
        # (the blank rows that open a split join the first article: no empty document)
        if HEADING.match(text) and "".join(lines).strip():
            pages.append("".join(lines))
            lines = []
        lines.append(text)
    if "".join(lines).strip():
        pages.append("".join(lines))
    return datasets.Dataset.from_dict({"page": pages})


def openings(rows, max_rows: int = 0):
    """A split's paragraphs long enough to continue -> their opening ("prompt", cut as
    ``infer`` cuts its default prompts) and the next words ("reference")."""
    import datasets

    prompts, references = [], []
    for text in rows["text"][: max_rows or None]:
        words = text.split()
        if not words or text.startswith(" ="):
            continue
        cut = opening_length(words, OPENING_WORDS) if len(words) > OPENING_WORDS else 0
        if cut and len(words) >= cut + REFERENCE_WORDS:
            prompts.append(" ".join(words[:cut]))
            references.append(" ".join(words[cut: cut + REFERENCE_WORDS]))
    return datasets.Dataset.from_dict({"prompt": prompts, "reference": references})


_rouge = None


def rouge_result(doc: dict, results: list[str]) -> dict:
    global _rouge
    _rouge = _rouge or RougeL()
    return {"rougeL": _rouge(doc["reference"], results[0])}


def task_configs(data: DataConfig) -> dict[str, dict]:
    """Each local task's config, reading the data ``data`` names."""
    source = {"dataset_path": os.path.expanduser(data.path), "dataset_name": data.name,
              "test_split": "test", "metadata": {"version": 1.0}}
    return {
        ROLLING: {**source, "task": ROLLING, "output_type": "loglikelihood_rolling",
                  "process_docs": partial(articles, max_rows=data.max_rows), "doc_to_text": "", "doc_to_target": "{{page}}",
                  "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                                  for m, agg in (("word_perplexity", "weighted_perplexity"),
                                                 ("byte_perplexity", "weighted_perplexity"),
                                                 ("bits_per_byte", "bits_per_byte"))]},
        CONTINUE: {**source, "task": CONTINUE, "output_type": "generate_until",
                   "process_docs": partial(openings, max_rows=data.max_rows), "doc_to_text": "{{prompt}}",
                   "doc_to_target": "{{reference}}", "target_delimiter": " ",
                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 32,
                                         "do_sample": False},
                   "process_results": rouge_result,
                   "metric_list": [{"metric": "rougeL", "aggregation": "mean",
                                    "higher_is_better": True}]},
    }
