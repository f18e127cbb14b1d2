"""Speculative decoding: proposers of draft tokens, verified by the target model in one step."""
