"""Data in pure steps: file rows -> records (messages or text) -> token ids + loss mask -> batches."""
