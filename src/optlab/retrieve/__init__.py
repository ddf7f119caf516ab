"""UPRISE prompt retrieval (Cheng et al. 2023): LLM-scored demonstrations, a trained
bi-encoder, an inner-product index and the cross-task / cross-model protocol."""
