"""Several prompts of different lengths decoded together: every row's output is the one it
gets decoded alone (greedy: token for token), while rows accept different numbers of
drafts, end at stop tokens of their own, and hit their budgets at different steps."""

import pytest
import torch

from tinyskip.config import SSDConfig, UserError
from tinyskip.decode import generate, ssd_generate
from tinyskip.decode.steps import Steps, ragged_batch
from tinyskip.model.transformer import Transformer

LENGTHS = (5, 12, 1, 40)     # the context is 64: the 40-token row's budget is 24, not 30


@pytest.fixture(scope="module")
def peaked(tiny_config):
    """A random tiny model with large weights: its exits disagree with the last often
    enough that drafts are both accepted and rejected (with small weights every exit
    repeats the input token and every draft is accepted)."""
    torch.manual_seed(0)
    return Transformer(tiny_config(initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def rows(peaked):
    """Ragged prompts; each row decoded alone; a stop token that the third row produces
    as its 7th token and no other row produces."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in LENGTHS]
    alone = [generate(peaked, p[None], 30).tokens[0] for p in prompts]
    stop = alone[2][6]
    assert stop not in alone[2][:6] and not any(stop in a for a in alone[:2] + alone[3:])
    return prompts, alone, stop


def test_full_decoding_of_ragged_prompts_equals_each_row_alone(peaked, rows):
    prompts, alone, stop = rows
    batch, lengths = ragged_batch(prompts)
    for exit_layer, eos in ((None, None), (None, stop), (2, None)):
        got = generate(peaked, batch, 30, exit_layer, eos_id=eos, lengths=lengths)
        assert got.tokens == [generate(peaked, p[None], 30, exit_layer, eos_id=eos).tokens[0]
                              for p in prompts], (exit_layer, eos)
    assert [len(t) for t in got.tokens] == [30, 30, 30, 24]


@pytest.mark.parametrize("cfg", [SSDConfig(2, 3), SSDConfig(1, 4), SSDConfig(3, 2),
                                 SSDConfig(2, 4, adaptive_threshold=0.1),
                                 SSDConfig(3, 3, draft_vocab=40)])
def test_greedy_batched_ssd_equals_each_row_decoded_alone(peaked, rows, cfg):
    prompts, alone, stop = rows
    batch, lengths = ragged_batch(prompts)
    ids = torch.arange(0, 97, 2)[:cfg.draft_vocab] if cfg.draft_vocab else None
    for eos in (None, stop):
        want = [generate(peaked, p[None], 30, eos_id=eos).tokens[0] for p in prompts]
        got = ssd_generate(peaked, batch, 30, cfg, eos_id=eos, draft_ids=ids, lengths=lengths)
        assert got.tokens == want, (cfg, eos)
        st = got.stats
        # Drafts were both accepted and rejected, and the counts add up over the rows.
        assert 0 < st.accepted < st.drafted, (st.accepted, st.drafted)
        assert st.new_tokens == sum(map(len, want)) and sum(st.accept_hist) == st.rounds
    assert len(got.tokens[2]) == 7 and got.tokens[2][-1] == stop      # that row ended early


def test_rows_of_equal_lengths_and_one_row_batches(peaked, rows):
    """Equal lengths need no ``lengths``; a batch of one goes to the one-prompt decoder."""
    prompts, _, _ = rows
    batch = torch.stack([prompts[1], prompts[1].flip(0)])
    got = ssd_generate(peaked, batch, 20, SSDConfig(2, 3)).tokens
    assert got == [generate(peaked, row[None], 20).tokens[0] for row in batch]
    one, lengths = ragged_batch(prompts[1:2])
    assert ssd_generate(peaked, one, 20, SSDConfig(2, 3), lengths=lengths).tokens == got[:1]


def test_ragged_prompts_longer_than_the_context_are_one_clear_error(peaked):
    batch, lengths = ragged_batch([[1, 2, 3], list(range(64))])
    with pytest.raises(UserError, match="prompt 2 of the batch has 64 tokens, longer than the "
                                        r"context allows \(63 tokens \+ 1 generated\)"):
        ssd_generate(peaked, batch, 5, SSDConfig(2, 2), lengths=lengths)
    with pytest.raises(UserError, match="prompt 2 of the batch has 64 tokens"):
        generate(peaked, batch, 5, lengths=lengths)
    with pytest.raises(UserError, match="prompt 1 of the batch is empty"):
        ragged_batch([[], [1]])


class ReplayingSteps(Steps):
    """Eager steps whose every call first overwrites the previous call's outputs, as the
    replay of a CUDA graph does (compiled steps on a GPU: steps.compile_options)."""

    def __init__(self, model):
        super().__init__(model)
        self.last = []
        for name in ("_token_fn", "_blocks_fn", "_states_fn"):
            setattr(self, name, self._overwriting(getattr(self, name)))

    def _overwriting(self, fn):
        def call(*args):
            for t in self.last:
                t.fill_(float("nan"))
            out = fn(*args)
            # Every tensor a step returns, the captured states' tuple unpacked too.
            self.last = [out] if isinstance(out, torch.Tensor) else \
                [t for o in out for t in ((o,) if isinstance(o, torch.Tensor) else o)]
            return out
        return call


def test_no_loop_reads_a_step_output_after_the_next_step_call(peaked, rows):
    """What CUDA graphs allow, checked on the CPU for every loop that drives Steps."""
    prompts, alone, stop = rows
    batch, lengths = ragged_batch(prompts)
    cfg = SSDConfig(2, 3)
    full = generate(peaked, batch, 30, lengths=lengths).tokens
    assert full == [a[:len(f)] for a, f in zip(alone, full)]
    assert generate(peaked, prompts[0][None], 30, steps=ReplayingSteps(peaked)).tokens[0] \
        == alone[0]
    assert generate(peaked, batch, 30, lengths=lengths, steps=ReplayingSteps(peaked)).tokens \
        == full
    assert ssd_generate(peaked, prompts[1][None], 30, cfg,
                        steps=ReplayingSteps(peaked)).tokens[0] == alone[1]
    assert ssd_generate(peaked, batch, 30, cfg, lengths=lengths,
                        steps=ReplayingSteps(peaked)).tokens == full
    # del: the captured states feed only its choices, which must not change either.
    cfg = SSDConfig(2, 3, choose="del", exits=[1, 2, 3])
    for prompt, want in zip(prompts, alone):
        plain = ssd_generate(peaked, prompt[None], 30, cfg)
        replayed = ssd_generate(peaked, prompt[None], 30, cfg, steps=ReplayingSteps(peaked))
        assert replayed.tokens[0] == plain.tokens[0] == want
        assert replayed.stats.exit_rounds == plain.stats.exit_rounds
        assert replayed.stats.accept_hist == plain.stats.accept_hist


def test_adaptive_drafting_stops_each_row_at_its_own_unsure_draft(peaked, rows):
    """A row's first draft under the threshold ends that row's drafts, not the others':
    fewer drafts than without the threshold, more than if any row's stop stopped all."""
    prompts, alone, _ = rows
    batch, lengths = ragged_batch(prompts)
    runs = {t: ssd_generate(peaked, batch, 30, SSDConfig(2, 4, adaptive_threshold=t),
                            lengths=lengths) for t in (0.0, 0.3)}
    assert runs[0.3].tokens == runs[0.0].tokens
    per_row = [ssd_generate(peaked, p[None], 30, SSDConfig(2, 4, adaptive_threshold=0.3))
               for p in prompts]
    # Each row drafts in the batch what it drafts alone (its rounds are its own).
    assert runs[0.3].stats.drafted == sum(g.stats.drafted for g in per_row)
    assert runs[0.3].stats.drafted < runs[0.0].stats.drafted
