"""Worked solutions of lesson 10b's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch


def accept_tokens(p, q, draft_tokens, generator=None):  # p: [k+1, vocab], q: [k, vocab], draft_tokens: [k]
    k = draft_tokens.shape[0]
    rows = torch.arange(k)
    px, qx = p[rows, draft_tokens], q[rows, draft_tokens]  # [k]: p_i(x_i), q_i(x_i)
    r = torch.rand(k, generator=generator)  # [k]: one uniform number per draft token
    rejected = (r * qx >= px).nonzero()  # x_i rejected when r_i >= p_i(x_i) / q_i(x_i)
    n = int(rejected[0]) if len(rejected) else k  # the first rejection ends the round
    dist = (p[n] - q[n]).clamp_min(0) if n < k else p[k]  # the residual, or the bonus token's distribution
    if dist.sum() == 0:  # p = q up to rounding: that rejection had probability ~0
        dist = p[n]
    return n, int(torch.multinomial(dist, 1, generator=generator))
