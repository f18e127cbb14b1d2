"""Verifiable inference: check that claimed outputs came from a given model and sampling configuration."""

from ember.verify.claims import Claim, claim_from_dict, load_claims
from ember.verify.roc import roc_auc
from ember.verify.token_difr import ClaimResult, TokenVerifier, VerifyReport

__all__ = ["Claim", "ClaimResult", "TokenVerifier", "VerifyReport", "claim_from_dict", "load_claims", "roc_auc"]
