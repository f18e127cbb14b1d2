"""Which tokens each sliding window scores: the one perplexity rule shared by ember, llama.cpp and KLD.

The text is tokenized once (no special tokens), giving t_0 .. t_{N-1}. Window w covers the text tokens
[begin_w, end_w) with begin_w = w * stride and end_w = min(begin_w + L, N), where L is the number of text
tokens per window (the context minus one position when a BOS token is put in front of every window).
Every token t_i with i >= 1 is scored exactly once, by the first window that contains it and is not
overlapped by the previous one:

* window 0 scores t_1 .. t_{end_0 - 1} (all but its first token, which has nothing before it);
* window w > 0 scores only the tokens after the previous window's end, t_{end_{w-1}} .. t_{end_w - 1},
  so each of them sees at least L - stride tokens of context;
* the last window is the first whose end reaches N (it may be shorter than L).

Token t_i is scored from the logits at the position of t_{i-1}. The BOS token (when used) is context
only: it is never a target, so the scored set does not depend on whether a BOS is added.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import InvalidRequestError


@dataclass(frozen=True)
class Window:
    """Text tokens [begin, end) are fed; targets [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int

    @property
    def num_targets(self) -> int:
        return self.end - self.first_target


def plan_windows(num_tokens: int, window_len: int, stride: int) -> list[Window]:
    """The windows of the rule above for a text of `num_tokens` tokens."""
    if window_len < 2:
        raise InvalidRequestError(f"a window needs at least 2 text tokens, got {window_len}")
    if not 1 <= stride < window_len:
        # With no overlap a window's first token would have no context: it could not be scored.
        raise InvalidRequestError(f"stride must be in [1, {window_len - 1}] (below the window's text length), got {stride}")
    if num_tokens < 2:
        raise InvalidRequestError(f"the text has {num_tokens} token(s); at least 2 are needed to score one")
    windows: list[Window] = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window_len, num_tokens)
        windows.append(Window(begin, end, max(previous_end, 1)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def limit_windows(windows: list[Window], max_targets: int | None) -> list[Window]:
    """The prefix of `windows` that scores exactly the first `max_targets` targets of a full run. The last
    kept window is cut short at its end: the model is causal, so cutting a window's tail does not change
    the scores of the tokens before the cut (a bounded run is a prefix of the full run, token for token)."""
    if max_targets is None:
        return windows
    if max_targets < 1:
        raise InvalidRequestError(f"max tokens must be at least 1, got {max_targets}")
    kept: list[Window] = []
    remaining = max_targets
    for window in windows:
        if remaining <= 0:
            break
        if window.num_targets > remaining:
            window = Window(window.begin, window.first_target + remaining, window.first_target)
        kept.append(window)
        remaining -= window.num_targets
    return kept
