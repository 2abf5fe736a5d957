"""HellaSwag (Zellers et al., 2019), scored completion-style as build-nanogpt scores it.

    result = evaluate(model)                 # the val split: 10,042 items
    print(result.acc_norm)                   # GPT-2 124M: 0.2955 (2,967 / 10,042)

An item is a context and 4 endings, one of them right (`label`). Each ending is scored as a
continuation of the context: the row is `ctx tokens + tokens of (" " + ending)`, and its loss
is the cross-entropy of the ending's tokens only (the context is given, not predicted). `acc`
counts items whose right ending has the smallest summed loss, `acc_norm` the smallest mean
loss per token (which does not favour short endings). This is not the multiple-choice format
of the paper, it is the one small base models can be scored with, and the one the
"reproduce GPT-2 (124M)" video reports.

Speed: a gpt2np.GPT runs each item as one packed row, its context once and its 4 endings
after it, each ending seeing the context and itself only (gpt2np.evals.shared_prefix: the
same losses as the rows, about half of their tokens), many items per forward of FORWARD_TOKENS,
nothing kept for a backward, the lm_head only at the scored positions. Other models score
the 4 rows of an item, and several items, in ONE padded forward without targets. Padding
is on the right, where causal attention cannot see it, and the padded positions are never
scored. Only the logits at scored positions are turned into losses (float64 log-softmax),
and the batch is sized so that the (rows, T, V) logits stay under a memory budget.

A context too long for the block size is cut from the left (the same cut for the 4 endings,
so that they still share their context), and the count of cut items is reported.

Models: anything `logits_function` accepts: a gpt2np.GPT (numpy or cupy), the torch
reference (gpt2np.backends.torch_reference.TorchGPT), or a plain function idx (B, T) int64 ->
logits (B, T, V), such as a training engine's `logits`. Under torch.distributed,
rank r scores items i % world == r and the counts are summed over ranks.

The val split is found at a given path, else in gpt2np's cache (gpt2np.files.cache_dir, in
its hellaswag/ folder), else downloaded there.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from gpt2np import files
from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.data.shakespeare import decode_text, read_text_bytes

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_FILE = "hellaswag_val.jsonl"
CACHE_FOLDER = "hellaswag"  # in gpt2np's cache
VAL_ITEMS = 10042
MAX_FILE_BYTES = 2 ** 30  # HellaSwag's splits are tens of MB: a larger file is no HellaSwag
DEFAULT_LOGITS_BUDGET = 64 * 2 ** 20  # bytes of float32 logits per CPU forward (bigger: slower)
GPU_LOGITS_BUDGET = 2 * 2 ** 30  # the same on a GPU, where bigger batches pay off
# Tokens per forward of a gpt2np.GPT, which scores without (R, T, V) logits: only its
# activations grow with the batch, and big GEMMs run faster than small ones.
FORWARD_TOKENS = 4096


# ------------------------------------------------------------------------------ the data


def find_hellaswag(path=None, *, cache=None, download: bool = True,
                   flag: str = "--data") -> Path:
    """The val split's jsonl: `path` (a file, or a folder holding hellaswag_val.jsonl), else
    the cache (`cache`: the cache folder instead of gpt2np.files.cache_dir()), else a download
    into the cache. Raises FileNotFoundError naming all three (`flag`: the caller's flag for
    the path)."""
    if path is not None:
        p = Path(os.path.expanduser(str(path)))
        if p.is_dir():
            p = p / VAL_FILE
        if not p.is_file():
            raise FileNotFoundError(f"no HellaSwag file at {str(p)!r} (expected the val split, "
                                    f"{VAL_FILE}, as in {VAL_URL})")
        return p
    target = files.cache_dir(cache) / CACHE_FOLDER / VAL_FILE
    if target.is_file():
        return target
    why = "downloading is off"
    if download:
        try:
            return _download(target)
        except (urllib.error.URLError, OSError, ValueError) as e:
            why = f"downloading {VAL_URL} failed ({type(e).__name__}: {e})"
    raise FileNotFoundError(
        f"HellaSwag's val split is not available: no data path was given, {str(target)!r} does "
        f"not exist, and {why}. Either pass the file ({flag} PATH/{VAL_FILE}), or put it at "
        f"{str(target)!r}, or run once with network access to download it")


def _download(target: Path) -> Path:
    """Fetch the val split, check it, and write it atomically (tmp file + rename)."""
    print(f"downloading HellaSwag's val split from {VAL_URL} to {target}", file=sys.stderr)
    with urllib.request.urlopen(VAL_URL, timeout=60) as response:
        data = response.read()
    items = parse_items(data.decode("utf-8").split("\n"), where=VAL_URL)
    if len(items) != VAL_ITEMS:
        raise ValueError(f"{VAL_URL} holds {len(items)} items, expected {VAL_ITEMS}")
    target.parent.mkdir(parents=True, exist_ok=True)
    return files.write_bytes(target, data)


def parse_items(lines: Iterable[str], where: str = "hellaswag") -> list[dict]:
    """HellaSwag jsonl lines -> [{"ctx": str, "endings": [4 str], "label": int}], checked."""
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            item = {"ctx": d["ctx"], "endings": d["endings"], "label": d["label"]}
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"{where}:{lineno}: expected a JSON object with 'ctx', 'endings' "
                             f"and 'label' ({type(e).__name__}: {e})") from None
        items.append(check_item(item, f"{where}:{lineno}"))
    return items


def check_item(item: dict, where: str) -> dict:
    """The item if it can be scored, else a ValueError naming `where`. Every ending is scored
    as a continuation of the context: an empty context would leave an ending's first token
    unpredicted (a one-token ending then scores 0 tokens, loss 0, always the best), an
    empty ending would score a lone space."""
    ctx, endings, label = (item.get(k) if isinstance(item, dict) else None
                           for k in ("ctx", "endings", "label"))
    ok = (isinstance(ctx, str) and ctx.strip() != "" and isinstance(endings, list)
          and len(endings) == 4 and all(isinstance(e, str) and e.strip() for e in endings)
          and isinstance(label, int) and not isinstance(label, bool) and 0 <= label < 4)
    if not ok:
        raise ValueError(f"{where}: 'ctx' must be a non-empty string, 'endings' 4 strings "
                         f"(none empty) and 'label' an int in [0, 4), got {ctx!r:.40}, "
                         f"{endings!r:.80}, {label!r}")
    return item


def load_items(path=None, limit: int | None = None, **find) -> list[dict]:
    """The first `limit` items (all without it) of the split `find_hellaswag` finds."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (every item) or an int >= 1, got {limit!r}")
    p = find_hellaswag(path, **find)
    raw = read_text_bytes(p, max_bytes=MAX_FILE_BYTES)
    items = parse_items(decode_text(raw, p).split("\n"), where=str(p))
    if not items:
        raise ValueError(f"{p} holds no HellaSwag items")
    return items if limit is None else items[:limit]


# ------------------------------------------------------------------------------ tokens


@dataclass
class Rendered:
    """One item as token rows: rows[i] = (cut) ctx + ending i; the ending starts at starts[i]."""

    rows: list  # 4 int64 arrays
    starts: list  # 4 ints
    label: int
    cut: bool


def render(item: dict, block_size: int, enc=None) -> Rendered:
    """Tokenize an item for a model of this block size, cutting the context from the left.

    The context keeps its last `block_size - longest ending` tokens (at least 1), shared by
    the 4 rows; an ending that alone fills the block (tiny block sizes) is cut from the left
    too, losing its first tokens from the score. Either way the item counts as cut.
    """
    if block_size < 2:
        raise ValueError(f"HellaSwag needs a block size >= 2 (a context token and an ending "
                         f"token), got {block_size}")
    if enc is None:
        from gpt2np.data.tokenizer import get_encoding

        enc = get_encoding()
    ctx = enc.encode_ordinary(item["ctx"])
    ends = [enc.encode_ordinary(" " + e) for e in item["endings"]]
    keep = max(1, block_size - max(len(e) for e in ends))
    cut = len(ctx) > keep
    ctx = ctx[-keep:] if cut else ctx
    rows, starts = [], []
    for end in ends:
        row = (ctx + end)[-block_size:]
        cut = cut or len(ctx) + len(end) > block_size
        rows.append(np.asarray(row, dtype=np.int64))
        starts.append(max(1, len(row) - len(end)))  # row[0] has no prediction: never scored
        if starts[-1] >= len(row):  # (check_item's items always have a scored token)
            raise ValueError(f"HellaSwag item {item['ctx']!r:.40}: an ending has no token to "
                             f"score (an empty context or ending)")
    return Rendered(rows, starts, item["label"], cut)


# ------------------------------------------------------------------------------ the model


def logits_function(model) -> Callable:
    """A function idx (B, T) int64 numpy -> logits (B, T, V) for the model: a gpt2np.GPT
    (its backend's arrays: score them with backend=model.backend), a torch module returning
    (logits, loss) (TorchGPT; torch tensors), or a callable that already is one."""
    from gpt2np.model import GPT

    if isinstance(model, GPT):
        return lambda idx: model.forward(idx)[0]  # no targets: no cache, a fresh array
    if type(model).__module__.startswith(("torch", "gpt2np.backends.torch_reference")) or \
            hasattr(model, "named_parameters"):
        import torch

        device = next(model.parameters()).device

        def torch_logits(idx):
            with torch.no_grad():
                return model(torch.as_tensor(idx, device=device))[0]

        return torch_logits
    if callable(model):
        return model
    raise TypeError(f"cannot score a {type(model).__name__}: pass a gpt2np.GPT, a TorchGPT, or "
                    f"a function idx (B, T) -> logits (B, T, V)")


def losses_function(model) -> Callable | None:
    """For a gpt2np.GPT, score(idx, rows, cols, targets) -> the float64 losses (N,) of the
    targets at (rows, cols) of idx (R, T), by the model's token_losses: one forward with
    nothing kept and the lm_head only at those positions, no (R, T, V) logits. None for any
    other model (then its logits are scored by token_losses)."""
    from gpt2np.model import GPT

    if not isinstance(model, GPT):
        return None

    def score(idx, rows, cols, targets):
        t = np.full(idx.shape, -1, dtype=np.int64)
        t[rows, cols] = targets
        return _finite(np.asarray(model.token_losses(idx, t)[rows, cols], dtype=np.float64))

    return score


def shared_function(model) -> Callable | None:
    """For a gpt2np.GPT, gpt2np.evals.shared_prefix.continuation_losses bound to it: the
    context of an item runs once for its 4 endings. None for any other model."""
    from gpt2np.model import GPT

    if not isinstance(model, GPT):
        return None
    from gpt2np.evals.shared_prefix import continuation_losses

    return lambda prefixes, endings: continuation_losses(model, prefixes, endings)


def token_losses(logits, rows, cols, targets, backend=None) -> np.ndarray:
    """-log softmax(logits[rows, cols])[targets] in float64, as a host array (N,).

    Only the N scored positions are gathered (N, V) and promoted, not the whole logits, on
    the device that holds them. logits: torch tensors, or arrays of `backend` (a gpt2np
    backend: its xp and to_host; None: numpy arrays)."""
    if hasattr(logits, "detach"):  # torch
        import torch

        dev = logits.device
        sel = logits[torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)].double()
        t = torch.as_tensor(targets, device=dev)
        nll = torch.logsumexp(sel, dim=-1) - sel[torch.arange(len(t), device=dev), t]
        return _finite(nll.cpu().numpy())
    xp = np if backend is None else backend.xp
    sel = logits[xp.asarray(rows), xp.asarray(cols)].astype(xp.float64)  # (N, V)
    m = sel.max(axis=-1, keepdims=True)
    lse = m[:, 0] + xp.log(xp.exp(sel - m).sum(axis=-1))
    nll = lse - sel[xp.arange(len(targets)), xp.asarray(targets)]
    return _finite(np.asarray(nll if backend is None else backend.to_host(nll), dtype=np.float64))


def _finite(nll: np.ndarray) -> np.ndarray:
    """nll, if every loss is finite: a NaN would make argmin choose ending 0 (acc = the share
    of label-0 items) and a mean loss of NaN; both are wrong answers, not scores."""
    if not np.isfinite(nll).all():
        raise FloatingPointError(f"{int((~np.isfinite(nll)).sum())} of {nll.size} token losses "
                                 f"are not finite: the model's logits hold NaN or inf (are its "
                                 f"weights finite?)")
    return nll


# ------------------------------------------------------------------------------ scoring


def batches(rendered: list[Rendered], max_tokens: int) -> Iterable[list[int]]:
    """Indices of items grouped so that rows * padded length <= max_tokens (at least one
    item per batch), in order of length so that little is padded."""
    order = sorted(range(len(rendered)), key=lambda i: max(map(len, rendered[i].rows)))
    batch, width = [], 0
    for i in order:
        w = max(width, max(map(len, rendered[i].rows)))
        if batch and 4 * (len(batch) + 1) * w > max_tokens:
            yield batch
            batch, w = [], max(map(len, rendered[i].rows))
        batch.append(i)
        width = w
    if batch:
        yield batch


def shared_context(r: Rendered) -> np.ndarray | None:
    """The context that the 4 rows of r start with, each row being it + an ending, or
    None (an ending cut to fit a tiny block leaves rows without a common context)."""
    start = r.starts[0]
    ctx = r.rows[0][:start]
    if any(s != start or not np.array_equal(row[:start], ctx) for row, s in zip(r.rows, r.starts)):
        return None
    return ctx


def context_batches(rendered: list[Rendered], indices: list[int], max_tokens: int):
    """`indices` (items with a shared context) grouped so that the tokens that run, each
    item packed into one row (its context and its endings but their last tokens, see
    gpt2np.evals.shared_prefix) and padded, stay <= max_tokens; in order of length."""
    # ctx + sum(len(ending) - 1) over the k rows = sum(len(row) - 1) - (k - 1) ctx
    width = {i: sum(len(row) - 1 for row in r.rows) - (len(r.rows) - 1) * r.starts[0]
             for i, r in ((i, rendered[i]) for i in indices)}
    batch, w = [], 0
    for i in sorted(indices, key=width.get):
        if batch and (len(batch) + 1) * max(w, width[i]) > max_tokens:
            yield batch
            batch, w = [], 0
        batch.append(i)
        w = max(w, width[i])
    if batch:
        yield batch


def ending_losses(logits_fn, rendered: list[Rendered], max_tokens: int = 4096,
                  on_batch: Callable | None = None, backend=None, score: Callable | None = None,
                  shared: Callable | None = None, shared_tokens: int | None = None):
    """Summed loss and scored-token count of every ending: two (n, 4) arrays (float64, int).

    logits_fn: idx (R, T) -> logits (R, T, V), arrays of `backend` (see token_losses);
    on_batch(n_items) is called after each forward. score: a losses_function to use instead
    of logits_fn (a gpt2np.GPT's: no logits at all). shared: a shared_function (or the same
    signature), which scores the items whose rows share their context (all of them, but
    for endings cut to fit a tiny block) running each context once, shared_tokens tokens
    per forward (default: max_tokens); the others go by rows.
    """
    n = len(rendered)
    sums, counts = np.zeros((n, 4)), np.zeros((n, 4), dtype=np.int64)
    rest = list(range(n))
    if shared is not None:
        ctx = {i: shared_context(rendered[i]) for i in rest}
        for batch in context_batches(rendered, [i for i in rest if ctx[i] is not None],
                                     shared_tokens or max_tokens):
            ends = [[row[r.starts[0]:] for row in r.rows] for r in (rendered[i] for i in batch)]
            s, counts[batch] = shared([ctx[i] for i in batch], ends)
            sums[batch] = _finite(np.asarray(s, dtype=np.float64))
            if on_batch is not None:
                on_batch(len(batch))
        rest = [i for i in rest if ctx[i] is None]
    for part in batches([rendered[i] for i in rest], max_tokens):
        batch = [rest[j] for j in part]
        sums[batch], counts[batch] = _row_losses(logits_fn, [rendered[i] for i in batch],
                                                 backend, score)
        if on_batch is not None:
            on_batch(len(batch))
    return sums, counts


def _row_losses(logits_fn, items: list[Rendered], backend, score):
    # one padded forward of the items' 4 rows each -> sums, counts (len(items), 4)
    rows = [r for item in items for r in item.rows]
    starts = [s for item in items for s in item.starts]
    width = max(map(len, rows))
    idx = np.zeros((len(rows), width), dtype=np.int64)  # right padding (never scored)
    r_sel, c_sel, t_sel = [], [], []
    for r, (row, start) in enumerate(zip(rows, starts)):
        idx[r, :len(row)] = row
        j = np.arange(start, len(row))  # positions of scored targets
        r_sel.append(np.full(len(j), r))
        c_sel.append(j - 1)  # the logits at j-1 predict the token at j
        t_sel.append(row[j])
    r_sel, c_sel, t_sel = (np.concatenate(a) for a in (r_sel, c_sel, t_sel))
    nll = (score(idx, r_sel, c_sel, t_sel) if score is not None else
           token_losses(logits_fn(idx), r_sel, c_sel, t_sel, backend))
    row_sum = np.bincount(r_sel, weights=nll, minlength=len(rows))  # (R,)
    row_count = np.bincount(r_sel, minlength=len(rows))
    return row_sum.reshape(len(items), 4), row_count.reshape(len(items), 4)


@dataclass
class HellaSwagResult:
    n: int  # items scored
    correct: int  # argmin of the summed ending loss is the label
    correct_norm: int  # argmin of the mean ending loss is the label
    cut: int  # items whose context was cut to fit the block size

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.n if self.n else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "acc": self.acc, "acc_norm": self.acc_norm}

    def __str__(self) -> str:
        cut = f" ({self.cut} contexts cut to fit the block size)" if self.cut else ""
        return (f"hellaswag: acc {self.acc:.4f} ({self.correct}/{self.n}), "
                f"acc_norm {self.acc_norm:.4f} ({self.correct_norm}/{self.n}){cut}")


class HellaSwag:
    """The items of a split, tokenized once for a block size; score models with it.

        hs = HellaSwag.from_file(path, block_size=1024, limit=None)
        result = hs.evaluate(model, ctx=dist_ctx)     # the same result on every rank

    Training evaluates the same items at every eval step: tokenizing them once pays off.
    """

    def __init__(self, items: list[dict], block_size: int, enc=None):
        self.items = [check_item(item, f"HellaSwag item {i}") for i, item in enumerate(items)]
        self.block_size = block_size
        self.rendered = [render(item, block_size, enc) for item in items]

    @classmethod
    def from_file(cls, path=None, block_size: int = 1024, limit: int | None = None, **find):
        return cls(load_items(path, limit, **find), block_size)

    def evaluate(self, model, *, ctx=None, progress: bool = True,
                 logits_budget: int | None = None, backend=None,
                 vocab_size: int | None = None, shared: Callable | None = None) -> HellaSwagResult:
        """Score this rank's share (items i % world == rank); counts summed over ranks.
        model: anything logits_function takes. backend, vocab_size: those of a plain
        function's model (default: the model's `backend` and `config`, else numpy arrays and
        GPT-2's vocabulary). logits_budget: bytes of float32 logits per forward (default:
        64 MiB, 2 GiB on a GPU). shared: a function (prefixes, endings) -> (sums, counts)
        that scores items with a shared context without logits (a training engine's
        continuation_losses); a gpt2np.GPT brings its own."""
        if logits_budget is None:
            logits_budget = GPU_LOGITS_BUDGET if _on_gpu(model) else DEFAULT_LOGITS_BUDGET
        backend = backend or getattr(model, "backend", None)
        vocab = check_vocab(vocab_size or _vocab_size(model))
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        mine = self.rendered[rank::world]
        # the logits (R, T, V) float32 are the biggest array of the forward: fit them in budget
        max_tokens = max(1, logits_budget // (4 * vocab))
        score = losses_function(model)
        if score is not None:  # a gpt2np.GPT makes no such logits: big forwards
            max_tokens = max(max_tokens, FORWARD_TOKENS)
        from tqdm import tqdm

        with tqdm(total=len(mine), unit="item", desc="hellaswag", file=sys.stderr, leave=False,
                  disable=not progress or (ctx is not None and not ctx.is_main)) as bar:
            shared = shared or shared_function(model)  # no logits: big forwards too
            sums, counts = ending_losses(logits_function(model), mine, max_tokens, bar.update,
                                         backend, score=score, shared=shared,
                                         shared_tokens=max(max_tokens, FORWARD_TOKENS))
        labels = np.array([r.label for r in mine], dtype=np.int64)
        means = sums / np.maximum(counts, 1)  # (n, 4) loss per ending token
        local = [len(mine), int((sums.argmin(1) == labels).sum()) if len(mine) else 0,
                 int((means.argmin(1) == labels).sum()) if len(mine) else 0,
                 sum(r.cut for r in mine)]
        if ctx is not None and ctx.distributed:
            local = [int(round(v)) for v in ctx.all_reduce_sum(np.array(local, dtype=np.float64))]
        return HellaSwagResult(*local)


def _on_gpu(model) -> bool:
    backend = getattr(model, "backend", None)
    if backend is not None:
        return getattr(backend, "name", "") == "cupy"
    parameters = getattr(model, "parameters", None)
    if parameters is not None:  # a torch module
        return next(parameters()).device.type == "cuda"
    return False


def _vocab_size(model):
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def check_vocab(vocab_size: int | None) -> int:
    """The model's vocabulary size (GPT-2's when unknown), if it has GPT-2's tokens."""
    if vocab_size is not None and vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"HellaSwag is tokenized with GPT-2's {GPT2_VOCAB_SIZE} ids; the model "
                         f"has only {vocab_size} rows in its vocabulary")
    return vocab_size or GPT2_VOCAB_SIZE


def evaluate(model, data=None, *, limit: int | None = None, ctx=None, progress: bool = True,
             logits_budget: int | None = None, block_size: int | None = None, backend=None,
             **find) -> HellaSwagResult:
    """HellaSwag acc / acc_norm of a model on the val split (see the module docstring).

    data: a path to the jsonl (or a folder with hellaswag_val.jsonl); else the cache, else a
    download. block_size: the model's config.block_size unless given (a plain function needs it).
    """
    if block_size is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("pass block_size= when the model is a plain logits function")
        block_size = config.block_size
    hs = HellaSwag(load_items(data, limit, **find), block_size)
    return hs.evaluate(model, ctx=ctx, progress=progress, logits_budget=logits_budget,
                       backend=backend)


# ------------------------------------------------------------------------------ in training


class HellaSwagEvaluator:
    """HellaSwag at every eval step of a training run (gpt2np.train.evaluators' interface):
    logs hellaswag_acc and hellaswag_acc_norm, of the params after that step's update.

    The items are tokenized once; under data parallelism every rank scores its share and
    the counts are summed (every rank returns the same fields). It scores through the
    engine's `continuation_losses` (each item one packed row, see
    gpt2np.evals.shared_prefix) where it has one, else its `logits`; on_gpu: the engine
    computes on a GPU (bigger batches
    pay off there). `references`: {name: acc_norm} lines to draw on the loss.png panel
    (gpt2np.evals.references' figures, for GPT-2-sized runs).
    """

    def __init__(self, path, block_size: int, ctx=None, references: dict | None = None,
                 limit: int | None = None, on_gpu: bool = False, vocab_size: int | None = None):
        from gpt2np.train.outputs import Panel

        self.vocab_size = check_vocab(vocab_size)
        self.hs = HellaSwag.from_file(path, block_size, limit)
        self.ctx = ctx
        self.references = references or {}
        self.logits_budget = GPU_LOGITS_BUDGET if on_gpu else DEFAULT_LOGITS_BUDGET
        self.panels = [Panel(("hellaswag_acc_norm",), self.draw)]

    def evaluate(self, step, engine) -> dict:
        # engine.logits gives the engine's own arrays: numpy/cupy (an array engine, whose
        # backend reads them) or torch tensors (the torch engine, which has no array backend)
        try:
            r = self.hs.evaluate(engine.logits, ctx=self.ctx, progress=False,
                                 backend=engine.backend, shared=engine.continuation_losses,
                                 logits_budget=self.logits_budget, vocab_size=self.vocab_size)
        except FloatingPointError:  # non-finite params: no accuracy; the loop stops on its
            nan = float("nan")      # non-finite val loss as on any divergence
            return {"hellaswag_acc": nan, "hellaswag_acc_norm": nan}
        return {"hellaswag_acc": r.acc, "hellaswag_acc_norm": r.acc_norm}

    def draw(self, ax, records):
        """loss.png's HellaSwag panel: acc_norm (and acc) against the step."""
        for key, style in (("hellaswag_acc_norm", "o-"), ("hellaswag_acc", "x:")):
            points = [(r["step"] + 1, r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), style, label=key.replace("hellaswag_", ""))
        ax.axhline(0.25, color="gray", lw=0.8, ls=":", label="chance (0.25)")
        for (name, value), color in zip(self.references.items(), ("tab:red", "tab:green")):
            ax.axhline(value, color=color, lw=1, ls="--", label=f"{name} acc_norm ({value})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"HellaSwag accuracy ({len(self.hs.items)} items)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
