"""`python -m gpt2np COMMAND [flags]`: the same as the `gpt2np` console script."""
import sys

from gpt2np.cli import main

sys.exit(main())
