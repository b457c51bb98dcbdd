"""Recipes compose config -> model -> data -> fit -> outputs. One short file per method."""
