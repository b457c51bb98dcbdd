"""Objectives. A method is a loss over a batch, not a trainer class."""
