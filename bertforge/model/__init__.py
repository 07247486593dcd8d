"""The BERT model (bert.py) and the kernels it runs on (ops.py)."""
