"""Training: the loop (loop.py) and its parts, each a module of one role."""
