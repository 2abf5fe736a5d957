"""No silently wrong answer from a hostile input: non-finite weights are refused at load by
name (every model source), no sampler or scorer turns NaN into a token or an accuracy,
config.json's unsupported settings are refused however it names its fields, HellaSwag items
that cannot be scored are errors, the optimizer refuses NaN settings, and saving in a
narrower dtype refuses values it would write as inf."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import gpt2np
from gpt2np import GPT, save_pretrained
from gpt2np.commands import generate as generate_cmd
from gpt2np.evals import hellaswag as H
from gpt2np.evals.loss import token_loss
from gpt2np.generate import generate, sample_next
from gpt2np.io.checkpoint import CKPT_NAME, CheckpointError, load_checkpoint
from gpt2np.io.export import export
from gpt2np.io.hf_folder import config_from_dict, hf_config, save_pretrained
from gpt2np.optim import AdamW, clip_grad_norm, cosine_lr
from hostile import TINY, cli, edit_json, model_folder, run_checkpoint, sharded_folder

BAD_VALUES = [np.nan, np.inf, -np.inf]
# the first, a middle and the last tensor of the checkpoint's order
NAMES = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.bias", "transformer.ln_f.bias"]


def _poison(a: np.ndarray, value) -> np.ndarray:
    a = a.copy()
    a.reshape(-1)[a.size // 2] = value
    return a


# ------------------------------------------------------------------------------ weights


def _folder_with(tmp_path, name, value, dtype="float32"):
    folder = model_folder(tmp_path / "m")
    sd = load_file(str(folder / "model.safetensors"))
    sd[name] = _poison(sd[name], value)
    save_file({k: v.astype(dtype) for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def _sharded_with(tmp_path, name, value):
    folder = sharded_folder(tmp_path / "m")
    for shard in folder.glob("*.safetensors"):
        sd = load_file(str(shard))
        if name in sd:
            sd[name] = _poison(sd[name], value)
            save_file(sd, str(shard))
    return folder


def _run_with(tmp_path, name, value):
    params = GPT(TINY).state_dict()
    params[name] = _poison(params[name], value)
    run_checkpoint(tmp_path / "run" / CKPT_NAME, params=params)  # its SHA-256 is valid
    return tmp_path / "run"


SOURCES = {"folder": _folder_with, "float16 folder": lambda t, n, v: _folder_with(t, n, v, "float16"),
           "sharded folder": _sharded_with, "training run": _run_with}


@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES)
def test_non_finite_weights_are_refused_by_name(tmp_path, source, name, value):
    src = source(tmp_path, name, value)
    with pytest.raises((ValueError, CheckpointError), match="non-finite") as e:
        gpt2np.from_pretrained(src)
    assert repr(name) in str(e.value)


def test_non_finite_moments_are_refused_by_name(tmp_path):
    from gpt2np.io.checkpoint import Checkpoint, save_checkpoint

    params = GPT(TINY).state_dict()
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = dict(m, **{NAMES[1]: _poison(m[NAMES[1]], np.inf)})
    path = tmp_path / CKPT_NAME
    save_checkpoint(path, Checkpoint(params, m, v, 1, {"model_config": TINY.to_dict()}))
    with pytest.raises(CheckpointError, match=f"'optimizer.v.{NAMES[1]}' holds 1 non-finite"):
        load_checkpoint(path)


def test_generate_names_the_tensor_instead_of_printing_token_0(tmp_path, capsys):
    """The reported case: NaN weights made `generate` print "ROMEO:!!!!!!!!"."""
    folder = _folder_with(tmp_path, NAMES[1], np.nan)
    code, last, out = cli(generate_cmd.main, ["--model", folder, "--prompt", "ROMEO:",
                                              "--max-new-tokens", "8"], capsys)
    assert code == 1 and last.startswith("error:") and NAMES[1] in last
    assert "ROMEO" not in out


def test_resuming_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    from gpt2np.train.loop import train
    from tiny_run import train_tiny, tiny_config

    run = train_tiny(tmp_path / "run", tmp_path / "cache", max_steps=2, eval_interval=2)
    ckpt = load_checkpoint(run / CKPT_NAME)
    from gpt2np.io.checkpoint import save_checkpoint

    ckpt.params[NAMES[0]] = _poison(ckpt.params[NAMES[0]], np.nan)
    save_checkpoint(run / CKPT_NAME, ckpt)
    with pytest.raises(CheckpointError, match=NAMES[0]):
        train(tiny_config(run, tmp_path / "cache", max_steps=4, resume=True))


# ------------------------------------------------------------------------------ samplers, scorers


@pytest.mark.parametrize("value", BAD_VALUES, ids=str)
@pytest.mark.parametrize("temperature, top_k", [(0, None), (1.0, None), (0.7, 5), (1e-9, 1)])
def test_samplers_refuse_non_finite_logits(value, temperature, top_k):
    logits = np.random.default_rng(0).normal(size=(3, 50))
    logits[1, 7] = value
    with pytest.raises(FloatingPointError, match="row 1"):
        sample_next(logits, temperature, top_k, np.random.default_rng(0))


def _nan_model():
    params = GPT(TINY).state_dict()
    params[NAMES[1]] = _poison(params[NAMES[1]], np.nan)
    return GPT(TINY, params=params)  # (built directly: no loader checked it)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_from_nan_weights_raises(use_cache):
    with pytest.raises(FloatingPointError):
        generate(_nan_model(), np.array([[1, 2, 3]]), 4, temperature=0, use_cache=use_cache)


def _items(n=4):
    return [{"ctx": "A man walks into the kitchen and", "label": i % 4,
             "endings": ["cuts an onion.", "plays the guitar.", "jumps over the dog.",
                         "pours water."]} for i in range(n)]


def test_hellaswag_refuses_to_score_nan_logits(tmp_path):
    """The reported case: NaN weights scored acc 0.25, the share of label-0 items."""
    hs = H.HellaSwag(_items(), TINY.block_size)
    with pytest.raises(FloatingPointError, match="not finite"):
        hs.evaluate(_nan_model(), progress=False)
    with pytest.raises(FloatingPointError):
        token_loss(_nan_model(), np.arange(40) % 100, progress=False)


def test_the_training_evaluator_logs_nan_not_an_accuracy(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in _items()))
    evaluator = H.HellaSwagEvaluator(path, TINY.block_size)
    model = _nan_model()

    class Engine:  # what the evaluator reads of a training engine
        backend = model.backend
        continuation_losses = None

        @staticmethod
        def logits(idx):
            return model.forward(idx)[0]

    fields = evaluator.evaluate(0, Engine())
    assert all(math.isnan(v) for v in fields.values()), fields


# ------------------------------------------------------------------------------ config.json

UNSUPPORTED = [("model_type", "bert"), ("activation_function", "relu"),
               ("layer_norm_epsilon", 0.1), ("layer_norm_epsilon", float("nan")),
               ("tie_word_embeddings", False), ("n_inner", 999), ("n_inner", "64"),
               ("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
               ("add_cross_attention", True), ("activation_function", ["gelu_new"]),
               ("model_type", {"gpt2": 1}), ("tie_word_embeddings", "true")]


@pytest.mark.parametrize("own_names", [False, True], ids=["HF names", "GPTConfig names"])
@pytest.mark.parametrize("key, value", UNSUPPORTED, ids=lambda v: repr(v)[:20])
def test_unsupported_settings_are_refused_whatever_the_naming(tmp_path, own_names, key, value):
    """A config.json with a block_size key skipped every one of these checks."""
    folder = model_folder(tmp_path / "m")
    if own_names:
        (folder / "config.json").write_text(json.dumps(TINY.to_dict()))
    edit_json(folder / "config.json", **{key: value})
    with pytest.raises(ValueError, match=f"config.json: {key}=") as e:
        gpt2np.from_pretrained(folder)
    assert "is not supported" in str(e.value)


def test_gptconfig_names_load_and_must_agree_with_hf_names():
    assert config_from_dict(TINY.to_dict()) == TINY
    assert config_from_dict(hf_config(TINY)) == TINY
    with pytest.raises(ValueError, match="block_size=8 and n_positions=16 disagree"):
        config_from_dict({**hf_config(TINY), "block_size": 8, "n_positions": 16})


# ------------------------------------------------------------------------------ HellaSwag items

GOOD = {"ctx": "A man walks in and", "endings": ["sits.", "runs.", "eats.", "sleeps."], "label": 1}
BAD_ITEMS = [
    {"ctx": "", "endings": ["a", "b", "c", "d"]},  # the reported case: one-token endings, no ctx
    {"ctx": "   "}, {"ctx": "\n"},
    {"endings": ["sits.", "", "eats.", "sleeps."]}, {"endings": ["sits.", " ", "eats.", "x"]},
    {"endings": ["a", "b", "c"]}, {"endings": ["a", "b", "c", "d", "e"]},
    {"endings": "abcd"}, {"endings": ["a", 2, "c", "d"]}, {"ctx": 3},
    {"label": 4}, {"label": -1}, {"label": True}, {"label": "1"}, {"label": 1.0},
    {"label": None},
]


@pytest.mark.parametrize("change", BAD_ITEMS, ids=lambda c: repr(c)[:30])
def test_items_that_cannot_be_scored_are_errors(tmp_path, change):
    item = {**GOOD, **change}
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(item) + "\n")
    with pytest.raises(ValueError, match="must be a non-empty string") as e:
        H.load_items(path)
    assert f"{path}:2" in str(e.value)
    with pytest.raises(ValueError, match="HellaSwag item 1"):
        H.HellaSwag([GOOD, item], 64)  # items handed in directly are checked the same


@given(st.text(min_size=1, max_size=30).filter(str.strip),
       st.lists(st.text(min_size=1, max_size=20).filter(str.strip), min_size=4, max_size=4),
       st.integers(2, 40))
def test_every_ending_of_an_accepted_item_has_a_scored_token(ctx, endings, block_size):
    item = H.check_item({"ctx": ctx, "endings": endings, "label": 0}, "test")
    rendered = H.render(item, block_size)
    assert all(len(row) - start >= 1 for row, start in zip(rendered.rows, rendered.starts))


# ------------------------------------------------------------------------------ the optimizer

BAD_NUMBERS = [float("nan"), float("inf"), -float("inf"), -1.0, True, "0.1", None, [0.1]]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize("arg", ["lr", "eps", "weight_decay"])
def test_adamw_refuses_bad_settings(arg, value):
    params = {"w": np.ones((2, 2))}
    with pytest.raises(ValueError, match=f"{arg} must be a finite number"):
        AdamW(params, **{arg: value})
    opt = AdamW(params)
    if arg == "lr" and value is not None:  # (step's lr=None: the optimizer's own)
        with pytest.raises(ValueError, match="lr must be"):
            opt.step({"w": np.ones((2, 2))}, lr=value)
        assert np.all(params["w"] == 1) and opt.t == 0  # nothing was updated


@pytest.mark.parametrize("betas", [(float("nan"), 0.9), (0.9, 1.0), (0.9,), "ab", (0.9, -0.1),
                                   (0.9, 0.95, 0.99), (True, 0.9)], ids=repr)
def test_adamw_refuses_bad_betas(betas):
    with pytest.raises(ValueError, match="betas must be two numbers"):
        AdamW({"w": np.ones(2)}, betas=betas)


@pytest.mark.parametrize("max_norm", [float("nan"), 0.0, -1.0, float("inf"), None])
def test_clipping_refuses_bad_norms(max_norm):
    with pytest.raises(ValueError, match="max_norm must be"):
        clip_grad_norm({"w": np.ones(3)}, max_norm)


@pytest.mark.parametrize("args, name", [((0, float("nan"), 0.0, 2, 10), "max_lr"),
                                         ((0, 1e-3, -1.0, 2, 10), "min_lr"),
                                         ((-1, 1e-3, 0.0, 2, 10), "step"),
                                         ((0, 1e-3, 0.0, 1.5, 10), "warmup_steps"),
                                         ((0, 1e-3, 0.0, 2, None), "max_steps")])
def test_the_lr_schedule_refuses_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        cosine_lr(*args)


# ------------------------------------------------------------------------------ narrower dtypes


def _model_with(value, dtype="float32"):
    model = GPT(TINY, dtype=dtype)
    model.params[NAMES[1]][0] = value
    return model


@pytest.mark.parametrize("value, dtype, ok", [
    (1e5, "float16", False), (-7e4, "float16", False), (65504.0, "float16", True),
    (1e5, "bfloat16", True), (3.4e38, "bfloat16", False), (1e5, "float32", True)])
def test_export_refuses_values_a_narrower_dtype_writes_as_inf(tmp_path, value, dtype, ok):
    """The reported case: export --dtype float16 wrote inf for weights past 65504."""
    src = tmp_path / "src"
    save_pretrained(_model_with(value), src)
    if ok:
        export(src, tmp_path / "out", dtype=dtype)
        return
    with pytest.raises(ValueError, match=f"cannot save as {dtype}.*'{NAMES[1]}'.*inf"):
        export(src, tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_saving_float64_weights_as_float32_refuses_overflow(tmp_path):
    with pytest.raises(ValueError, match="as float32.*use float64"):
        save_pretrained(_model_with(1e300, "float64"), tmp_path / "out", dtype="float32")


def test_loading_float64_weights_as_float32_refuses_overflow(tmp_path):
    save_pretrained(_model_with(1e300, "float64"), tmp_path / "m")
    gpt2np.from_pretrained(tmp_path / "m", dtype="float64")
    with pytest.raises(ValueError, match=f"as float32: '{NAMES[1]}' holds .* 1e.300.*use float64"):
        gpt2np.from_pretrained(tmp_path / "m", dtype="float32")
