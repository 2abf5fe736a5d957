"""What a training run leaves in --out-dir, and what it prints: one object the loop calls.

  RunOutputs     log.jsonl (one JSON record per optimizer step), loss.png, samples.txt,
                 the progress bar and messages, and the run's endings (done, stopped,
                 diverged) as a TrainResult. Only rank 0 writes or prints.
  Checkpointer   ckpt.safetensors (gpt2np.io.checkpoint), written by rank 0 with every rank's
                 data position (a collective: every rank calls save()).
  Panel          one panel of loss.png: the loss panel is built in; an evaluator adds its own
                 by listing Panel objects in its `panels` attribute (see gpt2np.train.evaluators),
                 or any code by passing panels=[...] to RunOutputs.
  sample_texts   a few top-k samples from the trained model, for samples.txt
                 (gpt2np.generate's sampler).
  hold_out_dir   rank 0 holds --out-dir for the run's life (gpt2np.files.FolderLock: a
                 second run or a --resume there meanwhile is refused), removes what a killed
                 run's writes left, and refuses inputs that the run's files would replace.
  open_checkpoint   what --resume / --overwrite find in --out-dir: a fresh run never
                 replaces an earlier run's files without --overwrite, checkpoint or not.

A fresh run with --overwrite removes the earlier run's files when it starts writing (the
checkpoint first), so a run killed at any moment never leaves an old checkpoint beside its
new log for a --resume to continue. Every file goes through gpt2np.files' writer.

May touch: the files of --out-dir and stdout/stderr; reads the engine (state, last_logits).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gpt2np import files
from gpt2np.data.tokenizer import get_encoding
from gpt2np.generate import sample_next, sampled_vocab
from gpt2np.io.checkpoint import CKPT_NAME, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from gpt2np.train.settings import TrainConfig, TrainError

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
SAMPLES_NAME = "samples.txt"
RUN_FILES = (CKPT_NAME, LOG_NAME, PLOT_NAME, SAMPLES_NAME)  # what RunOutputs, Checkpointer write


@dataclass
class TrainResult:
    status: str  # "done", "stopped" (--stop-after or a signal) or "diverged"
    step: int  # optimizer steps completed
    val_loss: float | None  # the last evaluated validation loss
    records: list  # this run's log records, earlier runs' included when resumed
    wall_s: float
    samples: list


@dataclass
class Panel:
    """A panel of loss.png, drawn when any record has one of `keys`. An overlay draws on the
    loss panel instead of a panel of its own (a reference line, say)."""

    keys: tuple[str, ...]
    draw: Callable  # draw(ax, records): a matplotlib Axes and the log records
    overlay: bool = False


def _draw_loss(ax, records):
    ax.plot([r["step"] + 1 for r in records], [_num(r["train_loss"]) for r in records],
            lw=0.8, alpha=0.7, label="train")
    val = [(r["step"] + 1, _num(r["val_loss"])) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()


LOSS_PANEL = Panel(("train_loss",), _draw_loss)


def plot(records: list, path: Path, panels=(LOSS_PANEL,)):
    """loss.png: one row per panel that has data."""
    has_data = [p for p in panels if any(k in r for r in records for k in p.keys)]
    shown = [p for p in has_data if not p.overlay]
    if not records or not shown:
        return
    # the object API with the Agg canvas: no pyplot, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4 * len(shown)), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(len(shown), 1, i + 1) for i in range(len(shown))]
    for ax, panel in zip(axes, shown):
        panel.draw(ax, records)
    for panel in has_data:
        if panel.overlay:
            panel.draw(axes[0], records)  # the first panel: the loss panel
    fig.tight_layout()
    files.write_file(path, lambda f: fig.savefig(f, format="png"))


class RunOutputs:
    """run_files: every file name a run writes in out_dir (its probes' too), which a fresh
    run removes before it writes its own (it got there with --overwrite, or found none)."""

    def __init__(self, out_dir, master: bool = True, progress: bool = True, panels=(),
                 run_files=RUN_FILES):
        self.out = Path(out_dir)
        self.run_files = run_files
        self.log_path = self.out / LOG_NAME
        self.ckpt_path = self.out / CKPT_NAME
        self.master, self.progress = master, progress
        self.panels = [LOSS_PANEL, *panels]
        self.records: list = []
        self.t_start = time.perf_counter()
        self.pbar = None

    def say(self, msg: str):
        if self.master:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)

    def start(self, step: int, resumed: bool, max_steps: int):
        """Keep the log's records before `step` (a resumed run's earlier steps; a crashed
        run may have logged steps after its checkpoint), and open the progress bar."""
        from tqdm import tqdm

        self.records = read_jsonl(self.log_path, before=step) if resumed else []
        if self.master:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resumed:
                remove_run(self.out, self.run_files)
            files.write_text(self.log_path, "".join(_json_line(r) for r in self.records))
        self.pbar = tqdm(total=max_steps, initial=step, disable=not (self.master and self.progress),
                         dynamic_ncols=True, unit="step")

    def log_step(self, rec: dict, evaluated: dict):
        """One optimizer step's record; `evaluated`: the evaluators' fields, if it evaluated."""
        self.records.append(rec)
        if evaluated:
            self.say(f"step {rec['step'] + 1:5d} | train loss {rec['train_loss']:.4f} | "
                     + " | ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in evaluated.items()))
        if self.master:
            files.append_text(self.log_path, _json_line(rec))
            if evaluated:
                self.plot()  # watchable while it trains
        self.pbar.set_postfix(loss=f"{rec['train_loss']:.4f}", lr=f"{rec['lr']:.2e}",
                              tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        self.pbar.update(1)

    def plot(self):
        if self.master:
            plot(self.records, self.out / PLOT_NAME, self.panels)

    @property
    def val_loss(self):
        return next((r["val_loss"] for r in reversed(self.records) if "val_loss" in r), None)

    def close(self):
        if self.pbar is not None:
            self.pbar.close()

    def _result(self, status, step, samples=()):
        self.close()
        return TrainResult(status, step, self.val_loss, self.records,
                           time.perf_counter() - self.t_start, list(samples))

    # ------------------------------------------------------------------ endings

    def diverged(self, step: int, what: str, value, kept: str, lr: float) -> TrainResult:
        result = self._result("diverged", step)
        if self.master:
            print(f"non-finite {what} ({value}) at step {step}: training diverged; stopping. "
                  f"{kept}. Try a lower --lr (now {lr}) or --grad-clip.", file=sys.stderr)
            self.plot()
        return result

    def stopped(self, step: int, why: str) -> TrainResult:
        result = self._result("stopped", step)
        self.plot()
        self.say(f"stopped ({why}) after step {step}; checkpoint {self.ckpt_path}. "
                 f"Continue with --resume --out-dir {self.out}")
        return result

    def done(self, step: int, samples: list) -> TrainResult:
        self.plot()
        if self.master and samples:
            text = "\n\n".join(samples) + "\n"
            files.write_text(self.out / SAMPLES_NAME, text)
            for i, s in enumerate(samples):
                self.say(f"--- sample {i + 1} ---\n{s}")
        result = self._result("done", step, samples)
        val = result.val_loss
        val_msg = f"val loss {val:.4f}" if val is not None else "no val loss"
        self.say(f"done: {step} steps, {val_msg}, {result.wall_s:.0f} s; outputs in {self.out}/")
        return result


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _json_line(rec: dict) -> str:
    """One strict-JSON line: a non-finite number is written as null and its key listed in
    "non_finite" (json.dumps would write bare NaN / Infinity, which strict readers reject)."""
    bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        rec = {**rec, **dict.fromkeys(bad), "non_finite": bad}
    return json.dumps(rec, allow_nan=False) + "\n"


def _num(v):
    return float("nan") if v is None else v  # (null in log.jsonl: a non-finite value)


MAX_LINE_BYTES = 4 * 2 ** 20  # a record is a few hundred bytes (diagnostics: kilobytes)


def read_jsonl(path: Path, before: float = math.inf) -> list:
    """The records of a run's .jsonl (log.jsonl, diagnostics.jsonl) with step < before.

    A line that is no record (not UTF-8, not JSON, no object with an integer step, longer
    than any record) is skipped: a damaged log loses those lines, it never blocks a resume.
    Each is named in a warning, but for a last line cut short by a crash (the usual end of
    an interrupted run's log)."""
    if not path.exists():
        return []
    records, bad = [], []
    with open(path, "rb") as f:
        for lineno, line in enumerate(_lines(f), 1):
            rec = _record(line)
            if rec is None:
                if line.strip() and line.endswith(b"\n"):
                    bad.append(lineno)
            elif rec["step"] < before:
                records.append(rec)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} damaged line(s) that are no record (line "
                      f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''})",
                      stacklevel=2)
    return records


def _lines(f):
    """The file's lines as bytes; a line longer than MAX_LINE_BYTES as b"!\n" (no record),
    read past in bounded pieces."""
    while True:
        line = f.readline(MAX_LINE_BYTES)
        if not line:
            return
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            line = b"!\n"
        yield line


def _record(line: bytes) -> dict | None:
    try:
        rec = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return rec if type(step) is int and step >= 0 else None


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, ...); the previous one is intact."""


class Checkpointer:
    """Writes ckpt.safetensors: the engine's params and AdamW state, the step, every rank's
    data position, and `state` (the run's settings, model config, data identity ...)."""

    def __init__(self, path: Path, ctx, state: dict, last_saved: int | None = None):
        self.path, self.ctx, self.state = path, ctx, state
        self.last_saved = last_saved  # the step of the checkpoint on disk, if any

    def save(self, step: int, engine, train_loader):
        if self.last_saved == step:
            return
        # every rank's data position (a collective: all ranks come here), rank 0 writes
        data_ranks = self.ctx.all_gather_object(train_loader.state_dict())
        if not self.ctx.is_main:
            self.last_saved = step
            return
        p, m, v, t = engine.state()
        state = {"step": step, **self.state, "data": data_ranks[0], "data_ranks": data_ranks}
        try:  # atomic: on any failure the file on disk is the previous checkpoint
            save_checkpoint(self.path, Checkpoint(params=p, m=m, v=v, t=t, state=state))
        except OSError as e:
            if self.last_saved is None:  # nothing to resume: the run starts again
                then = ("no checkpoint was written yet, so there is nothing to resume. Free "
                        "space (or fix the folder) and start the run again with --overwrite")
            else:
                then = (f"the checkpoint of step {self.last_saved} is intact. Free space (or "
                        "fix the folder) and continue with --resume")
            raise SaveError(f"cannot write the checkpoint {self.path} at step {step} "
                            f"({e.strerror or e}); {then}") from e
        self.last_saved = step

    def kept(self) -> str:
        """What a stopped-early run leaves, for its message."""
        if self.last_saved is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint (step {self.last_saved}) is kept in {self.path}"


def sample_texts(engine, block_size: int, seed: int, num: int, tokens: int, prompt="\n",
                 temperature=1.0, top_k=50) -> list[str]:
    """A few continuations of `prompt`, top-k sampled by gpt2np.generate's sampler (a fixed
    seed: the same every time)."""
    enc = get_encoding()
    vocab = sampled_vocab(engine.config)  # a padded vocabulary's extra rows are no tokens
    rng = np.random.default_rng(seed)
    idx = np.array([enc.encode_ordinary(prompt)] * num, dtype=np.int64)
    for _ in range(tokens):
        logits = engine.last_logits(idx[:, -block_size:])[:, :vocab]  # (N, V) host
        idx = np.concatenate([idx, sample_next(logits, temperature, top_k, rng)[:, None]], axis=1)
    return [enc.decode(row.tolist()).strip() for row in idx]


def hold_out_dir(cfg: TrainConfig, out_dir: Path, run_files) -> files.FolderLock:
    """Lock --out-dir for this run (rank 0 alone writes there; call it on rank 0), before
    anything in it is read: then remove the temporary files a killed run left beside its
    files, and refuse an input that is one of the files this run replaces."""
    try:
        lock = files.FolderLock(out_dir, "--out-dir")
    except files.FolderInUseError as e:
        raise TrainError(str(e)) from None
    except OSError as e:
        if isinstance(e, files.WriteError) and e.filename != str(out_dir):
            why = str(e)  # a file in it (a planted lock link): named, with what to do
        else:
            why = f"cannot write there ({e.strerror or e})"
        raise TrainError(f"--out-dir {out_dir}: {why}; choose another --out-dir") from e
    try:
        files.remove_temporaries(out_dir, set(run_files).__contains__)
        _check_inputs(cfg, out_dir, run_files)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_inputs(cfg: TrainConfig, out_dir: Path, run_files):
    """An input that is one of the run's files (or the out-dir, for --init-from) would be
    replaced by the run: refused."""
    outputs = {os.path.realpath(out_dir / name) for name in run_files}
    for name in ("data", "init_from", "hellaswag"):  # (the files a run reads)
        value = getattr(cfg, name)
        if value is None or not os.path.exists(value):
            continue
        real = os.path.realpath(value)
        own_dir = name == "init_from" and not cfg.resume and real == os.path.realpath(out_dir)
        if real in outputs or own_dir:
            what = "this run's --out-dir" if own_dir else f"a file this run writes in {out_dir}"
            raise TrainError(f"--{name.replace('_', '-')} {value} is {what}, which the run "
                             "replaces: copy it elsewhere first, or choose another --out-dir")


def open_checkpoint(cfg: TrainConfig, out_dir: Path, run_files=RUN_FILES):
    """The checkpoint to resume (--resume), else None; refuses to replace an earlier run's
    files (its checkpoint, or its log, plots, samples without one) silently."""
    path = out_dir / CKPT_NAME
    if not cfg.resume:  # every rank refuses, not only rank 0
        if path.exists() and not cfg.overwrite:
            raise TrainError(f"{path} already exists: pass --resume to continue that run, "
                             "--overwrite to start again, or choose another --out-dir")
        found = [n for n in run_files if os.path.lexists(out_dir / n)]
        if found and not cfg.overwrite:
            raise TrainError(f"--out-dir {out_dir} holds an earlier run's {', '.join(found)} "
                             "(and no checkpoint to resume): pass --overwrite to replace them, "
                             "or choose another --out-dir")
        return None
    if not path.exists():
        raise TrainError(f"--resume: no checkpoint {path} to resume from")
    ckpt = load_checkpoint(path)
    if "run" not in ckpt.state or "step" not in ckpt.state:
        raise CheckpointError(f"checkpoint {path} lacks the training state "
                              "(was it written by gpt2np.train.loop?)")
    return ckpt


def remove_run(out_dir: Path, run_files):
    """Remove an earlier run's files, its checkpoint first: a run killed meanwhile leaves no
    checkpoint beside a log it does not belong to."""
    for name in sorted(run_files, key=lambda n: n != CKPT_NAME):
        try:
            os.unlink(out_dir / name)
        except FileNotFoundError:
            pass
