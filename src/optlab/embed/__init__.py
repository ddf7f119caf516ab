"""Sentence embeddings from causal LMs: PromptEOL (``Embedder``) and its STS evaluation."""

from optlab.embed.prompteol import PRESETS, TEMPLATE, Embedder, PromptEOLConfig, preprocess

__all__ = ["PRESETS", "TEMPLATE", "Embedder", "PromptEOLConfig", "preprocess"]
