"""Sample from GPT-2 with the NumPy (or CuPy) model: a thin wrapper of `gpt2np generate`.

    python examples/generate.py                                   # gpt2 from the Hugging Face cache
    python examples/generate.py --model out/shakespeare --prompt "ROMEO:"   # a training run
    python examples/generate.py --model path/to/folder            # model.safetensors + config.json
    python examples/generate.py --temperature 0                   # greedy
    python examples/generate.py --help
"""
import os
import sys

# run from a checkout without installing: put the repository root on the path
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt2np.commands.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
