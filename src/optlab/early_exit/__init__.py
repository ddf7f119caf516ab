"""Early exit (GREEN-CODE, arXiv 2501.11006): a causal LM that may stop after any allowed layer,
reading that layer's state through the model's own final norm and LM head."""
