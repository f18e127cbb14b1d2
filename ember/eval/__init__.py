"""Model quality tools: perplexity and KL divergence (`ember eval ...`)."""
