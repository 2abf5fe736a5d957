"""`gpt2np train`: train GPT-2 on tiny Shakespeare or token shards (gpt2np.train.loop).

The flags are gpt2np.train.settings.SETTINGS, one per Setting: this module only turns the
declarations into argparse arguments (type conversion, help with the default) and the parsed
namespace into a TrainConfig. Ranges and choices are checked once, by the library, when the
run starts (gpt2np.train.settings.check_config): a bad value is one `error:` line, exit 2.
"""
from __future__ import annotations


from gpt2np.cli import ArgumentParser, UsageError, run_main
from gpt2np.data.shakespeare import DataNotFoundError
from gpt2np.io.checkpoint import CheckpointError
from gpt2np.train.loop import train
from gpt2np.train.settings import BY_NAME, SETTINGS, Setting, TrainConfig

DESCRIPTION = "Train GPT-2 on tiny Shakespeare with gpt2np (or its PyTorch reference)."
EPILOG = ("Run settings left unset take the defaults shown, or the checkpoint's values with "
          "--resume.")


def build_parser(defaults: dict | None = None, *, prog: str = "gpt2np train",
                 description: str = DESCRIPTION, epilog: str = EPILOG) -> ArgumentParser:
    """The parser of every Setting. `defaults` (setting name -> value) replaces declared
    defaults, as a recipe of settings does: the help shows them; a setting of this
    invocation takes them as its default, while a stored setting left unset stays None
    (a fresh run fills it in, a resumed run inherits the checkpoint's)."""
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(BY_NAME))
    if unknown:
        raise ValueError(f"no such training settings: {', '.join(unknown)}")
    p = ArgumentParser(prog=prog, description=description, epilog=epilog)
    for s in SETTINGS:
        _add_flag(p, s, defaults)
    return p


def _add_flag(p: ArgumentParser, s: Setting, defaults: dict):
    if s.type is bool:  # a switch: given or not (None: a stored one was not given)
        if s.default:
            p.add_argument("--no-" + s.flag[2:], dest=s.name, action="store_false",
                           help=_escape(f"turn off {s.help}"))
        else:
            p.add_argument(s.flag, action="store_true", default=None if s.stored else False,
                           help=_escape(s.help))
        return
    default = defaults.get(s.name, s.default)
    shown = (f"default: {s.default_text}" if s.name not in defaults and s.default_text
             else f"default {default}")
    metavar = s.metavar or ("{" + ",".join(s.choices) + "}" if s.choices
                            else "N" if s.type is int else None)
    p.add_argument(s.flag, type=s.type, default=None if s.stored else default, metavar=metavar,
                   help=_escape(f"{s.help} ({shown})"))


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of a namespace that build_parser parsed."""
    return TrainConfig(**{s.name: getattr(args, s.name) for s in SETTINGS})


def _main(argv) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    try:
        result = train(cfg)
    except (CheckpointError, DataNotFoundError) as e:
        # the checkpoint or data file that --resume / --data named: a usage error (exit 2)
        raise UsageError(str(e)) from e
    return 1 if result.status == "diverged" else 0


def main(argv=None) -> int:
    """`gpt2np train`: exit 0 done or stopped, 1 diverged or a failure, 2 a bad command line
    (flags, settings, --resume's checkpoint, --data)."""
    return run_main(_main, argv)
