"""Speculative decoding: a small draft model guesses k tokens, the target model checks them in one pass.

    result = speculative_generate(target, draft, input_ids, max_new_tokens=64, k=4)
    result.token_ids, result.acceptance_rate, result.target_passes

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding" (Algorithm 1);
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling" (Algorithm 2).

Decoding one token reads every weight of the target to do little arithmetic, so scoring k + 1 positions
in one pass costs about as much as scoring one. Each round:
  1. the draft proposes x_1..x_k autoregressively, x_i ~ q_i (k passes of the small model);
  2. the target scores the context and x_1..x_k in ONE pass, giving p_1..p_{k+1};
  3. accept_tokens keeps x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right; at the first
     rejection it samples from norm(max(0, p_i − q_i)) instead, and if all k are kept it samples a bonus
     token from p_{k+1}. A round emits 1 to k + 1 tokens, distributed exactly as the target's own samples.
With temperature 0 both distributions are one-hot at their argmax, and the same rule reads "keep the draft's
token while it equals the target's argmax, then emit the target's argmax": the output is the target's greedy
decoding token for token (in fp32; in fp16 the target's one pass over k + 1 tokens sums in another order than
one token at a time, and a near-tie between two tokens can go the other way).

It pays when the draft is cheap and often right: with a draft pass costing c target passes and each guess kept
with probability alpha, a round costs k·c + 1 target passes and emits expected_tokens_per_pass(alpha, k) tokens
(Leviathan et al., Section 3). Each model keeps its own KV cache (transformers' DynamicCache); after a rejection,
the entries of the rejected draft tokens are cropped from both. Batch size 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..models import cache_kwarg, check_llama


@dataclass
class SpeculativeResult:
    token_ids: torch.Tensor  # [1, n + new_tokens]: the prompt, then the new tokens (as model.generate returns)
    new_tokens: int
    proposed: int  # draft tokens proposed, all rounds together
    accepted: int  # of those, kept by the target
    target_passes: int  # one per round
    draft_passes: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_target_pass(self) -> float:
        return self.new_tokens / self.target_passes


def expected_tokens_per_pass(alpha: float, k: int) -> float:
    """Tokens one round emits on average when each draft token is kept with probability alpha:
    (1 − alpha^(k+1)) / (1 − alpha) (Leviathan et al., Section 3.1, Eq. 1); k + 1 when alpha = 1."""
    return float(k + 1) if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def accept_tokens(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor, generator=None) -> tuple[int, int]:
    """The rejection rule of one round; returns (n_accepted, next_token).

    p: [k+1, vocab] target probabilities at the k draft positions and at the one after them
    q: [k, vocab] the draft probabilities that draft_tokens were sampled from
    draft_tokens: [k] x_1..x_k
    The round emits draft_tokens[:n_accepted], then next_token. generator: on p's device (None: the global RNG).
    """
    k = draft_tokens.shape[0] if draft_tokens.dim() == 1 else -1
    if k < 0 or p.dim() != 2 or q.dim() != 2 or tuple(p.shape) != (k + 1, q.shape[1]) or q.shape[0] != k:
        raise ValueError(
            f"accept_tokens needs p: [k+1, vocab], q: [k, vocab], draft_tokens: [k]; got p {tuple(p.shape)}, "
            f"q {tuple(q.shape)}, draft_tokens {tuple(draft_tokens.shape)}."
        )
    rows = torch.arange(k, device=p.device)
    px, qx = p[rows, draft_tokens.long()], q[rows, draft_tokens.long()]  # [k]: p_i(x_i), q_i(x_i)
    r = torch.rand(k, generator=generator, device=p.device)  # [k]: r_i ~ U(0, 1)
    rejected = (r * qx >= px).nonzero()  # x_i rejected if r_i ≥ p_i(x_i) / q_i(x_i), written without dividing
    n = int(rejected[0]) if len(rejected) else k  # the first rejection ends the round
    if n < k:
        residual = (p[n] - q[n]).clamp_min(0)  # p'(x) = norm(max(0, p(x) − q(x))); multinomial normalizes
        dist = residual if residual.sum() > 0 else p[n]  # p = q up to rounding: a rejection had probability ~0
    else:
        dist = p[k]  # all k kept: a bonus token from the target's next distribution
    return n, int(torch.multinomial(dist, 1, generator=generator))


@torch.no_grad()
def speculative_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 0.0,
    generator=None,
    accept=None,
) -> SpeculativeResult:
    """Generate up to max_new_tokens tokens after input_ids ([1, n]) from `target`, with `draft` proposing k at a time.

    temperature 0: greedy, the target's own greedy output; > 0: samples from softmax(logits / temperature), the
    target's distribution at that temperature (no top-k / top-p). Stops early at the target's EOS token
    (generation_config.eos_token_id), as model.generate does. generator: a torch.Generator on the models' device
    for sampling (None: the global RNG; greedy decoding draws nothing from it). The models are used in eval mode
    and left in the mode they were in; their weights are not touched.
    accept: None (labkit's accept_tokens) or your own accept(p, q, draft_tokens, generator) -> (n_accepted,
    next_token) with accept_tokens' contract (lesson 10b's "build it"); an answer that is not two integers with
    0 <= n_accepted <= k and next_token in the vocabulary raises ValueError.
    """
    _check_args(target, draft, input_ids, max_new_tokens, k, temperature, generator)
    if accept is not None and not callable(accept):
        raise ValueError(
            f"accept={accept!r}: pass a function accept(p, q, draft_tokens, generator) -> (n_accepted, next_token), "
            "or None for labkit's accept_tokens."
        )
    device = next(target.parameters()).device
    if temperature == 0:  # one-hot distributions: every draw has a fixed outcome; keep the global RNG untouched
        generator = torch.Generator(device).manual_seed(0)
    modes = target.training, draft.training
    target.eval()
    draft.eval()
    try:
        tokens = input_ids.to(device, torch.long)
        return _generate(target, draft, tokens, max_new_tokens, k, temperature, generator, accept or accept_tokens)
    finally:
        target.train(modes[0])
        draft.train(modes[1])


def _generate(target, draft, tokens, max_new_tokens, k, temperature, generator, accept) -> SpeculativeResult:
    start, n_prompt = time.perf_counter(), tokens.shape[1]
    eos = _eos_ids(target)
    caches = {"target": DynamicCache(config=target.config), "draft": DynamicCache(config=draft.config)}
    names = {"target": cache_kwarg(target), "draft": cache_kwarg(draft)}

    def forward(who, model, ids, keep):  # ids: [1, m]; feeds the tokens its cache lacks, returns [keep, vocab]
        cache = caches[who]
        fresh = ids[:, cache.get_seq_length() :]  # [1, m − cached]
        return model(fresh, use_cache=True, logits_to_keep=keep, **{names[who]: cache}).logits[0]

    proposed = accepted = target_passes = draft_passes = 0
    done = False
    while not done and tokens.shape[1] - n_prompt < max_new_tokens:
        k_round = min(k, max_new_tokens - (tokens.shape[1] - n_prompt) - 1)  # never propose past the limit
        # 1. the draft proposes x_1..x_k, x_i ~ q_i
        drafted, q = tokens, []  # drafted: [1, len + i]
        for _ in range(k_round):
            q.append(_probs(forward("draft", draft, drafted, 1), temperature)[0])  # [vocab]
            x = torch.multinomial(q[-1], 1, generator=generator)  # [1]
            drafted = torch.cat([drafted, x[None]], dim=1)
            draft_passes += 1
        # 2. the target scores every draft position and one more, in one pass
        p = _probs(forward("target", target, drafted, k_round + 1), temperature)  # [k_round + 1, vocab]
        target_passes += 1
        q = torch.stack(q) if q else p.new_zeros(0, p.shape[1])  # [k_round, vocab]
        # 3. keep a prefix of the draft, then one token from the target (residual or bonus)
        x = drafted[0, tokens.shape[1] :]  # [k_round]
        n, next_token = _checked(accept(p, q, x, generator), k_round, p.shape[1])
        proposed, accepted = proposed + k_round, accepted + n
        new = [*x[:n].tolist(), next_token]
        for i, t in enumerate(new):
            if t in eos:  # stop at the first EOS, as model.generate does
                new, done = new[: i + 1], True
                break
        tokens = torch.cat([tokens, tokens.new_tensor([new])], dim=1)
        # 4. forget the rejected tokens: each cache keeps at most every token but the last (fed next round)
        for cache in caches.values():
            excess = cache.get_seq_length() - (tokens.shape[1] - 1)
            if excess > 0:
                cache.crop(-excess)  # remove the last `excess` tokens (transformers 5.25 refuses a positive length)
    return SpeculativeResult(
        tokens, tokens.shape[1] - n_prompt, proposed, accepted, target_passes, draft_passes, time.perf_counter() - start
    )


def answer_problem(answer, k: int, vocab: int) -> str | None:
    """What is wrong with an accept function's answer for k draft tokens, in words; None when it keeps
    accept_tokens' contract: two Python ints (n_accepted, next_token), 0 <= n_accepted <= k, next_token in the
    vocabulary. Shared by speculative_generate (which raises) and lesson 10b's check (which reports)."""
    if not (isinstance(answer, tuple) and len(answer) == 2):
        return f"return a pair (n_accepted, next_token); got {type(answer).__name__}."
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in answer):
        return f"return two Python ints (use int(...) on tensors); got {tuple(type(x).__name__ for x in answer)}."
    n, token = answer
    if not 0 <= n <= k:
        return f"n_accepted = {n} for {k} draft token(s): it counts kept draft tokens, 0 to {k}."
    if not 0 <= token < vocab:
        return f"next_token = {token} is not a token of the {vocab}-token vocabulary."
    return None


def _checked(answer, k: int, vocab: int) -> tuple[int, int]:
    """An accept function's (n_accepted, next_token), or ValueError saying what is off."""
    problem = answer_problem(answer, k, vocab)
    if problem is not None:
        raise ValueError(
            f"accept returned {answer!r} for {k} draft tokens, expected (n_accepted, next_token): two Python ints "
            f"with 0 <= n_accepted <= {k} and 0 <= next_token < {vocab} (accept_tokens' contract). {problem}"
        )
    return answer


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits: [m, vocab] -> probabilities [m, vocab]; temperature 0: one-hot at the argmax (greedy)."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return (logits / temperature).softmax(-1)


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])


def _check_args(target, draft, input_ids, max_new_tokens, k, temperature, generator) -> None:
    check_llama(target, "speculative_generate (target)")
    check_llama(draft, "speculative_generate (draft)")
    vocab = target.config.vocab_size
    if draft.config.vocab_size != vocab:
        raise ValueError(
            f"draft must share the target's vocabulary: draft vocab_size {draft.config.vocab_size}, target {vocab}."
        )
    device = next(target.parameters()).device
    if next(draft.parameters()).device != device:
        raise ValueError(f"draft is on {next(draft.parameters()).device}, target on {device}: put both on one device.")
    for name, value in (("k", k), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy); got {temperature!r}.")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dtype not in (torch.int64, torch.int32)
        or input_ids.dim() != 2
        or input_ids.shape[0] != 1
        or input_ids.shape[1] < 1
    ):
        got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else repr(input_ids)
        raise ValueError(f"input_ids must be an integer tensor of shape [1, n], n >= 1 (batch size 1); got {got}.")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}) (vocab_size); got values in [{low}, {high}].")
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != device.type):
        raise ValueError(
            f"generator must be None or a torch.Generator on the models' device ({device}); got {generator!r}."
        )
