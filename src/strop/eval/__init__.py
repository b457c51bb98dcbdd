"""Evaluation: metrics, answer extraction, paired bootstrap, likelihood and generation over a model."""
