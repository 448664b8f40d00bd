"""Worked solutions of lesson 12's exercises (see labkit.solutions)."""

from __future__ import annotations


def pareto_front(points):  # [(weight_bytes, perplexity)] -> the non-dominated ones, smallest first
    front, best = [], float("inf")
    for memory, ppl in sorted(points):  # by memory; at equal memory the better perplexity first
        if ppl < best:  # better than every smaller (or equal) model: on the front
            front.append((memory, ppl))
            best = ppl
    return front


def bits_per_weight_24(value_bits):
    return 2 * (value_bits + 2) / 4  # per group of 4: 2 kept values, each with a 2-bit position
