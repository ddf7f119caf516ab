"""Pruning: magnitude, Wanda and SparseGPT; unstructured or N:M; one code path for all families."""
