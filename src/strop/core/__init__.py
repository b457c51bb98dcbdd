"""Foundations shared by every layer: config, errors, device choice, atomic files."""
