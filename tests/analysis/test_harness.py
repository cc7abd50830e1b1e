"""The lm-evaluation-harness adapter: its likelihoods equal the model's own, its rolling
scores cover every token once, its local WikiText-2 task scores the text tinyskip.evaluate
scores, generations go through each decoding mode, and the harness's own registry and
``simple_evaluate`` drive it."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from tinyskip.analysis.harness_lm import TinyskipLM  # noqa: E402
from tinyskip.analysis.harness_run import run_harness  # noqa: E402
from tinyskip.analysis.harness_tasks import articles  # noqa: E402
from tinyskip.config import DataConfig, UserError  # noqa: E402
from tinyskip.jobs import HarnessJob  # noqa: E402


@pytest.fixture(scope="module")
def job_for(trained_tiny, wikitext_path, data_cache):
    """``job_for(**options)``: a harness job on the trained tiny run."""
    _, _, run_dir = trained_tiny

    def make(**options) -> HarnessJob:
        data = DataConfig(path=wikitext_path, cache_dir=data_cache, max_rows=1000, vocab_size=300)
        return HarnessJob(**{"checkpoint": str(run_dir), "data": data, "device": "cpu",
                             **options})
    return make


@pytest.fixture(scope="module")
def lm(job_for) -> TinyskipLM:
    return TinyskipLM(job_for(batch_size=3))


def request(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def direct_logprob(model, ids: list[int], n: int, exit: int | None = None) -> tuple[float, bool]:
    """log p of the last n of ids given the ones before, from one forward pass."""
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits = model(x, exits=[exit or model.num_layers])[0, 0, -n:].float()    # (n, V)
    target = torch.tensor(ids[-n:])
    return (-F.cross_entropy(logits, target, reduction="sum").item(),
            bool((logits.argmax(-1) == target).all()))


def test_loglikelihood_equals_the_models_own(lm):
    pairs = [("The game was", " played in the first season"), ("a", " band"),
             ("In the new season the team", " was"), ("", "the first game")]
    got = lm.loglikelihood([request("loglikelihood", p, i) for i, p in enumerate(pairs)])
    model, tok = lm.model, lm.tok
    for (context, cont), (logprob, greedy) in zip(pairs, got):
        if context:
            ctx_ids = tok.encode(context, special=False)
            ids = tok.encode(context + cont, special=False)
        else:
            ctx_ids, ids = [lm.prefix_token_id], [lm.prefix_token_id] + tok.encode(cont)
        want, want_greedy = direct_logprob(model, ids, len(ids) - len(ctx_ids))
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy


def test_static_mode_scores_its_exit(job_for, lm):
    static = TinyskipLM(job_for(mode="static", exit_layer=2))
    text = ("The game was", " played in the first season")
    (got, _), = static.loglikelihood([request("loglikelihood", text)])
    (full, _), = lm.loglikelihood([request("loglikelihood", text)])
    ids = lm.tok.encode(text[0] + text[1], special=False)
    n = len(ids) - len(lm.tok.encode(text[0], special=False))
    assert got == pytest.approx(direct_logprob(static.model, ids, n, exit=2)[0], rel=1e-5)
    assert got != pytest.approx(full, rel=1e-3)


def test_rolling_scores_every_token_once_in_short_windows(job_for, lm):
    doc = " = Title = \n the first game of the new season was played \n\n the band played \n"
    ids = lm.tok.encode(doc)
    assert ids.count(min(lm.tok.stop_ids())) == 3        # one EOS per non-blank line
    assert 32 < len(ids) < 128 and lm.max_length == 32      # the run's training windows
    whole, = TinyskipLM(job_for(max_length=128)).loglikelihood_rolling(
        [request("loglikelihood_rolling", (doc,))])
    want, _ = direct_logprob(lm.model, [lm.prefix_token_id] + ids, len(ids))
    assert whole == pytest.approx(want, rel=1e-5)
    short = TinyskipLM(job_for(max_length=4))
    before = short.scored_tokens
    windowed, = short.loglikelihood_rolling([request("loglikelihood_rolling", (doc,))])
    assert short.scored_tokens - before == len(ids)
    assert windowed < whole                    # less context per token: a worse score


def test_local_task_scores_the_text_evaluate_scores(trained_tiny, job_for, lm, wikitext_path):
    """The articles of the test split tokenize to exactly tinyskip.evaluate's token stream,
    and the harness's word perplexity matches evaluate's NLL under the harness's word
    count (context restarts at each article are the only other difference)."""
    import datasets

    from tinyskip.analysis.perplexity import exit_perplexities

    model, corpus, _ = trained_tiny
    rows = datasets.load_dataset(wikitext_path, "wikitext-2-raw-v1")["test"]
    pages = articles(rows, max_rows=1000)["page"]
    assert "".join(pages) == "".join(rows["text"][:1000]) and all(p.strip() for p in pages)
    assert len(articles(rows)) == 62                 # as EleutherAI/wikitext_document_level
    stream = [t for page in pages for t in lm.tok.encode(page)]
    assert stream == corpus.tokens["test"].tolist()
    result = run_harness(job_for(batch_size=64))    # tasks=[tinyskip_wikitext2], the whole split
    got = result["results"]["tinyskip_wikitext2"]["word_perplexity,none"]
    words = sum(len(re.split(r"\s+", p)) for p in pages)      # the harness's count
    ev = exit_perplexities(model, np.asarray(corpus.tokens["test"]), corpus.words["test"], 32)
    nll = ev["loss"][-1] * ev["tokens"]
    assert result["throughput"]["scored_tokens"] == len(stream)
    assert got == pytest.approx(math.exp(nll / words), rel=0.01)


def test_ssd_generations_equal_full_ones_and_stop_at_until(job_for, lm):
    prompts = ["the first game of the", "The band played", "a new season", ""]
    free = lm.generate_until([request("generate_until", (p, {"max_gen_toks": 12}), i)
                              for i, p in enumerate(prompts)])
    assert all(free) and not any(text.endswith("\n") for text in free)   # EOS dropped
    # A word each free generation reaches is its stop string: the text is cut before it.
    stops = [text.split()[len(text.split()) // 2] for text in free]
    reqs = [request("generate_until", (p, {"until": [stop], "max_gen_toks": 12}), i)
            for i, (p, stop) in enumerate(zip(prompts, stops))]
    full = lm.generate_until(reqs)
    assert full == [text.split(stop)[0] for text, stop in zip(free, stops)]
    ssd = TinyskipLM(job_for(mode="ssd", draft_layer=2, k=3))
    assert ssd.generate_until(reqs) == full
    assert ssd.stats.drafted > ssd.stats.accepted > 0     # drafts both accepted and rejected
    # A task's do_sample=False is greedy whatever the job's temperature.
    hot = TinyskipLM(job_for(temperature=1.0))
    greedy = {"max_gen_toks": 12, "do_sample": False}
    assert hot.generate_until([request("generate_until", (prompts[0], greedy))]) == free[:1]
    assert hot.generate_until([request("generate_until", (prompts[0], {"max_gen_toks": 12}))]) \
        != free[:1]


def test_a_greedy_continuation_is_flagged_greedy(lm):
    """Scored as tokens: a decoded text can tokenize otherwise than it was generated."""
    from tinyskip.decode import decode

    context = lm.tok.encode("The band played")
    tokens = decode(lm.model, torch.tensor([context]), 6, lm.spec).tokens[0]
    changed = tokens[:-1] + [(tokens[-1] + 1) % lm.model.config.vocab_size]
    (_, greedy), (_, other) = lm._loglikelihood_tokens([(None, context, tokens),
                                                        (None, context, changed)])
    assert greedy and not other


def test_a_prompt_longer_than_the_context_keeps_its_end(lm):
    tail = " ".join(["the band played"] * 12)
    long = " ".join(["a new season"] * 40) + " " + tail
    assert len(lm.tok.encode(long)) + 12 > lm.model.config.max_position_embeddings
    cut = lm.tok.encode(long)[-(lm.model.config.max_position_embeddings - 12):]
    args = {"max_gen_toks": 12}
    assert lm.generate_until([request("generate_until", (long, args))]) == \
        lm.generate_until([request("generate_until", (lm.tok.decode(cut), args))])
    with pytest.raises(UserError, match="max_gen_toks=200: leaves no room"):
        lm.generate_until([request("generate_until", ("The band", {"max_gen_toks": 200}))])


def test_registered_with_the_harness(trained_tiny, wikitext_path, data_cache):
    """simple_evaluate(model="tinyskip", model_args=...) through the harness's registry."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tinyskip.analysis.harness_tasks import task_configs

    _, _, run_dir = trained_tiny
    data = {"path": wikitext_path, "cache_dir": data_cache, "max_rows": 1000, "vocab_size": 300}
    out = simple_evaluate(model="tinyskip", model_args={"checkpoint": str(run_dir), "data": data},
                          tasks=[task_configs(DataConfig(**data))["tinyskip_wikitext2_continue"]],
                          limit=2, bootstrap_iters=0, log_samples=False,
                          task_manager=TaskManager(include_defaults=False))
    assert 0 <= out["results"]["tinyskip_wikitext2_continue"]["rougeL,none"] <= 1
    with pytest.raises(UserError, match="model_args"):
        TinyskipLM(no_such_option=1)


def test_dee_generates_and_refuses_to_score(job_for):
    dee = TinyskipLM(job_for(mode="dee", threshold=0.5))
    text, = dee.generate_until([request("generate_until", ("The band", {"max_gen_toks": 6}))])
    assert isinstance(text, str) and dee.stats.new_tokens > 0
    with pytest.raises(UserError, match="mode=dee cannot score"):
        dee.loglikelihood([request("loglikelihood", ("The band", " played"))])


def test_an_export_scores_as_its_run_and_a_bos_tokenizer_puts_bos_first(trained_tiny, job_for,
                                                                         lm, tmp_path):
    """An export's tokenizer encodes line breaks as the run's EOS (so the harness scores it
    as the run); a tokenizer.json whose post-processor adds BOS gets BOS before every
    likelihood context and as the rolling prefix, once."""
    import json

    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    from tinyskip.config import ModelConfig
    from tinyskip.storage.hf_llama import LINE_BREAK, export_run

    model, _, run_dir = trained_tiny
    folder = export_run(run_dir, tmp_path / "export")
    exported = TinyskipLM(job_for(checkpoint=None, model=ModelConfig(path=str(folder)),
                                  max_length=32))           # (the run's training window)
    doc = " = Title = \n the first game of the new season was played \n\n the band played \n"
    assert exported.tok.encode(doc) == lm.tok.encode(doc)
    rolling = [request("loglikelihood_rolling", (doc,))]
    assert exported.loglikelihood_rolling(rolling) == pytest.approx(
        lm.loglikelihood_rolling(rolling), rel=1e-6)

    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config[LINE_BREAK]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    bos = TinyskipLM(job_for(checkpoint=None, model=ModelConfig(path=str(folder)), max_length=128))
    assert bos.tok.bos_id == 1 == bos.prefix_token_id
    context, cont = "The game was", " played in the first season"
    (got, _), = bos.loglikelihood([request("loglikelihood", (context, cont))])
    ctx = bos.tok.encode(context)
    assert ctx[0] == 1 and ctx[1] != 1
    ids = bos.tok.encode(context + cont)
    assert got == pytest.approx(direct_logprob(model, ids, len(ids) - len(ctx))[0], rel=1e-5)
    line = "the first game of the new season was played"
    plain = bos.tok.encode(line, special=False)
    whole, = bos.loglikelihood_rolling([request("loglikelihood_rolling", (line,))])
    assert whole == pytest.approx(direct_logprob(model, [1] + plain, len(plain))[0], rel=1e-5)
    config[LINE_BREAK] = "<no-such-token>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'<no-such-token>' is not a token of the tokenizer"):
        TinyskipLM(job_for(checkpoint=None, model=ModelConfig(path=str(folder))))


def test_throughput_counts_what_was_scored_and_generated(job_for):
    """The report's tokens/s (docs/results/harness.md): generated tokens over decoding
    time, compiling not counted; scored tokens over scoring time."""
    fresh = TinyskipLM(job_for())
    fresh.generate_until([request("generate_until", ("The band", {"max_gen_toks": 5}))])
    fresh.loglikelihood([request("loglikelihood", ("The band", " played in the game"))])
    t, s = fresh.throughput(), fresh.stats
    assert t["new_tokens"] == s.new_tokens > 0
    assert t["generation_tokens_per_s"] == pytest.approx(s.new_tokens / s.decode_s)
    n = len(fresh.tok.encode("The band played in the game", special=False)) - \
        len(fresh.tok.encode("The band", special=False))
    assert t["scored_tokens"] == fresh.scored_tokens == n
    assert t["scoring_tokens_per_s"] == pytest.approx(n / fresh.scoring_s)
