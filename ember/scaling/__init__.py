"""Inference-time scaling over parallel samples of one prompt: best-of-N, self-consistency, early stopping of
the samples (first-finish, short-m@k), and particle filtering, step beam search and best-first search over
reasoning steps. Each strategy returns its choice and its `Accounting`."""

from ember.scaling.accounting import Accounting
from ember.scaling.best_of_n import BestOfN, best_of_n
from ember.scaling.early_stop import FIRST_FINISH, EarlyStop
from ember.scaling.particle_filter import ParticleFilter, particle_filter
from ember.scaling.reward_model import RewardModel
from ember.scaling.sampling import Samples, sample
from ember.scaling.selection import (
    BatchScorer, Scorer, ScorerError, best_index, mean_logprob, score_all, total_logprob,
)  # fmt: skip
from ember.scaling.self_consistency import Tally, Vote, majority_vote, regex_extractor, self_consistency
from ember.scaling.step_search import StepSearch, best_first_search, step_beam_search
from ember.scaling.verifier import CodeVerifier, SandboxLimits, SandboxResult, extract_code, run_sandboxed

__all__ = [
    "Accounting", "BatchScorer", "BestOfN", "CodeVerifier", "EarlyStop", "FIRST_FINISH", "ParticleFilter",
    "RewardModel", "SandboxLimits", "SandboxResult", "Samples", "Scorer", "ScorerError", "StepSearch", "Tally",
    "Vote", "best_first_search", "best_index", "best_of_n", "extract_code", "majority_vote", "mean_logprob",
    "particle_filter", "regex_extractor", "run_sandboxed", "sample", "score_all", "self_consistency",
    "step_beam_search", "total_logprob",
]  # fmt: skip
