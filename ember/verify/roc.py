"""ROC AUC of a score that should be higher for one labelled set of claims than for the other."""

from __future__ import annotations

from collections.abc import Sequence


def roc_auc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """The probability that a random positive scores above a random negative, ties counting half (the
    Mann-Whitney form of the area under the ROC curve). 1.0: the score separates the sets perfectly."""
    if not negatives or not positives:
        raise ValueError("roc_auc needs at least one score in each set")
    ranked = sorted([(s, 0) for s in negatives] + [(s, 1) for s in positives])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # tied scores share their mean rank
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2
        rank_sum += mean_rank * sum(label for _, label in ranked[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
