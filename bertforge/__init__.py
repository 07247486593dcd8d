"""bertforge: pretrain BERT models from scratch on your own corpus."""

__version__ = "0.1.0"
