"""`gpt2np plot-diagnostics RUN`: redraw a run's diagnostics.png from its diagnostics.jsonl."""
from __future__ import annotations

from pathlib import Path

from gpt2np.cli import ArgumentParser, run_main
from gpt2np.train.diagnostics import PLOT_NAME, read_diagnostics
from gpt2np.train.diagnostics_plot import plot_diagnostics


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt2np plot-diagnostics",
                       description="Redraw a run's diagnostics.png from its diagnostics.jsonl.")
    p.add_argument("run", help="a training run's out-dir (or its diagnostics.jsonl)")
    p.add_argument("--out", help=f"the picture (default RUN/{PLOT_NAME})")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    records = read_diagnostics(args.run)
    run = Path(args.run)
    out = args.out or ((run if run.is_dir() else run.parent) / PLOT_NAME)
    plot_diagnostics(records, out)
    print(f"wrote {out} ({len(records)} diagnostic steps)")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)
