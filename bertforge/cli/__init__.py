"""The command line: `bertforge COMMAND ...` (main.py), the downstream commands in downstream.py."""
