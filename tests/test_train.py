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

from gpt2np.train import loop as T
from gpt2np.io.checkpoint import CheckpointError, load_checkpoint
from gpt2np.commands.train import build_parser, main
from gpt2np.data.shakespeare import BatchLoader, load_tokens, split
from gpt2np.train.engines import ArrayEngine
from gpt2np.train.loop import TrainConfig, TrainError, train
from testdata import shakespeare_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    if not shakespeare_path().is_file():
        pytest.skip(f"tiny Shakespeare not at {shakespeare_path()} (set GPT2NP_DATA)")
    return tmp_path_factory.mktemp("token-cache")  # tokenized once for the module


def tiny(out, cache, **kw):
    """A 1-layer, 16-dim model on 4x16 batches: a step takes a few milliseconds."""
    base = dict(data=str(shakespeare_path()), cache_dir=str(cache), out_dir=str(out),
                n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=8,
                lr=1e-2, warmup_steps=2, eval_interval=4, eval_batches=1, num_samples=0,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _cli(cfg):
    """The same run as command-line flags."""
    args = []
    for k, v in vars(cfg).items():
        flag = "--" + k.replace("_", "-")
        if v is None or k in ("rank", "world_size") or v is False:
            continue
        if k == "progress":
            args.append("--no-progress")
        elif v is True:
            args.append(flag)
        else:
            args += [flag, str(v)]
    return args


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _no_speed(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_learns_and_writes_outputs(tmp_path, token_cache):
    out = tmp_path / "run"
    res = train(tiny(out, token_cache, max_steps=30, eval_interval=10, eval_batches=2, num_samples=2,
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
    rn = train(tiny(tmp_path / "np", token_cache, backend="numpy", **kw))
    rt = train(tiny(tmp_path / "torch", token_cache, backend="torch", **kw))
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
    train(tiny(tmp_path / "whole", token_cache, backend=backend, **kw))
    part = tiny(tmp_path / "part", token_cache, backend=backend, stop_after=3, **kw)
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
    res = train(tiny(tmp_path, token_cache))
    assert res.status == "stopped" and res.step == 3
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == 3
    assert [r["step"] for r in _log(tmp_path)] == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigterm_on_the_command_line(tmp_path, token_cache):
    cfg = tiny(tmp_path, token_cache, max_steps=100_000, eval_interval=100_000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "train_shakespeare.py"),
                             *_cli(cfg)], env=env, stdout=subprocess.PIPE,
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
    res = train(tiny(tmp_path, token_cache, save_interval=4))
    assert res.status == "diverged" and res.step == 6
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 6" in err and "step 4" in err
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == 4
    assert [r["step"] for r in _log(tmp_path)] == [0, 1, 2, 3, 4, 5]
    monkeypatch.setattr(ArrayEngine, "forward_backward", real)
    # a resume from the good checkpoint drops the diverged run's later log lines
    res = train(tiny(tmp_path, token_cache, resume=True))
    assert res.status == "done" and [r["step"] for r in _log(tmp_path)] == list(range(8))
    monkeypatch.setattr(ArrayEngine, "forward_backward", lambda self, x, y, s: float("inf"))
    assert main(_cli(tiny(tmp_path / "cli", token_cache))) == 1  # the CLI exits non-zero
    assert "no checkpoint was written yet" in capsys.readouterr().err


@pytest.fixture
def finished_run(tmp_path, token_cache):
    train(tiny(tmp_path, token_cache, max_steps=3))
    return tmp_path


def test_truncated_checkpoint_is_a_clear_error(finished_run, token_cache, capsys):
    path = finished_run / "ckpt.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny(finished_run, token_cache, resume=True))
    assert main(_cli(tiny(finished_run, token_cache, resume=True))) == 2
    assert "corrupt" in capsys.readouterr().err


def test_flipped_byte_in_checkpoint_is_caught(finished_run, token_cache):
    path = finished_run / "ckpt.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x40  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(tiny(finished_run, token_cache, resume=True))


def test_checkpoint_of_another_model_is_refused(finished_run, token_cache):
    with pytest.raises(TrainError, match="n_embd: checkpoint 16, now 32"):
        train(tiny(finished_run, token_cache, resume=True, n_embd=32))
    with pytest.raises(TrainError, match="--resume"):  # no silent overwrite either
        train(tiny(finished_run, token_cache))
    with pytest.raises(CheckpointError, match="not a gpt2np training checkpoint"):
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(2)}, finished_run / "ckpt.safetensors")
        train(tiny(finished_run, token_cache, resume=True))


def test_resume_without_checkpoint(tmp_path, token_cache):
    with pytest.raises(TrainError, match="no checkpoint"):
        train(tiny(tmp_path, token_cache, resume=True))


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
        train(tiny(tmp_path, token_cache, backend="cupy"))


def test_every_issue_flag_parses():
    args = build_parser().parse_args(
        "--backend torch --data d --out-dir o --max-steps 7 --batch-size 2 --block-size 8 "
        "--n-layer 3 --n-head 2 --n-embd 8 --dtype float64 --lr 0.5 --min-lr 0.1 "
        "--warmup-steps 1 --weight-decay 0.2 --grad-clip 0.5 --total-batch-size 32 "
        "--eval-interval 3 --eval-batches 2 --seed 4 --resume --stop-after 2 --init-from gpt2"
        .split())
    assert (args.backend, args.max_steps, args.total_batch_size, args.min_lr, args.init_from,
            args.stop_after, args.resume, args.dtype) == ("torch", 7, 32, 0.1, "gpt2", 2, True,
                                                          "float64")
    run = T.resolve(TrainConfig(lr=3e-3), None)
    assert run["min_lr"] == pytest.approx(3e-4) and run["weight_decay"] == 0.1
    assert run["grad_clip"] == 1.0 and run["total_batch_size"] == run["batch_size"] * run["block_size"]
    with pytest.raises(TrainError, match="multiple"):
        T.resolve(TrainConfig(batch_size=4, block_size=16, total_batch_size=100), None)


def test_init_from_pretrained(tmp_path, token_cache):
    from gpt2np import GPT, GPTConfig, save_pretrained

    src = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16), seed=7)
    save_pretrained(src, tmp_path / "pre")
    res = train(tiny(tmp_path / "run", token_cache, init_from=str(tmp_path / "pre"), max_steps=1,
                     n_layer=None, n_head=None, n_embd=None))
    x, y = BatchLoader(split(load_tokens(shakespeare_path(), cache=token_cache))[0], 4, 16).next_batch()
    _, loss = src.forward(x, y)
    assert res.records[0]["train_loss"] == pytest.approx(float(loss), rel=1e-6)  # started from it


def test_padded_vocab_and_bf16_matmuls(tmp_path, token_cache):
    # GPT-2's 50257 tokens padded to 50304 rows, matmuls in (emulated) bf16: it learns, the
    # padded rows are in the checkpoint, samples decode (padding ids are never sampled)
    out = tmp_path / "run"
    res = train(tiny(out, token_cache, vocab_size=50304, precision="bf16", max_steps=12,
                     num_samples=2, sample_tokens=6))
    assert res.status == "done" and len(res.samples) == 2
    log = _log(out)
    assert log[0]["train_loss"] == pytest.approx(np.log(50304), abs=0.1)
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 1.0
    assert load_file(out / "ckpt.safetensors")["transformer.wte.weight"].shape == (50304, 16)
    with pytest.raises(TrainError, match="vocab_size: checkpoint 50304, now 50257"):
        train(tiny(out, token_cache, resume=True, vocab_size=50257))


def test_bad_vocab_size_and_precision(tmp_path, token_cache):
    with pytest.raises(TrainError, match="smaller than GPT-2's 50257"):
        train(tiny(tmp_path / "a", token_cache, vocab_size=1000))
    with pytest.raises(TrainError, match="needs --dtype float32"):
        train(tiny(tmp_path / "b", token_cache, dtype="float64", precision="bf16"))
    with pytest.raises(TrainError, match="numpy and cupy engines"):
        train(tiny(tmp_path / "c", token_cache, backend="torch", precision="bf16"))


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
    train(tiny(tmp_path, token_cache, total_batch_size=2 * 4 * 16, backend=backend))
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


# ------------------------------------------------------------------ issue 19: training edges


def _strict_log(out):
    """log.jsonl read by a strict JSON reader (bare NaN / Infinity are errors)."""
    def no_constants(name):
        raise ValueError(f"bare {name} in log.jsonl")

    return [json.loads(line, parse_constant=no_constants)
            for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
@pytest.mark.parametrize("when", ["eval", "save"])
def test_divergence_never_leaves_a_broken_checkpoint(tmp_path, token_cache, capsys, when):
    # item 1: a good checkpoint at step 4, then lr 1e30 blows the params up at step 4's
    # update. Whether the next thing is an eval (val loss NaN) or a plain save, nothing is
    # written: the checkpoint stays step 4's, and it resumes with a sane lr without a NaN.
    assert train(tiny(tmp_path, token_cache, stop_after=4)).status == "stopped"
    kw = dict(eval_interval=1) if when == "eval" else dict(save_interval=1, eval_interval=100)
    res = train(tiny(tmp_path, token_cache, resume=True, lr=1e30, **kw))
    assert res.status == "diverged" and res.step == 4
    err = capsys.readouterr().err
    assert "non-finite val loss" in err and "(step 4) is kept" in err
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == 4
    log = _strict_log(tmp_path)  # the diverged step's NaN is logged as null, flagged
    if when == "eval":
        assert log[-1]["val_loss"] is None and log[-1]["non_finite"] == ["val_loss"]
    res = train(tiny(tmp_path, token_cache, resume=True))
    assert res.status == "done" and res.step == 8
    log = _strict_log(tmp_path)
    assert [r["step"] for r in log] == list(range(8)) and "non_finite" not in str(log)
    assert all(np.isfinite(r["train_loss"]) for r in log)
    if when == "eval":  # the issue's command line: step 0's update diverges, nothing saved
        assert main(_cli(tiny(tmp_path / "fresh", token_cache, lr=1e30, eval_interval=1))) == 1
        assert "no checkpoint was written yet" in capsys.readouterr().err
        assert not (tmp_path / "fresh" / "ckpt.safetensors").exists()


def test_total_batch_size_zero_is_refused(tmp_path, token_cache):
    # item 5: 0 is a multiple of everything; it would train on nothing
    with pytest.raises(TrainError, match="--total-batch-size must be positive"):
        train(tiny(tmp_path, token_cache, total_batch_size=0))
    assert not (tmp_path / "ckpt.safetensors").exists()


def test_shards_run_resumes_with_only_resume(tmp_path):
    # item 6: the shard folder is in the checkpoint; a moved folder is named as --data-shards
    from gpt2np.data.prepare import prepare

    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "of", "night", "and", "day", "my", "lord"]
    prepare([], str(tmp_path / "shards"), shard_size=300, val_shard_size=100, workers=1,
            progress=False, documents=[" ".join(rng.choice(words, 40)) for _ in range(40)])
    kw = dict(data=None, data_shards=str(tmp_path / "shards"), cache_dir=None, max_steps=6,
              block_size=8, batch_size=2, eval_interval=3)
    whole = train(tiny(tmp_path / "whole", None, **kw))
    assert train(tiny(tmp_path / "part", None, stop_after=2, **kw)).status == "stopped"
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
    # item 7: --init-from fixes the shape; flags that say otherwise are an error, not ignored
    from gpt2np import GPT, GPTConfig, save_pretrained

    save_pretrained(GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16), seed=7),
                    tmp_path / "pre")
    with pytest.raises(TrainError, match="--n-layer 8 .the weights have 1.*--n-embd 256"):
        train(tiny(tmp_path / "run", token_cache, init_from=str(tmp_path / "pre"), n_layer=8,
                   n_head=2, n_embd=256))


def test_torch_on_cuda_without_cuda(tmp_path, token_cache):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA works here")
    with pytest.raises(TrainError, match="--device cuda: this torch sees no CUDA GPU"):
        train(tiny(tmp_path, token_cache, backend="torch", device="cuda"))


def test_unwritable_out_dir(tmp_path, token_cache):
    (tmp_path / "file").write_text("x")  # a file where a folder should be (root can't write it either)
    with pytest.raises(TrainError, match="--out-dir .*cannot write there"):
        train(tiny(tmp_path / "file" / "run", token_cache))


def test_disk_full_during_a_save(tmp_path, token_cache, monkeypatch, capsys):
    # item 11: ENOSPC while writing a checkpoint: one error line, the previous one intact
    import errno

    from gpt2np.train import outputs as run_outputs

    real, calls = run_outputs.save_checkpoint, []

    def full_on_second(path, ckpt):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, ckpt)

    monkeypatch.setattr(run_outputs, "save_checkpoint", full_on_second)
    assert main(_cli(tiny(tmp_path, token_cache, save_interval=4))) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot write the checkpoint") and "No space left" in last
    assert "step 4 is intact" in last and "--resume" in last
    assert load_checkpoint(tmp_path / "ckpt.safetensors").state["step"] == 4
