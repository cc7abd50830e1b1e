"""A tinyskip model as an lm-evaluation-harness ``LM``, registered as ``tinyskip``.

Likelihoods (``loglikelihood``, ``loglikelihood_rolling``) are teacher-forced through the
full model, or through exit ``exit_layer`` under ``mode=static`` (to score an exit):
``mode=ssd`` scores as ``full`` does, since its output distribution is the full model's.
``mode=dee`` is refused there: which exit a token leaves at depends on the cache it is
decoded with, so a teacher-forced score would not be DEE's. Generations
(``generate_until``) go through the job's decoding mode, one request at a time (the
decoders take one sequence: prompts of different lengths would need ragged positions),
and are cut at the first stop string. Scoring windows are batched (``batch_size``).

The harness's own rolling windows (``get_rolling_token_windows``) split long documents:
each token is scored once, with up to ``max_length`` tokens of context (the run's
training window by default). Generation is not held to that window: a prompt keeps as
many of its last tokens as the model's context leaves beside ``max_gen_toks``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..config import DataConfig, ModelConfig, SamplingConfig, UserError
from ..decode import Steps, decode
from ..decode.run import continuation, mode_spec
from ..decode.stats import DecodeStats
from ..jobs import HarnessJob
from ..runtime import pick_device, progress_bar
from ..storage.loading import (check_calibrated_length, draft_vocabulary, load_source,
                               trained_seq_len)

LIKELIHOOD = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")


def job_from_args(options: dict) -> HarnessJob:
    """``simple_evaluate(model="tinyskip", model_args=...)``'s options as a job (nested
    ``data`` / ``model`` options given as dicts)."""
    nested = {"data": DataConfig, "model": ModelConfig}
    try:
        return HarnessJob(**{k: nested[k](**v) if k in nested and isinstance(v, dict) else v
                             for k, v in options.items()})
    except TypeError as e:
        raise UserError(f"model_args: {e} (the options are tinyskip.harness's)") from None


@register_model("tinyskip")
class TinyskipLM(TemplateLM):
    # (max_batch_size: the harness passes it; batches are batch_size windows here)
    def __init__(self, job: Optional[HarnessJob] = None, max_batch_size=None, **options):
        super().__init__()
        self.job = job or job_from_args(options)
        self._device = pick_device(self.job.device)
        self.loaded = load_source(self.job.run, self.job.checkpoint, self.job.checkpoint_root,
                                  self.job.model, self._device, self.job.dtype,
                                  self.job.quantize)
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        self.spec, self.cal_length, self.cal_path = mode_spec(self.job, self.loaded)
        self.draft_ids = draft_vocabulary(self.loaded, self.spec, self.job.data)
        self.steps = Steps(self.model, compile=self.job.compile)
        self.exit = self.spec.exit_layer if self.spec.mode == "static" else self.model.num_layers
        self.max_length = self.job.max_length or trained_seq_len(self.loaded)
        ctx = self.model.config.max_position_embeddings
        if self.max_length > ctx:
            raise UserError(f"max_length={self.max_length}: longer than the model's context "
                            f"(max_position_embeddings={ctx})")
        if not self.tok.stop_ids():
            raise UserError(f"{self.loaded.source} names no EOS token (eos_token_id): the "
                            "harness needs one to end texts")
        # What a text is scored after: the tokenizer's BOS where its rules add one, else EOS
        # (a tinyskip corpus: each line follows the previous line's EOS). Found once: the
        # harness asks for it per request.
        bos = self.tok.bos_id
        self._prefix = min(self.tok.stop_ids()) if bos is None else bos
        # What the mode spent, for the report's tokens/s (scoring and generating apart).
        self.stats = DecodeStats()
        self.scored_tokens, self.scoring_s = 0, 0.0

    # -- what the harness asks of a tokenizer-backed LM ---------------------------------
    @property
    def eot_token_id(self) -> int:
        return min(self.tok.stop_ids())

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.source)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """None (a context): the tokenizer's own rules decide, as for the harness's
        Hugging Face models (a Llama tokenizer puts BOS before it)."""
        return self.tok.encode(string, special=add_special_tokens is not False)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # -- likelihoods ------------------------------------------------------------------
    def _check_scoring(self) -> None:
        if self.spec.mode == "dee":
            raise UserError("mode=dee cannot score likelihood tasks: the exit a token "
                            "leaves at depends on the cache it is decoded with, so a "
                            "teacher-forced score is not DEE's (score with mode=full or "
                            "mode=static exit_layer=E; DEE runs generate_until tasks)")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self._check_scoring()
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            # The text alone: the prefix token (BOS where the tokenizer adds one) comes first.
            ids = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length,
                                                    context_len=1):
                context, target = make_disjoint_window(window)
                windows.append((None, context, target))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log p(continuation | context), whether it is the greedy continuation) per
        request, scored in batches of similar length (longest first)."""
        self._check_scoring()
        for _, _, target in requests:
            if len(target) > self.max_length:
                raise UserError(f"a continuation of {len(target)} tokens is longer than the "
                                f"scoring window, max_length={self.max_length}")
        t0 = time.perf_counter()
        # Each row: the last max_length + 1 tokens; its continuation is scored at the end.
        rows = [(context + target)[-(self.max_length + 1):] for _, context, target in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        batches = [order[i: i + self.job.batch_size]
                   for i in range(0, len(order), self.job.batch_size)]
        for batch in batches if disable_tqdm else progress_bar(batches, desc="harness scoring"):
            width = len(rows[batch[0]]) - 1
            # Right-padded with the last token: causal attention never lets a position see
            # the padding after it, so each row's scores are its own.
            ids = torch.tensor([rows[i][:-1] + rows[i][-1:] * (width - len(rows[i]) + 1)
                                for i in batch], device=self._device)           # (B, width)
            states = self.model(ids, exits=[self.exit], head=False)[0]          # (B, width, d)
            for b, i in enumerate(batch):
                n = len(requests[i][2])
                end = len(rows[i]) - 1
                logits = self.model.lm_head(states[b, end - n: end]).float()    # (n, V)
                target = torch.tensor(rows[i][-n:], device=self._device)
                logprob = -F.cross_entropy(logits, target, reduction="sum").item()
                greedy = bool((logits.argmax(-1) == target).all())
                results[i] = (logprob, greedy)
                self.scored_tokens += n
                if requests[i][0] is not None:          # (rolling windows: their total is)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        self.scoring_s += time.perf_counter() - t0
        return results

    # -- generation -------------------------------------------------------------------
    def _sampling(self, kwargs: dict) -> SamplingConfig:
        """The task's temperature when it gives one (``do_sample=False``: greedy), else the
        job's; top-k and top-p are the job's."""
        temperature = float(kwargs.get("temperature", self.job.temperature))
        if kwargs.get("do_sample") is False:
            temperature = 0.0
        if temperature and self.cal_path is not None:
            raise UserError(f"a task asks for temperature={temperature}: calibration="
                            f"{str(self.cal_path)!r} certifies greedy decoding (give "
                            "gen_kwargs='temperature=0', or threshold= for no guarantee)")
        return SamplingConfig(temperature, self.job.top_k, self.job.top_p)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        generator = torch.Generator(device=self._device).manual_seed(self.job.seed)
        eos = self.tok.stop_ids()
        out = []
        for req in requests if disable_tqdm else progress_bar(requests,
                                                               desc=f"harness {self.spec.label}"):
            context, kwargs = req.args
            kwargs = dict(kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", 256))
            if self.cal_path is not None:
                check_calibrated_length(self.cal_path, {"max_new_tokens": self.cal_length}, n)
            # The prompt keeps its last tokens, as many as the context leaves beside n new ones.
            room = self.model.config.max_position_embeddings - n
            if room < 1:
                raise UserError(f"max_gen_toks={n}: leaves no room for a prompt in the model's "
                                f"context of {self.model.config.max_position_embeddings} "
                                "tokens (gen_kwargs='max_gen_toks=N' caps it)")
            # An empty context starts from the prefix token, as scoring's empty contexts do.
            ids = self.tok.encode(context)[-room:] or [self.prefix_token_id]
            prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
            gen = decode(self.model, prompt, n, self.spec, self._sampling(kwargs), eos,
                         generator, self.draft_ids, self.steps)
            self.stats = self.stats + gen.stats
            # The text without the stop token (an EOS that ends a tinyskip line is not "\n"
            # here: the harness's own models drop EOS), cut at the task's stop strings.
            text = continuation(self.tok, ids, [t for t in gen.tokens[0] if t not in eos])
            for stop in until:
                text = text.split(stop)[0] if stop else text
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def throughput(self) -> dict:
        """Tokens/s of what this LM did: scored tokens, and generated tokens (compiling
        not counted), as ``infer`` reports them."""
        s = dataclasses.asdict(self.stats)
        return {"mode": self.spec.label, "scored_tokens": self.scored_tokens,
                "scoring_tokens_per_s": self.scored_tokens / self.scoring_s
                if self.scoring_s else None,
                "new_tokens": s["new_tokens"],
                "generation_tokens_per_s": s["new_tokens"] / s["decode_s"]
                if s["decode_s"] else None,
                "calibration": str(self.cal_path) if self.cal_path else None}
