"""The command line: one `gpt2np` console script, and the one place where errors become lines.

    gpt2np train | generate | prepare | export | eval | gradcheck  [flags]   (--help on each)
    python -m gpt2np <command> [flags]                                   (the same)
    gpt2np --version

Every command is a thin `main(argv=None) -> int` over library functions, built with this
module's `ArgumentParser` and wrapped by `run_main`:
  - a bad flag is rejected at parse time: usage, then one last line `error: ...`, exit 2
    (`train` declares its flags in gpt2np.train.settings, which checks their values when the
    run starts: one `error:` line naming the flag, exit 2, as well);
  - any exception the library raises becomes one line `error: <message>` on stderr, exit 1
    (`UsageError`: exit 2); `GPT2NP_DEBUG=1` re-raises it with its traceback instead;
  - Ctrl-C outside a training loop (which handles it itself) exits 130 without a traceback;
    SIGTERM takes the same path (the same cleanup), exit 143.
The library keeps raising its own clear exceptions; no command catches them itself.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import signal
import sys
import threading

from gpt2np.errors import UsageError

# command -> module with main(argv) -> int
COMMANDS = {
    "train": ("gpt2np.commands.train", "train a GPT-2 (tiny Shakespeare or token shards)"),
    "generate": ("gpt2np.commands.generate", "sample from a model (HF name or folder, or a training run)"),
    "prepare": ("gpt2np.commands.prepare", "tokenize a corpus into token shards"),
    "export": ("gpt2np.commands.export", "write a model as a folder transformers loads"),
    "eval": ("gpt2np.commands.eval", "evaluate a model: HellaSwag, or the loss on a text"),
    "gradcheck": ("gpt2np.commands.gradcheck", "check a model's hand-written gradients against torch"),
    "plot-diagnostics": ("gpt2np.commands.plot_diagnostics",
                         "redraw a run's diagnostics.png from its diagnostics.jsonl"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose failure ends in one line `error: ...` (argparse's own is `prog: error:`)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


# ------------------------------------------------------------------- flag types with ranges


def _number(kind, low, strict, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its message
    return parse


positive_int = _number(int, 0, True, "an integer > 0")
nonneg_int = _number(int, 0, False, "an integer >= 0")
nonneg_float = _number(float, 0.0, False, "a number >= 0")


# ------------------------------------------------------------------- running a command


def run_main(impl, argv=None) -> int:
    """Run `impl(argv) -> int | None`; turn any exception into one `error:` line."""
    try:
        with _sigterm_as_interrupt():
            code = impl(argv)
    except SystemExit:
        raise  # argparse's exits (--help, bad flags) already said what they had to
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"error: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as e:  # noqa: BLE001 (the one place every error becomes a line)
        if os.environ.get("GPT2NP_DEBUG"):
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return int(code or 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt: whatever
    cleans up after Ctrl-C (temporary files, half-written shards, worker processes) cleans
    up after SIGTERM too. (The training loop handles both itself: it stops after the step.)"""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises Terminated while a command runs (main thread, default handler only);
    a second SIGTERM kills at once, as the default does, should cleaning up hang."""

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _message(e: BaseException) -> str:
    text = str(e) if not isinstance(e, KeyError) else (e.args[0] if e.args else "")
    text = _one_line(str(text))
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {e.strerror or text}"
    if not text:
        text = type(e).__name__
    elif isinstance(e, (MemoryError, RecursionError, ZeroDivisionError, AttributeError, TypeError)):
        text = f"{type(e).__name__}: {text} (GPT2NP_DEBUG=1 shows where)"
    return text


def _one_line(text: str) -> str:
    """A multi-line message (e.g. a list of options) as one line: its lines joined by "; "
    (after a line ending in ":" by a space), each line's runs of spaces collapsed."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    out = ""
    for line in filter(None, lines):
        out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def version() -> str:
    """gpt2np's installed version (the package metadata), with numpy's and Python's."""
    from importlib import metadata

    import numpy

    try:
        ours = metadata.version("gpt2np")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        ours = "(not installed: pip install -e .)"
    return (f"gpt2np {ours} (numpy {numpy.__version__}, Python {sys.version.split()[0]}) "
            f"from {os.path.dirname(os.path.abspath(__file__))}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: gpt2np COMMAND [flags]   (gpt2np COMMAND --help; gpt2np --version)\n\n"
              f"commands:\n{listing}")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"usage: gpt2np COMMAND [flags]\ncommands:\n{listing}", file=sys.stderr)
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
