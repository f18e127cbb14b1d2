"""The sampling noise of a request: one uniform number per (seed, position), nothing else.

A token at position p (its index in prompt + output) is drawn by inverse-CDF sampling with
u = position_uniform(seed, p): the smallest token whose cumulative (filtered, unnormalized) probability
exceeds u times the total. Because u depends only on the request's seed and the position — not on the
batch, the step, how many tokens a step verified, or whether a draft proposed the token — a seeded
request gives the same tokens alone or batched, with speculative decoding on or off, and after a
preemption. A verifier can re-derive every u from the seed.

u = splitmix64(splitmix64(seed mod 2^64) XOR p) >> 11, times 2^-53 (53 random bits, in [0, 1)).
"""

from __future__ import annotations

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def position_uniform(seed: int, position: int) -> float:
    return (_splitmix64(_splitmix64(seed & _MASK) ^ position) >> 11) * (1.0 / (1 << 53))
