"""The data wing: where texts come from and how they become model batches.

Owns reading data files of every format (readers.py), text sources, column detection and labelled data
(sources.py), the built-in sample corpus (sample_corpus.tsv), and tokenizing, sorting and padding into
batches (batching.py). Imports the standard library, pyarrow/pandas where a format needs them, torch for
batches, and ``attnprobe.errors``; no model code, no other wing.
"""
