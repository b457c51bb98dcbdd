"""Retrieval beside fine-tuning: documents -> chunks -> an index of embeddings and BM25 -> hits.

documents.py reads files and rows, chunk.py splits them by tokens, embed.py turns text into vectors,
index.py keeps chunks and vectors on disk (add, update, remove), lexical.py scores BM25, search.py ranks.
"""
