"""Models in and out: Hugging Face folders and hub ids, training runs, checkpoints, export."""
