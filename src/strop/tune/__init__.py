"""strop tune: hyperparameter search whose trials are ordinary strop runs (search.py)."""
