"""Leaf helpers with no project imports, below models/ and data/: the vocabulary of config keys
(``common.keys``), atomic file writes (``common.files``) and one-line command-line errors (``common.cli``)."""
