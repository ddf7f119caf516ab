"""Audits of unlearning: is the forgetting real (SKeB persuasion probes over a domain graph),
and can the metrics be trusted (metric reliability and the Unified Quality Score)."""
