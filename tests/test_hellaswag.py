"""HellaSwag scoring (gpt2np.evals.hellaswag) against an independent torch implementation.

The reference below is build-nanogpt's hellaswag.py in outline (render_example +
F.cross_entropy(reduction="none") over the shifted, masked rows), written here again on the
torch reference model so that it shares nothing with gpt2np's padded batches, gathers and
float64 log-softmax. Items are made up by the tests (HellaSwag's format, random words).
"""
from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest

from gpt2np import GPT, GPTConfig
from gpt2np.evals import hellaswag as H
from gpt2np.data.tokenizer import get_encoding

CFG = GPTConfig(block_size=48, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)
WORDS = ("the a cat dog man woman runs jumps over quickly slowly then and ball kitchen knife "
         "cuts onion, guitar plays smiles. rope climbs wall water pours glass").split()


def make_items(n, seed=0, ctx_words=(3, 25), end_words=(1, 10)):
    rng = np.random.default_rng(seed)

    def sent(lo, hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    return [{"ctx": sent(*ctx_words), "endings": [sent(*end_words) for _ in range(4)],
             "label": int(rng.integers(4)), "ind": i, "activity_label": "made up"}
            for i in range(n)]


def write_items(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def torch_reference(params, items, config=CFG):
    """Per-ending summed and mean losses, and acc / acc_norm counts, build-nanogpt's way."""
    import torch
    import torch.nn.functional as F

    from gpt2np.backends.torch_reference import TorchGPT

    model = TorchGPT.from_params(config, params, dtype=torch.float64)
    enc = get_encoding()
    sums, means, correct, correct_norm = [], [], 0, 0
    for item in items:
        ctx = enc.encode_ordinary(item["ctx"])
        rows = [ctx + enc.encode_ordinary(" " + e) for e in item["endings"]]
        width = max(map(len, rows))
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, len(ctx):len(row)] = 1
        with torch.no_grad():
            logits, _ = model(tokens)
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                 tokens[:, 1:].reshape(-1), reduction="none").view(4, -1)
        shift_mask = mask[:, 1:]
        s = (losses * shift_mask).sum(1)
        m = s / shift_mask.sum(1)
        sums.append(s.numpy())
        means.append(m.numpy())
        correct += int(s.argmin()) == item["label"]
        correct_norm += int(m.argmin()) == item["label"]
    return np.array(sums), np.array(means), correct, correct_norm


@pytest.fixture(scope="module")
def model():
    return GPT(CFG, dtype="float64", seed=3)


def test_random_model_matches_torch_reference(model, tmp_path):
    items = make_items(12, seed=1)
    ref_sums, ref_means, ref_c, ref_cn = torch_reference(model.state_dict(), items)
    hs = H.HellaSwag(items, CFG.block_size)
    assert not any(r.cut for r in hs.rendered)  # this test is about scoring, not the cut
    sums, counts = H.ending_losses(H.logits_function(model), hs.rendered)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-6, atol=0)
    np.testing.assert_allclose(sums / counts, ref_means, rtol=1e-6, atol=0)
    # the acc counts through the public entry point, from a file; and the torch engine too
    path = write_items(tmp_path / "hs.jsonl", items)
    for m in (model, H.logits_function(model)):
        kw = {} if m is model else {"block_size": CFG.block_size}
        result = H.evaluate(m, path, progress=False, **kw)
        assert (result.n, result.correct, result.correct_norm, result.cut) == (12, ref_c, ref_cn, 0)
    import torch

    from gpt2np.backends.torch_reference import TorchGPT

    torch_model = TorchGPT.from_params(CFG, model.state_dict(), dtype=torch.float64)
    tsums, _ = H.ending_losses(H.logits_function(torch_model), hs.rendered)
    np.testing.assert_allclose(tsums, ref_sums, rtol=1e-10)
    assert H.evaluate(torch_model, path, progress=False).correct_norm == ref_cn


def test_float32_model_scores_like_its_float64_twin(model):
    items = make_items(6, seed=2)
    hs = H.HellaSwag(items, CFG.block_size)
    m32 = GPT(CFG, dtype="float32", params=model.state_dict())
    s64, _ = H.ending_losses(H.logits_function(model), hs.rendered)
    s32, _ = H.ending_losses(H.logits_function(m32), hs.rendered)
    np.testing.assert_allclose(s32, s64, rtol=1e-4)


def test_batched_equals_one_at_a_time(model):
    items = make_items(9, seed=4)
    hs = H.HellaSwag(items, CFG.block_size)
    fn = H.logits_function(model)
    calls = []

    def counting(idx):
        calls.append(idx.shape)
        return fn(idx)

    together, n_together = H.ending_losses(counting, hs.rendered, max_tokens=10 ** 6)
    assert len(calls) == 1 and calls[0][0] == 36  # 9 items x 4 endings, one padded forward
    one_by_one = np.concatenate([H.ending_losses(fn, [r], max_tokens=1)[0] for r in hs.rendered])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-12)
    calls.clear()
    middle, n_middle = H.ending_losses(counting, hs.rendered, max_tokens=4 * 30)
    assert 1 < len(calls) < 9 and all(rows * width <= 120 or rows == 4 for rows, width in calls)
    np.testing.assert_allclose(middle, together, rtol=1e-12)
    assert (n_middle == n_together).all()


def test_long_contexts_are_cut_from_the_left(model):
    enc = get_encoding()
    items = make_items(5, seed=5, ctx_words=(40, 60), end_words=(2, 8))
    block = 24
    hs = H.HellaSwag(items, block)
    small = GPT(CFG.replace(block_size=block), dtype="float64", params={
        k: (v[:block] if k == "transformer.wpe.weight" else v)
        for k, v in model.state_dict().items()})
    for item, r in zip(items, hs.rendered):
        ctx = enc.encode_ordinary(item["ctx"])
        ends = [enc.encode_ordinary(" " + e) for e in item["endings"]]
        keep = block - max(map(len, ends))
        assert r.cut and len(ctx) > keep
        for row, start, end in zip(r.rows, r.starts, ends):
            assert len(row) <= block and start == keep
            assert list(row) == ctx[-keep:] + end  # the same kept context for all 4 endings
    # the scores are those of the reference on the cut items
    cut_items = [{**item, "ctx": enc.decode(enc.encode_ordinary(item["ctx"])[-(r.starts[0]):])}
                 for item, r in zip(items, hs.rendered)]
    assert all(list(H.render(c, block).rows[0]) == list(r.rows[0])
               for c, r in zip(cut_items, hs.rendered))
    ref_sums, _, ref_c, ref_cn = torch_reference(small.state_dict(), cut_items, small.config)
    sums, _ = H.ending_losses(H.logits_function(small), hs.rendered)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-6)
    result = hs.evaluate(small, progress=False)
    assert (result.cut, result.correct, result.correct_norm) == (5, ref_c, ref_cn)
    assert "5 contexts cut" in str(result)


def test_an_ending_longer_than_the_block_still_scores_its_last_tokens():
    item = {"ctx": "a b c d", "endings": ["x " * 30, "y", "z z", "w"], "label": 0}
    r = H.render(item, 8)
    assert r.cut and all(len(row) <= 8 for row in r.rows)
    assert r.starts[0] == 1 and r.starts[1] == 1 and len(r.rows[1]) == 2  # 1 context token kept
    with pytest.raises(ValueError, match="block size >= 2"):
        H.render(item, 1)


def test_find_hellaswag_order_and_offline_error(tmp_path, monkeypatch):
    items = make_items(3)
    given = write_items(tmp_path / "given.jsonl", items)
    assert H.find_hellaswag(given) == given
    folder = tmp_path / "folder"
    folder.mkdir()
    write_items(folder / H.VAL_FILE, items)
    assert H.find_hellaswag(folder) == folder / H.VAL_FILE
    with pytest.raises(FileNotFoundError, match="no HellaSwag file"):
        H.find_hellaswag(tmp_path / "missing.jsonl")

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(H.urllib.request, "urlopen", offline)
    cache = tmp_path / "cache"
    cached = cache / "hellaswag" / H.VAL_FILE  # in gpt2np's one cache folder
    with pytest.raises(FileNotFoundError) as e:
        H.find_hellaswag(cache=cache)
    msg = str(e.value)
    assert "--data" in msg and str(cached) in msg and "no network" in msg
    # the cache is used once present: given, or gpt2np's ($GPT2NP_CACHE)
    cached.parent.mkdir(parents=True)
    write_items(cached, items)
    assert H.load_items(cache=cache) == [{k: i[k] for k in ("ctx", "endings", "label")}
                                         for i in items]
    monkeypatch.setenv("GPT2NP_CACHE", str(cache))
    assert H.find_hellaswag() == cached


def test_download_is_checked_and_written_atomically(tmp_path, monkeypatch):
    class Response:
        def __init__(self, data):
            self.data = data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return self.data

    lines = [json.dumps({"ctx": "c", "endings": ["a", "b", "c", "d"], "label": i % 4})
             for i in range(H.VAL_ITEMS)]
    payload = {"data": ("\n".join(lines[:10]) + "\n").encode()}
    monkeypatch.setattr(H.urllib.request, "urlopen", lambda url, timeout: Response(payload["data"]))
    with pytest.raises(FileNotFoundError, match=f"holds 10 items, expected {H.VAL_ITEMS}"):
        H.find_hellaswag(cache=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    payload["data"] = ("\n".join(lines) + "\n").encode()
    folder = tmp_path / "hellaswag"
    assert H.find_hellaswag(cache=tmp_path) == folder / H.VAL_FILE
    assert sorted(p.name for p in folder.iterdir()) == [H.VAL_FILE]
    assert len(H.load_items(folder / H.VAL_FILE)) == H.VAL_ITEMS


@pytest.mark.parametrize("line, what", [
    ('{"ctx": "c", "endings": ["a", "b", "c"], "label": 0}', "4 strings"),
    ('{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 4}', "int in"),
    ('{"ctx": "c", "endings": ["a", "b", "c", "d"]}', "'label'"),
    ('not json', "JSON object"),
])
def test_bad_items_are_named(tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=what) as e:
        H.load_items(path)
    assert f"{path}:2" in str(e.value)


def test_a_model_without_gpt2_vocab_is_refused(tmp_path):
    tiny = GPT(CFG.replace(vocab_size=64), seed=0)
    path = write_items(tmp_path / "hs.jsonl", make_items(2))
    with pytest.raises(ValueError, match="50257"):
        H.evaluate(tiny, path, progress=False)
    with pytest.raises(ValueError, match="50257"):  # in training: before the first step
        H.HellaSwagEvaluator(path, CFG.block_size, vocab_size=64)


class LogitsOnlyEngine:
    """A training engine as the evaluator may see it: logits(idx) and the array backend that
    reads them (None: host numpy), no continuation_losses (as TorchEngine), nothing else."""

    backend = None
    continuation_losses = None

    def __init__(self, model):
        self.logits = lambda idx: np.asarray(model.forward(idx)[0])

    def __getattr__(self, name):
        raise AssertionError(f"the evaluator read engine.{name}")


def test_training_evaluator_scores_through_the_engines_logits(model, tmp_path):
    items = make_items(7, seed=8)
    path = write_items(tmp_path / "hs.jsonl", items)
    evaluator = H.HellaSwagEvaluator(path, CFG.block_size, vocab_size=CFG.vocab_size)
    got = evaluator.evaluate(0, LogitsOnlyEngine(model))
    _, _, ref_c, ref_cn = torch_reference(model.state_dict(), items)
    assert got == {"hellaswag_acc": ref_c / 7, "hellaswag_acc_norm": ref_cn / 7}


def test_training_evaluator_scores_packed_items_through_the_engines_continuation_losses(
        model, tmp_path):
    """An array engine's continuation_losses (each item one packed row): the evaluator
    sends every item there, in forwards of FORWARD_TOKENS, and gets the reference's counts."""
    from gpt2np.evals.shared_prefix import continuation_losses

    items = make_items(7, seed=9)
    path = write_items(tmp_path / "hs.jsonl", items)
    evaluator = H.HellaSwagEvaluator(path, CFG.block_size, vocab_size=CFG.vocab_size)
    engine = LogitsOnlyEngine(model)
    packed = []

    def counting(prefixes, endings):
        packed.extend(prefixes)
        return continuation_losses(model, prefixes, endings)

    engine.continuation_losses = counting
    got = evaluator.evaluate(0, engine)
    _, _, ref_c, ref_cn = torch_reference(model.state_dict(), items)
    assert got == {"hellaswag_acc": ref_c / 7, "hellaswag_acc_norm": ref_cn / 7}
    assert len(packed) == 7


def test_the_array_engine_scores_packed_items_and_the_torch_engine_by_logits():
    from gpt2np.train.engines import ArrayEngine, TorchEngine

    assert TorchEngine.continuation_losses is None
    assert callable(ArrayEngine.continuation_losses)


@pytest.mark.gpu
def test_cupy_model_scores_like_numpy(model):
    """The CuPy engine (on a GPU, or the CUDA simulator with GPT2NP_SIM_GPU=1): the same
    per-ending losses as the numpy model, gathered and reduced on the device."""
    items = make_items(3, seed=6)
    hs = H.HellaSwag(items, CFG.block_size)
    gpu = GPT(CFG, backend="cupy", dtype="float32", params=model.state_dict())
    cpu = GPT(CFG, dtype="float32", params=model.state_dict())
    s_gpu, n_gpu = H.ending_losses(H.logits_function(gpu), hs.rendered, backend=gpu.backend)
    s_cpu, n_cpu = H.ending_losses(H.logits_function(cpu), hs.rendered)
    np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-4)
    assert (n_gpu == n_cpu).all()
    assert H.HellaSwag(items, CFG.block_size).evaluate(gpu, progress=False).n == 3
