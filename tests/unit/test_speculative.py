"""Speculative decoding's pure parts: the acceptance rule and the choice of the number of drafts."""
from __future__ import annotations

import torch

from corolla.client.speculative import DraftLength, accept_drafts, expected_tokens_per_round


def _distribution(logits) -> torch.Tensor:
    return torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=-1).float()


def test_greedy_acceptance_stops_at_the_first_disagreement():
    drafts = torch.tensor([3, 1, 4])
    assert accept_drafts(None, torch.tensor([3, 1, 4, 2]), None, drafts) == (3, 2)  # all accepted, bonus token
    assert accept_drafts(None, torch.tensor([3, 5, 4, 2]), None, drafts) == (1, 5)  # the target's token replaces
    assert accept_drafts(None, torch.tensor([0, 1, 4, 2]), None, drafts) == (0, 0)
    assert accept_drafts(None, torch.tensor([7]), None, drafts[:0]) == (0, 7)  # no drafts: a plain step


def test_speculative_sampling_reproduces_the_target_distribution():
    """Tokens from drafts of a very different distribution q, accepted by the rule, follow the target p exactly:
    the first token's marginal is p0 and the second's, given the first, p1 (here p1 does not depend on it)."""
    generator = torch.Generator().manual_seed(0)
    p = torch.stack([_distribution([2.0, 0.5, 0.0, -1.0, 1.0]), _distribution([0.0, 1.5, -0.5, 0.3, 0.0]),
                     _distribution([1.0, 1.0, 1.0, 1.0, 1.0])])  # [k + 1 = 3, vocab 5]
    q = torch.stack([_distribution([-1.0, 0.0, 2.5, 0.5, 0.0]), _distribution([2.0, -1.0, 0.0, 0.0, 1.0])])
    trials = 20000
    first = torch.zeros(5)
    second = torch.zeros(5)
    accepted = 0
    for _ in range(trials):
        drafts = torch.stack([torch.multinomial(q[i], 1, generator=generator)[0] for i in range(2)])
        m, token = accept_drafts(p, p.argmax(-1), q, drafts, generator=generator)
        tokens = [int(t) for t in drafts[:m]] + [token]
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
        accepted += m
    tv_first = 0.5 * (first / trials - p[0]).abs().sum().item()
    tv_second = 0.5 * (second / second.sum() - p[1]).abs().sum().item()
    assert tv_first < 0.015, tv_first
    assert tv_second < 0.03, tv_second
    # the test has power: the drafts' own distribution is far from the target's
    assert 0.5 * (q[0] - p[0]).abs().sum().item() > 0.4
    assert 0 < accepted < 2 * trials


def test_identical_draft_is_always_accepted():
    generator = torch.Generator().manual_seed(1)
    p = torch.stack([_distribution([0.1, 0.2, 0.3])] * 4)
    for _ in range(200):
        drafts = torch.multinomial(p[0], 3, replacement=True, generator=generator)
        assert accept_drafts(p, p.argmax(-1), p[:3], drafts, generator=generator)[0] == 3


def test_draft_length_follows_acceptance_and_costs():
    assert expected_tokens_per_round(0.0, 5) == 1.0
    assert abs(expected_tokens_per_round(0.5, 2) - 1.75) < 1e-9
    good = DraftLength(max_tokens=12)
    assert good.next(100) == good.initial  # nothing measured yet
    for _ in range(10):  # drafts nearly free, every draft accepted, verification costly (a distant swarm)
        good.update(offered=4, accepted=4, draft_s=0.004, verify_s=0.3)
    assert good.next(100) == 12
    assert good.next(3) == 3  # never past the room left
    bad = DraftLength(max_tokens=12)
    for _ in range(10):  # drafts never accepted, and a draft token costs time: plain steps, with a probe now and then
        bad.update(offered=4, accepted=0, draft_s=0.04, verify_s=0.1)
    choices = [bad.next(100) for _ in range(16)]
    assert choices.count(0) == 14 and choices.count(1) == 2, choices
    costly = DraftLength(max_tokens=12)
    for _ in range(10):  # drafts half accepted and as slow as verification: few drafts pay
        costly.update(offered=3, accepted=1, draft_s=0.3, verify_s=0.1)
    assert costly.next(100) <= 2
    futile = DraftLength(max_tokens=12)
    for _ in range(10):  # a draft token costs more than a whole step (a fast swarm, a slow draft model)
        futile.update(offered=1, accepted=1, draft_s=0.06, verify_s=0.02)
    for _ in range(10):
        futile.update(offered=0, accepted=0, draft_s=0.0, verify_s=0.02)
    assert [futile.next(100) for _ in range(64)] == [0] * 64  # no acceptance could make it pay: no probes
    for _ in range(10):  # the steps grow dearer (the swarm got farther): drafting pays again, and resumes
        futile.update(offered=0, accepted=0, draft_s=0.0, verify_s=0.3)
    assert futile.next(100) > 0
    assert DraftLength().next(0) == 0
