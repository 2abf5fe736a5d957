"""The errors gpt2np raises on purpose, beside Python's own (ValueError, OSError, ...).

The library raises exceptions whose message names the problem, the file or flag, and what to do;
gpt2np.cli turns every exception into one `error: ...` line. The class only chooses the exit
status there: a UsageError is a request that makes no sense as given (exit 2, like a bad flag),
anything else a failure of the work (exit 1).
"""


class UsageError(ValueError):
    """A request that makes no sense as given: flags that clash, a path that names nothing."""
