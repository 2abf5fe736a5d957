#!/usr/bin/env python
"""examples/gpu_check.sh's two helpers: what the machine is, and what the check found.

    python examples/gpu_check_report.py env       # GPU, versions, tokenizer, data (exit 1 if unfit)
    python examples/gpu_check_report.py summary --work DIR --out DIR

`summary` reads the check's work folder (parts.tsv, plan.txt, logs/) and writes exactly three
files into --out, each atomically: summary.txt (every part's verdict first, then its key
figures, a few thousand characters at most: one screen to read, small enough to paste into a
bug report), bench.json (all benchmark figures) and logs.tar.gz (every log, training log.jsonl
files included; a huge log enters as its head and tail). The check prints summary.txt last,
so the end of its console output is the verdict.
"""
from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt2np.cli import ArgumentParser, run_main  # noqa: E402

SUMMARY_LIMIT = 6000  # characters of summary.txt: one screen, the end of the console output
LOG_LIMIT = 4 * 2**20  # a log larger than this goes into the archive as its head and tail
TAIL_LINES = 8  # lines of a failed part's log quoted in the summary
FALL = 0.2  # how much the late training loss must be below the first for "loss fell"
HELLO = ("Hello, I'm a language model, ", [15496, 11, 314, 1101, 257, 3303, 2746, 11, 220])


# ------------------------------------------------------------------------------ env


def env_report() -> tuple[list[str], bool]:
    """Lines describing this machine for the check, and whether it can run the check."""
    lines, ok = [f"python {platform.python_version()} ({sys.executable})"], True
    versions = []
    for name in ("numpy", "cupy", "torch", "tiktoken"):
        try:
            mod = __import__(name)
            simulated = name == "cupy" and mod.__spec__ is None  # tests/cuda_sim's stand-in
            versions.append(f"{name} {'(CPU simulator)' if simulated else mod.__version__}")
        except Exception as e:  # noqa: BLE001 (a probe: report, go on)
            versions.append(f"{name} missing ({type(e).__name__})")
    lines.append(" | ".join(versions))
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            raise RuntimeError("no GPU visible")
        lines.append(f"gpus: {n}; {_gpu_line(cupy)}")
    except Exception as e:  # noqa: BLE001
        lines.append(f"gpu: NONE ({type(e).__name__}: {e})")
        ok = False
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        lines.append(f"nvidia-smi: {q.stdout.strip() or q.stderr.strip()}")
    try:
        from gpt2np.data import tokenizer

        vocab, _ = tokenizer.bundled_bpe_files()
        ids = tokenizer.encode(HELLO[0])
        if ids != HELLO[1]:
            raise ValueError(f"encodes {HELLO[0]!r} as {ids}, expected {HELLO[1]}")
        lines.append(f"tokenizer: offline GPT-2 BPE ok ({Path(vocab).parents[1]})")
    except Exception as e:  # noqa: BLE001
        lines.append(f"tokenizer: FAIL ({e}); run examples/gpu_prepare.py and pass its folder "
                     f"as --bundle")
        ok = False
    data = os.environ.get("GPT2NP_DATA")
    lines.append(f"data: {data} ({os.path.getsize(data):,} bytes)" if data and os.path.isfile(data)
                 else "data: NONE (run examples/gpu_prepare.py and pass its folder as --bundle, "
                 "or set GPT2NP_DATA)")
    return lines, ok


def _gpu_line(cupy) -> str:
    try:
        p = cupy.cuda.runtime.getDeviceProperties(0)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        return (f"{name}, cc {p['major']}.{p['minor']}, {p['multiProcessorCount']} SMs, "
                f"{p['totalGlobalMem'] / 2**30:.1f} GiB; CUDA runtime "
                f"{cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}")
    except Exception as e:  # noqa: BLE001 (the CPU simulator has no properties)
        return f"properties unknown ({type(e).__name__})"


# ------------------------------------------------------------------------------ parts


def read_parts(work: Path) -> list[dict]:
    """parts.tsv: name, verdict, rc, seconds, limit, what (one line per part that ended)."""
    rows = []
    path = work / "parts.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            name, verdict, rc, secs, limit, what = (line.split("\t") + [""] * 6)[:6]
            rows.append(dict(name=name, verdict=verdict, rc=rc, seconds=secs, limit=limit, what=what))
    return rows


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n=TAIL_LINES, width=200) -> list[str]:
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        text = f.read().decode(errors="replace")
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return ["| " + line[:width] for line in lines[-n:]]


def figures_tests(log: Path) -> list[str]:
    """pytest's final count and its failed/errored tests."""
    if not log.is_file():
        return []
    lines = log.read_text(errors="replace").splitlines()
    out = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed|error)", line)][-1:]
    bad = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    out += [line[:200] for line in bad[:15]]
    if len(bad) > 15:
        out.append(f"... and {len(bad) - 15} more")
    return out


def figures_train(log_jsonl: Path) -> tuple[list[str], bool | None]:
    """Loss and speed from a training log.jsonl; whether the loss fell (None: no log)."""
    try:
        recs = [json.loads(line) for line in log_jsonl.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return [], None
    if not recs:
        return ["log.jsonl is empty"], None
    train = [r["train_loss"] for r in recs]
    val = [(r["step"] + 1, r["val_loss"]) for r in recs if "val_loss" in r]
    tok = sorted(r.get("tokens_per_s", 0.0) for r in recs[1:]) or [recs[0].get("tokens_per_s", 0.0)]
    late = train[-max(1, len(train) // 5):]
    fell = sum(late) / len(late) < train[0] - FALL  # not noise: the first loss is ~ln(V) on any batch
    out = [f"{len(recs)} steps; train loss {train[0]:.3f} -> {train[-1]:.3f} "
           f"(mean of the last {len(late)}: {sum(late) / len(late):.3f}); loss fell: "
           f"{'yes' if fell else 'NO'}",
           "val loss " + ", ".join(f"{v:.3f}@{s}" for s, v in val) if val else "no val loss",
           f"tokens/s median {tok[len(tok) // 2]:,.0f} (steps after the first)"]
    return out, fell


def figures_bench(rows) -> list[str]:
    if not isinstance(rows, list):
        return []
    out, nan = [], float("nan")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak'] / 2**30:.1f} GiB" if r.get("peak") else "-"
        out.append(f"{r.get('label', '?'):44s} {r.get('ms', nan):8.1f} ms {r.get('tok_s', nan):10,.0f} "
                   f"tok/s MFU {mfu:>6s} peak {peak:>9s} loss {r.get('loss', nan):.3f}")
    if len(rows) == 2 and rows[0].get("tok_s") and rows[1].get("tok_s"):
        out.append(f"ratio {rows[0].get('backend')}/{rows[1].get('backend')} tokens/s: "
                   f"{rows[0]['tok_s'] / rows[1]['tok_s']:.2f}")
    return out


def figures_attention(res) -> list[str]:
    if not isinstance(res, dict):
        return []
    out = [f"B={res.get('B')} NH={res.get('n_head')} T={res.get('T')} hs={res.get('head_size')}"]
    for r in res.get("rows", []):
        out.append(f"{r['name']:18s} fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:7.1f} TF/s | "
                   f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms {r['fwd_bwd_tflops']:7.1f} TF/s | "
                   f"err {r['rel_err']:.1e}")
    return out


def figures_lines(log: Path, keep=r"^(#|\w+_(forward|backward)|adamw|\(the rest|part )", n=24):
    if not log.is_file():
        return []
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines()]
    return [line[:120] for line in lines if re.match(keep, line)][:n]


def part_figures(part: dict, logs: Path) -> tuple[list[str], str]:
    """Key figures of one part, and its verdict (a clean exit can still FAIL: no falling loss)."""
    name, verdict = part["name"], part["verdict"]
    log = logs / f"{name}.txt"
    if name == "env":
        figs = [line for line in _tail(log, 12, 240)]
    elif name == "install":
        figs = [line[2:] for line in _tail(log, 4)]
    elif name == "tests":
        figs = figures_tests(log)
    elif name.startswith("train"):
        figs, fell = figures_train(logs / f"{name}_log.jsonl")
        if verdict == "PASS" and fell is not True:
            verdict = "FAIL"
            figs.append("the loss did not fall" if fell is False else "no log.jsonl")
    elif name.startswith("bench"):
        figs = figures_bench(_read_json(logs / f"{name}.json"))
    elif name == "attention":
        figs = figures_attention(_read_json(logs / f"{name}.json"))
    else:
        figs = figures_lines(log)
    if verdict not in ("PASS", "SKIP"):
        figs += [f"last lines of logs/{name}.txt:"] + _tail(log)
    return figs, verdict


# ------------------------------------------------------------------------------ outputs


def summarize(work: Path) -> tuple[str, dict]:
    """summary.txt's text and bench.json's content."""
    logs = work / "logs"
    parts = read_parts(work)
    plan = (work / "plan.txt").read_text().split() if (work / "plan.txt").is_file() else []
    done = {p["name"] for p in parts}
    running = (work / "running.txt").read_text().strip() if (work / "running.txt").is_file() else ""
    details, verdicts = [], []
    for p in parts:
        try:
            figs, verdict = part_figures(p, logs)
        except Exception as e:  # noqa: BLE001 (an output format changed: the summary must still be written)
            figs = [f"(figures unreadable: {type(e).__name__}: {e})"] + _tail(logs / f"{p['name']}.txt")
            verdict = p["verdict"]
        verdicts.append((p, verdict))
        details += [f"[{p['name']}] {verdict}" + (f" ({p['what']})" if verdict == "SKIP" else "")]
        details += ["  " + f for f in figs]
    count = {v: sum(1 for _, x in verdicts if x == v) for v in ("PASS", "FAIL", "TIMEOUT", "SKIP")}
    head = [f"gpu_check: {', '.join(f'{n} {v}' for v, n in count.items() if n)}"
            + (f"; running: {running}" if running else "")
            + (f"; not reached: {' '.join(n for n in plan if n not in done and n != running)}"
               if set(plan) - done - {running} else "")]
    for p, verdict in verdicts:
        head.append(f"  {p['name']:14s} {verdict:8s} rc={p['rc']:>4s} {p['seconds']:>4s} s "
                    f"(limit {p['limit']} s)")
    text = "\n".join(head + [""] + details) + "\n"
    if len(text) > SUMMARY_LIMIT:
        text = text[:SUMMARY_LIMIT - 60] + "\n... (cut; all of it in logs.tar.gz)\n"
    bench = {"env": _tail(logs / "env.txt", 12, 240)}
    for p in parts:
        if p["name"].startswith("bench") or p["name"] == "attention":
            bench[p["name"]] = _read_json(logs / f"{p['name']}.json")
    return text, bench


def _atomic_write(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def archive(logs: Path) -> bytes:
    """logs/ as a tar.gz; a file over LOG_LIMIT enters as its first and last LOG_LIMIT/2."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(p for p in logs.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if len(data) > LOG_LIMIT:
                data = (data[:LOG_LIMIT // 2] + b"\n... (cut by gpu_check_report) ...\n"
                        + data[-LOG_LIMIT // 2:])
            info = tarfile.TarInfo(f"gpu_check/{path.relative_to(logs)}")
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_outputs(work: Path, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    text, bench = summarize(work)
    _atomic_write(out / "summary.txt", text.encode())
    _atomic_write(out / "bench.json", json.dumps(bench, indent=1).encode())
    (work / "logs" / "summary.txt").write_text(text)
    _atomic_write(out / "logs.tar.gz", archive(work / "logs"))
    return text


def _main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="describe this machine; exit 1 if it cannot run the check")
    s = sub.add_parser("summary", help="write summary.txt, bench.json, logs.tar.gz")
    s.add_argument("--work", required=True, help="the check's work folder")
    s.add_argument("--out", required=True, help="the output folder")
    s.add_argument("--print", action="store_true", help="also print summary.txt")
    args = ap.parse_args(argv)
    if args.cmd == "env":
        lines, ok = env_report()
        print("\n".join(lines))
        return 0 if ok else 1
    text = write_outputs(Path(args.work), Path(args.out))
    if args.print:
        print(text, end="")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
