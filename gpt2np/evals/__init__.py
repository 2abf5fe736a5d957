"""Evaluations: HellaSwag, the loss on a text or shards, the gradient check, reference figures."""
