"""runtime/drafters/model.py: the draft model's cache follows the context, with bounded step widths."""
from __future__ import annotations

import numpy as np
from fakes import FakeStep
from specrt.runtime.drafters import ModelDrafter
from specrt.runtime.sampling import SamplingParams

GREEDY, RNG = SamplingParams(), np.random.default_rng(0)


def test_catch_up_after_many_undrafted_steps_goes_through_extend():
    """k = 0 for ten steps (the adaptive policy not drafting): the next proposal catches up on 10 tokens
    with one prefill-stage run, then steps 1 token at a time -- never a 10-token step."""
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target)
    d = ModelDrafter(draft)
    prompt = np.array([1, 2, 3])
    d.begin(prompt)
    context = list(prompt)
    for _ in range(10):
        assert len(d.propose(0, GREEDY, RNG)) == 0
        nxt = target.next_token(np.array(context))
        d.commit([], nxt)
        context.append(nxt)
    draft.widths.clear()
    proposal = d.propose(3, GREEDY, RNG)
    assert [n for n, _ in draft.widths] == [1, 1, 1]
    assert draft.extends[-1] == (10, 2)  # tokens [2, 12) of the context, through the prefill stage
    # the proposal is the draft's own continuation of the full context (it agrees with the target)
    expect = []
    for _ in range(3):
        expect.append(target.next_token(np.array(context + expect)))
    assert proposal.token_ids.tolist() == expect


def test_all_accepted_then_two_token_catch_up():
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target)
    d = ModelDrafter(draft)
    d.begin(np.array([4, 5]))
    p = d.propose(3, GREEDY, RNG)
    d.commit(p.token_ids.tolist(), 7)
    draft.widths.clear()
    d.propose(1, GREEDY, RNG)
    assert draft.widths == [(2, 4)]  # the last proposal (never run) and next_id, at its position
