"""Evaluation on every rank in lockstep: zero-shot classification, retrieval and validation loss,
their metric math, and the before/after forgetting report."""
