"""What is learned: GLUE scorers (scores.py)."""
