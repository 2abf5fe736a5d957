"""The command-line tools: one module per `gpt2np` command, each a thin `main(argv)` that parses
flags and calls library functions (gpt2np.cli runs them and turns errors into lines)."""
