"""End-to-end training runs on tiny Shakespeare with a tiny model: learning, numpy == torch,
bit-identical resume, interruption, divergence, bad checkpoints, missing data."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gpt2np.commands.train import build_parser, main
from gpt2np.data.shakespeare import BatchLoader, load_tokens, split
from gpt2np.io.checkpoint import CheckpointError, load_checkpoint
from gpt2np.train import loop as T
from gpt2np.train.engines import ArrayEngine
from gpt2np.train.loop import TrainConfig, TrainError, train
from gpt2np.train.settings import resolve
from testdata import shakespeare_path
from tiny_run import as_flags, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    if not shakespeare_path().is_file():
        pytest.skip(f"tiny Shakespeare not at {shakespeare_path()} (set GPT2NP_DATA)")
    return tmp_path_factory.mktemp("token-cache")  # tokenized once for the module


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _no_speed(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_learns_and_writes_outputs(tmp_path, token_cache):
    out = tmp_path / "run"
    res = train(tiny_config(out, token_cache, max_steps=30, eval_interval=10, eval_batches=2, num_samples=2,
                     sample_tokens=5))
    assert res.status == "done" and res.step == 30
    log = _log(out)
    assert [r["step"] for r in log] == list(range(30))
    assert set(log[0]) == {"step", "train_loss", "lr", "grad_norm", "tokens_per_s"}
    assert [r["step"] for r in log if "val_loss" in r] == [9, 19, 29]
    assert log[0]["train_loss"] == pytest.approx(np.log(50257), abs=0.1)  # uniform at init
    assert log[-1]["val_loss"] < 8.8 and res.val_loss == log[-1]["val_loss"]  # it learns
    lrs = [r["lr"] for r in log]  # linear warmup to lr, then cosine down towards lr/10
    assert lrs[:2] == pytest.approx([5e-3, 1e-2]) and 1e-3 < lrs[-1] < 1.05e-3
    assert all(a >= b - 1e-12 for a, b in zip(lrs[1:], lrs[2:]))
    assert (out / "loss.png").stat().st_size > 1000
    assert len(res.samples) == 2 and (out / "samples.txt").exists()
    ckpt = load_checkpoint(out / "ckpt.safetensors")
    assert ckpt.state["step"] == 30 and ckpt.t == 30
    params = load_file(out / "ckpt.safetensors")  # a plain safetensors file of HF-named params
    assert params["transformer.wte.weight"].shape == (50257, 16)


def test_numpy_and_torch_agree_in_float64(tmp_path, token_cache):
    pytest.importorskip("torch")
    # two micro-steps per optimizer step: gradient accumulation on both sides
    kw = dict(dtype="float64", max_steps=4, eval_interval=2, total_batch_size=2 * 4 * 16)
    rn = train(tiny_config(tmp_path / "np", token_cache, backend="numpy", **kw))
    rt = train(tiny_config(tmp_path / "torch", token_cache, backend="torch", **kw))
    for a, b in zip(rn.records, rt.records, strict=True):
        for key in ("train_loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-10, abs=0), (a["step"], key)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-10, abs=0)
    assert rn.records[-1]["train_loss"] < rn.records[0]["train_loss"]
    pn = load_checkpoint(tmp_path / "np" / "ckpt.safetensors")
    pt = load_checkpoint(tmp_path / "torch" / "ckpt.safetensors")
    assert pn.t == pt.t == 4
    for k in pn.params:
        np.testing.assert_allclose(pn.params[k], pt.params[k], rtol=0, atol=1e-10)
        np.testing.assert_allclose(pn.v[k], pt.v[k], rtol=1e-8, atol=1e-20)


@pytest.mark.parametrize("backend,kw", [
    # gradient accumulation, and random batches: the data RNG must resume too
    ("numpy", dict(total_batch_size=2 * 4 * 16, random_batches=True)),
    ("torch", dict()),
])
def test_resume_is_bit_identical(tmp_path, token_cache, backend, kw):
    if backend == "torch":
        pytest.importorskip("torch")
    train(tiny_config(tmp_path / "whole", token_cache, backend=backend, **kw))
    part = tiny_config(tmp_path / "part", token_cache, backend=backend, stop_after=3, **kw)
    first = train(part)
    assert first.status == "stopped" and first.step == 3  # between evals and saves
    assert load_checkpoint(tmp_path / "part" / "ckpt.safetensors").state["step"] == 3
    # resume with no settings at all: they come from the checkpoint
    rest = train(TrainConfig(data=part.data, cache_dir=part.cache_dir, out_dir=part.out_dir,
                             resume=True, num_samples=0, progress=False))
    assert rest.status == "done" and rest.step == 8
    assert _no_speed(_log(tmp_path / "part")) == _no_speed(_log(tmp_path / "whole"))
    a = load_file(tmp_path / "whole" / "ckpt.safetensors")
    b = load_file(tmp_path / "part" / "ckpt.safetensors")
    assert set(a) == set(b)
    for k in a:  # params and both AdamW moments, bit for bit
        assert a[k].tobytes() == b[k].tobytes(), k


def test_sigint_saves_and_stops_after_the_step(tmp_path, token_cache, monkeypatch):
    real = ArrayEngine.clip_and_step
    calls = []

    def step_then_interrupt(self, *a):
        calls.append(1)
        norm = real(self, *a)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 3
        return norm

    monkeypatch.setattr(ArrayEngine, "clip_and_step", step_then_interrupt)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    res = train(tiny_config(tmp_path, token_cache))
    assert res.status == "stopped" and res.step == 3
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == 3
    assert [r["step"] for r in _log(tmp_path)] == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found, restored


def test_sigterm_on_the_command_line(tmp_path, token_cache):
    cfg = tiny_config(tmp_path, token_cache, max_steps=100_000, eval_interval=100_000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "train_shakespeare.py"),
                             *as_flags(cfg)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.monotonic() + 300  # a hang guard only: shared CI cores can be slow
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the run never logged 3 steps"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM" in output and "--resume" in output
    steps = [r["step"] for r in _log(tmp_path)]
    assert steps == list(range(len(steps)))
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == len(steps)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, token_cache,
                                                                   monkeypatch, capsys):
    real = ArrayEngine.forward_backward
    calls = []

    def nan_at_step_6(self, x, y, scale):
        calls.append(1)
        loss = real(self, x, y, scale)
        return float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(ArrayEngine, "forward_backward", nan_at_step_6)
    res = train(tiny_config(tmp_path, token_cache, save_interval=4))
    assert res.status == "diverged" and res.step == 6
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 6" in err and "step 4" in err
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == 4
    assert [r["step"] for r in _log(tmp_path)] == [0, 1, 2, 3, 4, 5]
    monkeypatch.setattr(ArrayEngine, "forward_backward", real)
    # a resume from the good checkpoint drops the diverged run's later log lines
    res = train(tiny_config(tmp_path, token_cache, resume=True))
    assert res.status == "done" and [r["step"] for r in _log(tmp_path)] == list(range(8))
    monkeypatch.setattr(ArrayEngine, "forward_backward", lambda self, x, y, s: float("inf"))
    assert main(as_flags(tiny_config(tmp_path / "cli", token_cache))) == 1  # the CLI exits non-zero
    assert "no checkpoint was written yet" in capsys.readouterr().err


@pytest.fixture
def finished_run(tmp_path, token_cache):
    train(tiny_config(tmp_path, token_cache, max_steps=3))
    return tmp_path


def test_truncated_checkpoint_is_a_clear_error(finished_run, token_cache, capsys):
    path = finished_run / "ckpt.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny_config(finished_run, token_cache, resume=True))
    assert main(as_flags(tiny_config(finished_run, token_cache, resume=True))) == 2
    assert "corrupt" in capsys.readouterr().err


def test_flipped_byte_in_checkpoint_is_caught(finished_run, token_cache):
    path = finished_run / "ckpt.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x40  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(tiny_config(finished_run, token_cache, resume=True))


def test_checkpoint_of_another_model_is_refused(finished_run, token_cache):
    with pytest.raises(TrainError, match="n_embd: checkpoint 16, now 32"):
        train(tiny_config(finished_run, token_cache, resume=True, n_embd=32))
    with pytest.raises(TrainError, match="--resume"):  # no silent overwrite either
        train(tiny_config(finished_run, token_cache))
    with pytest.raises(CheckpointError, match="not a gpt2np training checkpoint"):
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(2)}, finished_run / "ckpt.safetensors")
        train(tiny_config(finished_run, token_cache, resume=True))


def test_resume_without_checkpoint(tmp_path, token_cache):
    with pytest.raises(TrainError, match="no checkpoint"):
        train(tiny_config(tmp_path, token_cache, resume=True))


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    rc = main(["--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "o"),
               "--cache-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "--data" in err


def test_cupy_backend_without_cupy_is_a_clear_error(tmp_path, token_cache):
    try:
        import cupy  # noqa: F401

        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("CuPy works here")
    except Exception:
        pass
    with pytest.raises(TrainError, match="cupy"):
        train(tiny_config(tmp_path, token_cache, backend="cupy"))


def test_every_flag_parses():
    args = build_parser().parse_args(
        "--backend torch --data d --out-dir o --max-steps 7 --batch-size 2 --block-size 8 "
        "--n-layer 3 --n-head 2 --n-embd 8 --dtype float64 --lr 0.5 --min-lr 0.1 "
        "--warmup-steps 1 --weight-decay 0.2 --grad-clip 0.5 --total-batch-size 32 "
        "--eval-interval 3 --eval-batches 2 --seed 4 --resume --stop-after 2 --init-from gpt2"
        .split())
    assert (args.backend, args.max_steps, args.total_batch_size, args.min_lr, args.init_from,
            args.stop_after, args.resume, args.dtype) == ("torch", 7, 32, 0.1, "gpt2", 2, True,
                                                          "float64")
    run = resolve(TrainConfig(lr=3e-3), None)
    assert run["min_lr"] == pytest.approx(3e-4) and run["weight_decay"] == 0.1
    assert run["grad_clip"] == 1.0 and run["total_batch_size"] == run["batch_size"] * run["block_size"]
    with pytest.raises(TrainError, match="multiple"):
        resolve(TrainConfig(batch_size=4, block_size=16, total_batch_size=100), None)


def test_init_from_pretrained(tmp_path, token_cache):
    from gpt2np import GPT, GPTConfig, save_pretrained

    src = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16), seed=7)
    save_pretrained(src, tmp_path / "pre")
    res = train(tiny_config(tmp_path / "run", token_cache, init_from=str(tmp_path / "pre"), max_steps=1,
                     n_layer=None, n_head=None, n_embd=None))
    x, y = BatchLoader(split(load_tokens(shakespeare_path(), cache=token_cache))[0], 4, 16).next_batch()
    _, loss = src.forward(x, y)
    assert res.records[0]["train_loss"] == pytest.approx(float(loss), rel=1e-6)  # started from it


def test_padded_vocab_and_bf16_matmuls(tmp_path, token_cache):
    # GPT-2's 50257 tokens padded to 50304 rows, matmuls in (emulated) bf16: it learns, the
    # padded rows are in the checkpoint, samples decode (padding ids are never sampled)
    out = tmp_path / "run"
    res = train(tiny_config(out, token_cache, vocab_size=50304, precision="bf16", max_steps=12,
                     num_samples=2, sample_tokens=6))
    assert res.status == "done" and len(res.samples) == 2
    log = _log(out)
    assert log[0]["train_loss"] == pytest.approx(np.log(50304), abs=0.1)
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 1.0
    assert load_file(out / "ckpt.safetensors")["transformer.wte.weight"].shape == (50304, 16)
    with pytest.raises(TrainError, match="vocab_size: checkpoint 50304, now 50257"):
        train(tiny_config(out, token_cache, resume=True, vocab_size=50257))


def test_bad_vocab_size_and_precision(tmp_path, token_cache):
    with pytest.raises(TrainError, match="--vocab-size must be >= 50257, got 1000: GPT-2 has"):
        train(tiny_config(tmp_path / "a", token_cache, vocab_size=1000))
    with pytest.raises(TrainError, match="needs --dtype float32"):
        train(tiny_config(tmp_path / "b", token_cache, dtype="float64", precision="bf16"))
    with pytest.raises(TrainError, match="numpy and cupy engines"):
        train(tiny_config(tmp_path / "c", token_cache, backend="torch", precision="bf16"))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_evaluators_and_step_probes_plug_in(tmp_path, token_cache, monkeypatch, backend):
    # the extension points of gpt2np.train.loop: an evaluator's fields land in the eval steps'
    # records, a probe sees the all-reduced grads before the update and the params around it
    # (an update ratio), the forward hook runs once per micro-step, a panel joins loss.png
    from gpt2np.train import evaluators as E
    from gpt2np.train.outputs import Panel

    drawn = []

    class Extra:
        panels = [Panel(("extra",), lambda ax, records: drawn.append(len(records)))]

        def evaluate(self, step, engine):
            return {"extra": float(step)}

    class Ratio(E.StepProbe):
        def __init__(self):
            self.hooks = self.before = 0

        def start_step(self, step, engine):
            self.params = {k: np.array(v) for k, v in engine.params.items()}
            engine.forward_hook = lambda eng: setattr(self, "hooks", self.hooks + 1)

        def before_update(self, step, engine):
            assert set(engine.grads) == set(engine.params)
            self.before += 1

        def after_update(self, step, engine, record):
            k = "transformer.h.0.mlp.c_fc.weight"
            delta = np.linalg.norm(np.array(engine.params[k]) - self.params[k])
            record["update_ratio"] = float(delta / np.linalg.norm(self.params[k]))

    if backend == "torch":
        pytest.importorskip("torch")
    probe = Ratio()
    real = E.build_evaluators
    monkeypatch.setattr(T, "build_evaluators", lambda *a: real(*a) + [Extra()])
    monkeypatch.setattr(T, "build_probes", lambda *a: [probe])
    train(tiny_config(tmp_path, token_cache, total_batch_size=2 * 4 * 16, backend=backend))
    log = _log(tmp_path)
    assert [r["extra"] for r in log if "extra" in r] == [3.0, 7.0]
    assert [r["step"] for r in log if "val_loss" in r] == [3, 7]
    assert all(0 < r["update_ratio"] < 1 for r in log)
    assert probe.before == 8 and probe.hooks == 16  # 2 micro-steps a step
    assert drawn and drawn[-1] == 8  # the panel was drawn, with every record


BAD_COMMAND_LINES = {
    "batch-size 0": ["--batch-size", "0"],
    "block-size 0": ["--block-size", "0"],
    "negative lr": ["--lr", "-1e-3"],
    "nan min-lr": ["--min-lr", "nan"],
    "negative grad-clip": ["--grad-clip", "-1"],
    "negative warmup": ["--warmup-steps", "-5"],
    "total-batch-size 0": ["--total-batch-size", "0"],
    "eval-batches -3": ["--eval-batches", "-3"],
    "stop-after 0": ["--stop-after", "0"],
    "max-steps x": ["--max-steps", "x"],
    "negative seed": ["--seed", "-1"],
    "resume and overwrite": ["--resume", "--overwrite"],
    "device tpu": ["--device", "tpu"],
    "binary data": ["--data", "{binary}"],
    "not a multiple": ["--batch-size", "2", "--block-size", "8", "--total-batch-size", "20"],
}


@pytest.mark.parametrize("argv", list(BAD_COMMAND_LINES.values()), ids=list(BAD_COMMAND_LINES))
def test_bad_command_line_is_one_error_line(tmp_path, argv):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 8)  # not UTF-8
    argv = [a.replace("{binary}", str(binary)) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GPT2NP_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "gpt2np", "train", "--out-dir", str(tmp_path / "o"),
                           "--cache-dir", str(tmp_path / "cache"), "--no-progress", *argv],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:"), proc.stderr
    assert not (tmp_path / "o" / "ckpt.safetensors").exists()


def test_gpt2np_train_command(tmp_path):
    # the console script's dispatcher reaches the same parser
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "gpt2np", "train", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: gpt2np train" in proc.stdout


# ------------------------------------------------------------------ training edges


def _strict_log(out):
    """log.jsonl read by a strict JSON reader (bare NaN / Infinity are errors)."""
    def no_constants(name):
        raise ValueError(f"bare {name} in log.jsonl")

    return [json.loads(line, parse_constant=no_constants)
            for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
@pytest.mark.parametrize("when", ["eval", "save"])
def test_divergence_never_leaves_a_broken_checkpoint(tmp_path, token_cache, capsys, when):
    # a good checkpoint at step 4, then lr 1e30 blows the params up at step 4's
    # update. Whether the next thing is an eval (val loss NaN) or a plain save, nothing is
    # written: the checkpoint stays step 4's, and it resumes with a sane lr without a NaN.
    assert train(tiny_config(tmp_path, token_cache, stop_after=4)).status == "stopped"
    kw = dict(eval_interval=1) if when == "eval" else dict(save_interval=1, eval_interval=100)
    res = train(tiny_config(tmp_path, token_cache, resume=True, lr=1e30, **kw))
    assert res.status == "diverged" and res.step == 4
    err = capsys.readouterr().err
    assert "non-finite val loss" in err and "(step 4) is kept" in err
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == 4
    log = _strict_log(tmp_path)  # the diverged step's NaN is logged as null, flagged
    if when == "eval":
        assert log[-1]["val_loss"] is None and log[-1]["non_finite"] == ["val_loss"]
    res = train(tiny_config(tmp_path, token_cache, resume=True))
    assert res.status == "done" and res.step == 8
    log = _strict_log(tmp_path)
    assert [r["step"] for r in log] == list(range(8)) and "non_finite" not in str(log)
    assert all(np.isfinite(r["train_loss"]) for r in log)
    if when == "eval":  # on the command line: step 0's update diverges, nothing saved
        assert main(as_flags(tiny_config(tmp_path / "fresh", token_cache, lr=1e30, eval_interval=1))) == 1
        assert "no checkpoint was written yet" in capsys.readouterr().err
        assert not (tmp_path / "fresh" / "ckpt.safetensors").exists()


def test_total_batch_size_zero_is_refused(tmp_path, token_cache):
    # 0 is a multiple of everything; it would train on nothing
    with pytest.raises(TrainError, match="--total-batch-size must be positive"):
        train(tiny_config(tmp_path, token_cache, total_batch_size=0))
    assert not (tmp_path / "ckpt.safetensors").exists()


def test_shards_run_resumes_with_only_resume(tmp_path):
    # the shard folder is in the checkpoint; a moved folder is named as --data-shards
    from gpt2np.data.prepare import prepare

    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "of", "night", "and", "day", "my", "lord"]
    prepare([], str(tmp_path / "shards"), shard_size=300, val_shard_size=100, workers=1,
            progress=False, documents=[" ".join(rng.choice(words, 40)) for _ in range(40)])
    kw = dict(data=None, data_shards=str(tmp_path / "shards"), cache_dir=None, max_steps=6,
              block_size=8, batch_size=2, eval_interval=3)
    whole = train(tiny_config(tmp_path / "whole", None, **kw))
    assert train(tiny_config(tmp_path / "part", None, stop_after=2, **kw)).status == "stopped"
    rest = train(TrainConfig(out_dir=str(tmp_path / "part"), resume=True, num_samples=0,
                             progress=False))  # as the stop message says: no data flags
    assert rest.status == "done" and rest.records[-1]["val_loss"] == whole.val_loss
    (tmp_path / "shards").rename(tmp_path / "moved")
    with pytest.raises(TrainError, match=f"--data-shards {tmp_path / 'shards'}"):
        train(TrainConfig(out_dir=str(tmp_path / "part"), resume=True, max_steps=7,
                          num_samples=0, progress=False))
    rest = train(TrainConfig(out_dir=str(tmp_path / "part"), resume=True, max_steps=7,
                             data_shards=str(tmp_path / "moved"), num_samples=0, progress=False))
    assert rest.status == "done" and rest.step == 7


def test_init_from_with_disagreeing_shape_flags(tmp_path, token_cache):
    # --init-from fixes the shape; flags that say otherwise are an error, not ignored
    from gpt2np import GPT, GPTConfig, save_pretrained

    save_pretrained(GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16), seed=7),
                    tmp_path / "pre")
    with pytest.raises(TrainError, match="--n-layer 8 .the weights have 1.*--n-embd 256"):
        train(tiny_config(tmp_path / "run", token_cache, init_from=str(tmp_path / "pre"), n_layer=8,
                   n_head=2, n_embd=256))


def test_torch_on_cuda_without_cuda(tmp_path, token_cache):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA works here")
    with pytest.raises(TrainError, match="--device cuda: this torch sees no CUDA GPU"):
        train(tiny_config(tmp_path, token_cache, backend="torch", device="cuda"))


def test_unwritable_out_dir(tmp_path, token_cache):
    (tmp_path / "file").write_text("x")  # a file where a folder should be (root can't write it either)
    with pytest.raises(TrainError, match="--out-dir .*cannot write there"):
        train(tiny_config(tmp_path / "file" / "run", token_cache))


def test_disk_full_during_a_save(tmp_path, token_cache, monkeypatch, capsys):
    # ENOSPC while writing a checkpoint: one error line, the previous one intact
    import errno

    from gpt2np.train import outputs as run_outputs

    real, calls = run_outputs.save_checkpoint, []

    def full_on_second(path, ckpt):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, ckpt)

    monkeypatch.setattr(run_outputs, "save_checkpoint", full_on_second)
    assert main(as_flags(tiny_config(tmp_path, token_cache, save_interval=4))) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot write the checkpoint") and "No space left" in last
    assert "step 4 is intact" in last and "--resume" in last
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == 4


# ------------------------------------------------------------------ the settings, declared once

# state["run"] of every checkpoint: a plain dict with these keys (old checkpoints resume)
RUN_KEYS = ["backend", "dtype", "precision", "n_layer", "n_head", "n_embd", "block_size",
            "vocab_size", "batch_size", "total_batch_size", "max_steps", "lr", "min_lr",
            "warmup_steps", "weight_decay", "grad_clip", "eval_interval", "eval_batches",
            "random_batches", "seed", "init_from", "data_shards"]


def test_everything_about_a_setting_comes_from_its_declaration():
    from dataclasses import fields

    from gpt2np.train import settings as S

    names = [s.name for s in S.SETTINGS]
    assert len(set(names)) == len(names)
    assert [f.name for f in fields(TrainConfig)] == names + ["rank", "world_size"]
    stored = [s.name for s in S.SETTINGS if s.stored]
    assert [f.name for f in fields(S.RunSettings)] == stored and sorted(stored) == sorted(RUN_KEYS)
    assert S.DEFAULTS == {s.name: s.default for s in S.SETTINGS if s.stored}
    assert set(S.MUST_MATCH) == {"dtype", "n_layer", "n_head", "n_embd", "block_size",
                                 "vocab_size", "batch_size", "total_batch_size",
                                 "random_batches", "seed", "init_from"}
    for s in S.SETTINGS:  # a declared default passes its own checks
        if s.default is not None:
            s.check(s.default)
        assert getattr(TrainConfig(), s.name) == (None if s.stored else s.default)
    run = resolve(TrainConfig(), None)
    assert sorted(run.to_dict()) == sorted(RUN_KEYS) and run["lr"] == S.DEFAULTS["lr"]


def test_help_lists_every_flag_with_its_default(capsys):
    from gpt2np.train.settings import SETTINGS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    flat = "".join(text.split())  # (argparse wraps lines, also at hyphens)
    for s in SETTINGS:
        if s.type is bool:  # a switch: off unless given
            assert (s.flag if not s.default else "--no-" + s.flag[2:]) in text.split()
        else:
            assert s.flag in text.split()
            shown = f"(default: {s.default_text})" if s.default_text else f"(default {s.default})"
            assert "".join(shown.split()) in flat, s.name


def test_parsed_flags_are_the_config():
    from gpt2np.commands.train import config_from_args

    assert config_from_args(build_parser().parse_args([])) == TrainConfig()
    cfg = config_from_args(build_parser().parse_args(
        ["--lr", "0.5", "--random-batches", "--no-progress", "--device", "cuda:1"]))
    assert cfg == TrainConfig(lr=0.5, random_batches=True, progress=False, device="cuda:1")
    # a recipe's defaults: this invocation's settings take them, stored ones stay unset
    args = build_parser({"lr": 0.1, "out_dir": "elsewhere"}).parse_args([])
    assert args.lr is None and args.out_dir == "elsewhere"
    with pytest.raises(ValueError, match="no such training settings: lrate"):
        build_parser({"lrate": 0.1})


@pytest.mark.parametrize("name,value,message", [
    ("batch_size", 0, "--batch-size must be positive, got 0"),
    ("lr", float("nan"), "--lr must be a finite number, got nan"),
    ("seed", -1, "--seed must be >= 0, got -1"),
    ("n_layer", "4", "--n-layer must be an integer, got '4'"),
    ("n_layer", True, "--n-layer must be an integer, got True"),
    ("backend", "jax", "--backend must be numpy, cupy or torch, got 'jax'"),
    ("dist_backend", "mpi", "--dist-backend must be gloo or nccl, got 'mpi'"),
    ("device", "cuda:x", "--device must be cpu, cuda or cuda:N, got 'cuda:x'"),
    ("random_batches", 1, "--random-batches must be True or False, got 1"),
    ("stop_after", 0, "--stop-after must be positive, got 0"),
    ("num_samples", -1, "--num-samples must be >= 0, got -1"),
])
def test_a_bad_value_is_refused_by_its_flag(name, value, message):
    from gpt2np.train.settings import check_config

    with pytest.raises(TrainError, match="^" + message.replace("(", r"\(")):
        check_config(TrainConfig(**{name: value}))


def test_a_checkpoint_of_fewer_settings_resumes_with_the_defaults():
    # an older run dict without precision, vocab_size and data_shards: their defaults
    old = dict(resolve(TrainConfig(lr=0.5, seed=3), None).to_dict())
    for key in ("precision", "vocab_size", "data_shards"):
        del old[key]
    run = resolve(TrainConfig(), old)
    assert (run.lr, run.seed, run.precision, run.vocab_size) == (0.5, 3, "fp32", 50257)


# ------------------------------------------------------------------ what evaluators use


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_engine_logits_loss_and_sampling(kind):
    from gpt2np import GPT, GPTConfig
    from gpt2np.generate import sample_next
    from gpt2np.train.engines import TorchEngine
    from gpt2np.train.outputs import sample_texts

    cfg = GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, dtype="float64", seed=3)
    if kind == "torch":
        pytest.importorskip("torch")
        engine = TorchEngine(cfg, model.state_dict(), "float64", 1e-3, 0.1)
    else:
        engine = ArrayEngine(model, 1e-3, 0.1)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50257, (2, 8)), rng.integers(0, 50257, (2, 8))
    logits, loss = model.forward(x, y)
    got = engine.logits(x)
    host = got.cpu().numpy() if kind == "torch" else got
    assert engine.config == cfg and not engine.on_gpu and tuple(host.shape) == (2, 8, 50304)
    np.testing.assert_allclose(host, logits, rtol=1e-12, atol=1e-14)
    assert engine.loss(x, y) == pytest.approx(float(loss), rel=1e-13)  # the model's loss
    np.testing.assert_array_equal(engine.last_logits(x), host[:, -1])
    # samples.txt: gpt2np.generate's sampler over the real tokens (no padding row)
    texts = sample_texts(engine, 8, seed=5, num=2, tokens=3, prompt="\n")
    rng, idx = np.random.default_rng(5), np.full((2, 1), 198)
    for _ in range(3):
        nxt = sample_next(engine.last_logits(idx[:, -8:])[:, :50257], 1.0, 50, rng)
        idx = np.concatenate([idx, nxt[:, None]], axis=1)
    from gpt2np.data.tokenizer import get_encoding

    assert texts == [get_encoding().decode(row.tolist()).strip() for row in idx]
