"""labkit.serving.speculative: the rejection rule keeps the target's distribution (a statistical test on a
5-token vocabulary), greedy speculative decoding equals the target's own greedy decoding token for token, and
bad arguments are refused with errors that name them."""

import copy
import math

import pytest
import torch

from labkit.serving.speculative import accept_tokens, expected_tokens_per_pass, speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def prompt():
    return torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))  # [1, 8]


# --- the rejection rule ------------------------------------------------------------------------------------


def test_accept_tokens_greedy_rule():
    """One-hot distributions (temperature 0): keep the draft while it equals the target's argmax, then emit the
    target's argmax; all kept: the bonus token is the target's argmax after the last draft token."""
    target_argmax, vocab = torch.tensor([5, 2, 7, 1]), 8
    p = torch.nn.functional.one_hot(target_argmax, vocab).float()  # [k+1 = 4, vocab]

    def run(draft):
        q = torch.nn.functional.one_hot(torch.tensor(draft), vocab).float()  # [k = 3, vocab]
        return accept_tokens(p, q, torch.tensor(draft))

    assert run([5, 2, 3]) == (2, 7)
    assert run([5, 2, 7]) == (3, 1)
    assert run([0, 2, 7]) == (0, 5)  # a later match does not count after a rejection
    assert accept_tokens(p[:1], p[:0], torch.tensor([], dtype=torch.long)) == (0, 5)  # k = 0: just sample from p
    with pytest.raises(ValueError, match=r"p: \[k\+1, vocab\]"):
        accept_tokens(p, p, torch.tensor([5, 2, 7]))


def test_accept_tokens_samples_the_target_distribution():
    """Draft x ~ q, then the rule: the first emitted token must follow p, not q (Leviathan et al. 2023, Appendix
    A.1), and x is kept with probability Σ_x min(p(x), q(x))."""
    p = torch.tensor([0.40, 0.25, 0.15, 0.15, 0.05])  # target
    q = torch.tensor([0.10, 0.20, 0.30, 0.10, 0.30])  # draft
    p_rows = torch.stack([p, torch.full((5,), 0.2)])  # [k+1 = 2, 5]: p, then the bonus distribution
    n = 20_000
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q, n, replacement=True, generator=g)  # [n]
    first, kept = torch.empty(n, dtype=torch.long), 0
    for i in range(n):
        accepted, next_token = accept_tokens(p_rows, q[None], drafts[i : i + 1], generator=g)
        first[i] = drafts[i] if accepted else next_token
        kept += accepted
    freq = torch.bincount(first, minlength=5) / n
    # Each frequency is a binomial mean with standard error sqrt(p(1 − p) / n) ≤ 0.0035 at n = 20,000: 5 standard
    # errors make a false alarm ~1e-6 likely; q differs from p by 0.3 at token 0, about 80 standard errors.
    tol = 5 * (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= tol).all(), (freq, p)
    assert ((freq - q).abs() > tol).any()  # the test can tell the draft's distribution from the target's
    alpha = float(torch.minimum(p, q).sum())  # 0.6
    assert abs(kept / n - alpha) <= 5 * math.sqrt(alpha * (1 - alpha) / n)


def test_expected_tokens_per_pass():
    assert expected_tokens_per_pass(0.0, 4) == 1  # every guess rejected: one token per target pass, as without a draft
    assert expected_tokens_per_pass(1.0, 4) == 5
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


# --- whole generation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_equals_target_greedy(target_and_draft, prompt, k):
    target, draft = target_and_draft
    expected = target.generate(prompt, do_sample=False, max_new_tokens=40)
    result = speculative_generate(target, draft, prompt, max_new_tokens=40, k=k)
    assert torch.equal(result.token_ids, expected)
    assert result.new_tokens == 40 and len(set(expected[0, 8:].tolist())) > 10  # a varied output, no early EOS
    assert 0 < result.accepted < result.proposed  # the draft was right sometimes and wrong sometimes
    assert result.target_passes == result.new_tokens - result.accepted  # each pass: the kept guesses + one token
    assert result.draft_passes == result.proposed


def test_draft_equal_to_target_keeps_every_guess(target_and_draft, prompt):
    target, _ = target_and_draft
    greedy = speculative_generate(target, target, prompt, max_new_tokens=40, k=4)
    assert greedy.acceptance_rate == 1.0
    assert greedy.target_passes == math.ceil(40 / 5) and greedy.tokens_per_target_pass == 5
    assert torch.equal(greedy.token_ids, target.generate(prompt, do_sample=False, max_new_tokens=40))
    # Sampling: p = q, so r · q(x) < p(x) for every r in [0, 1) — up to rounding between the draft's one-token
    # passes and the target's five-token pass, which could only lower the rate by ~1e-7 per token. (A temperature
    # other than 1, so that one applied to p and not to q, or the reverse, would show as rejections.)
    g = torch.Generator().manual_seed(0)
    sampled = speculative_generate(target, target, prompt, max_new_tokens=40, k=4, temperature=0.7, generator=g)
    assert sampled.acceptance_rate == 1.0 and sampled.new_tokens == 40


def test_sampled_first_token_follows_the_target(target_and_draft, prompt):
    """End to end at temperature 0.2, k = 1: the first new token follows the target's softmax(logits / 0.2), not
    the draft's (they differ by a total variation of ~0.6 at this prompt)."""
    target, draft = target_and_draft
    t, n = 0.2, 500
    with torch.no_grad():
        p = (target(prompt).logits[0, -1] / t).softmax(-1)  # [vocab]
        q = (draft(prompt).logits[0, -1] / t).softmax(-1)
    g = torch.Generator().manual_seed(0)
    first = torch.tensor(
        [
            speculative_generate(target, draft, prompt, 2, k=1, temperature=t, generator=g).token_ids[0, 8]
            for _ in range(n)
        ]
    )
    # Compare on the tokens either model gives >= 5%, plus one bucket for all others (few categories, each with
    # enough samples for the binomial standard error to hold).
    tokens = ((p >= 0.05) | (q >= 0.05)).nonzero()[:, 0]
    bucket = lambda dist: torch.cat([dist[tokens], 1 - dist[tokens].sum(0, keepdim=True)])
    freq = bucket(torch.bincount(first, minlength=256).float() / n)
    p_b, q_b = bucket(p), bucket(q)
    tol = 5 * (p_b * (1 - p_b) / n).sqrt()  # ≤ 0.11 at n = 500
    assert ((freq - p_b).abs() <= tol).all(), (freq, p_b)
    assert ((freq - q_b).abs() > tol).any()


def test_sampling_is_seeded_and_greedy_leaves_the_global_rng_alone(target_and_draft, prompt):
    target, draft = target_and_draft
    run = lambda seed: (
        speculative_generate(
            target, draft, prompt, 24, k=3, temperature=1.0, generator=torch.Generator().manual_seed(seed)
        ).token_ids
    )
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    state = torch.get_rng_state()
    speculative_generate(target, draft, prompt, 24, k=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_stops_at_eos_as_generate_does(target_and_draft, prompt):
    target, draft = target_and_draft
    greedy = target.generate(prompt, do_sample=False, max_new_tokens=40)[0, 8:].tolist()
    target.generation_config.eos_token_id = greedy[12]  # a token first emitted at or before step 12
    expected = target.generate(prompt, do_sample=False, max_new_tokens=40)
    result = speculative_generate(target, draft, prompt, max_new_tokens=40, k=4)
    assert torch.equal(result.token_ids, expected) and result.new_tokens == greedy.index(greedy[12]) + 1


# --- arguments ----------------------------------------------------------------------------------------------

GOOD = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4, k=2, temperature=0.0, generator=None)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(k=0), "k"),
        (dict(k=1.5), "k"),
        (dict(k=True), "k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(input_ids=torch.tensor([[1, 2], [3, 4]])), "input_ids"),  # batch of 2
        (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids"),  # no batch dimension
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "input_ids"),  # not token ids
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),  # empty
        (dict(input_ids=torch.tensor([[1, 256]])), "input_ids"),  # outside the vocabulary
        (dict(generator=0), "generator"),
        (dict(draft_vocab=300), "draft"),
    ],
)
def test_bad_arguments_name_the_argument_and_change_nothing(tiny, change, name):
    draft = copy.deepcopy(tiny)
    if "draft_vocab" in change:
        draft.resize_token_embeddings(change.pop("draft_vocab"))
    tiny.train()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        speculative_generate(tiny, draft, **{**GOOD, **change})
    assert tiny.training and all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


def test_a_call_leaves_the_models_as_they_were(tiny):
    draft = copy.deepcopy(tiny)
    tiny.train()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    speculative_generate(tiny, draft, **GOOD)
    assert tiny.training and not draft.training
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
