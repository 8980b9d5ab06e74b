"""Measurements of a run (perplexity, weight errors, stage timing) and its report."""
