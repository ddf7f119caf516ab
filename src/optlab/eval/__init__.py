"""Evaluation: the scorer (lm-evaluation-harness meanings), perplexity and tasks."""
