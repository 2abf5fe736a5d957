"""What the training loop measures besides the train loss: evaluators and step probes.

Evaluators run at every eval step (every --eval-interval steps, and the last step), after
that step's update, in list order:

    class MyEval:
        panels = [...]  # optional: gpt2np.train.outputs.Panel(s) to add to loss.png
        def evaluate(self, step, engine) -> dict:
            return {"my_metric": 0.5}  # merged into the step's log.jsonl record

`step` is the record's step (0-based; the params are those after its update). Under data
parallelism every rank calls every evaluator, so an evaluator does its own collectives
(ctx.all_reduce_mean ...) and returns the same fields on every rank; rank 0 logs them.
The val loss is one: ValLoss -> {"val_loss": ...}.

Step probes watch every step from inside it (e.g. gradient diagnostics every N steps); a
probe subclasses StepProbe and overrides what it needs:

    start_step(step, engine)            before the micro-steps (it may set
                                        engine.forward_hook, see gpt2np.train.engines)
    before_update(step, engine)         grads accumulated and all-reduced, before clipping:
                                        engine.grads and engine.params, name -> array
    after_update(step, engine, record)  after the AdamW step; `record` is the step's log
                                        record so far: add fields to it to log them

An evaluator scores text through the engine's logits(idx), continuation_losses, config and
on_gpu (see gpt2np.train.engines), never through the model inside it. One behind a flag: the flag (see
gpt2np.train.settings), then one line in build_evaluators or build_probes below.
May touch: the engine's params/grads read-only (a probe may set engine.forward_hook), its
own loaders; never the training data loader, the optimizer or the files of the run.
"""
from __future__ import annotations

from gpt2np.evals.references import training_evaluators
from gpt2np.train.data import TrainData
from gpt2np.train.diagnostics import probe_for
from gpt2np.train.settings import RunSettings, TrainConfig


class ValLoss:
    """The mean loss over the first `batches` (B, T) batches of the val split, the same ones
    each time and whatever the number of ranks: every rank reads them all from one
    single-process loader and evaluates every world_size-th one (batch i on rank
    i % world_size); the mean is the ranks' sum over all of them."""

    def __init__(self, loader, batches: int, ctx):
        self.loader, self.batches, self.ctx = loader, batches, ctx

    def evaluate(self, step, engine) -> dict:
        self.loader.reset()  # the same val batches every time
        local = 0.0
        for i in range(self.batches):
            x, y = self.loader.next_batch()  # (slicing only, for the batches of other ranks)
            if i % self.ctx.world_size == self.ctx.rank:
                local += engine.loss(x, y)
        return {"val_loss": self.ctx.all_reduce_sum(local) / self.batches}


class StepProbe:
    """A probe that does nothing; subclass and override the hooks you need."""

    def start_step(self, step, engine):
        pass

    def before_update(self, step, engine):
        pass

    def after_update(self, step, engine, record):
        pass


def val_batches(run: RunSettings, data: TrainData) -> int:
    """(B, T) val batches per evaluation, all ranks together. --eval-batches counts global
    batches (total_batch_size tokens: what one optimizer step reads), so the val set depends
    on settings a resumed run must keep, never on the number of ranks. The default: as many
    global batches as fit in the val split, and about 16 (B, T) batches at most, >= 1."""
    micro = run.total_batch_size // (run.batch_size * run.block_size)  # (B, T) batches in one
    if run.eval_batches:
        return run.eval_batches * micro
    fit = (data.n_val - 1) // run.total_batch_size
    return max(1, min(16 // micro, fit)) * micro


def build_evaluators(cfg: TrainConfig, run: RunSettings, data: TrainData, ctx) -> list:
    """The evaluators a run's settings ask for (one line per optional one)."""
    evaluators = [ValLoss(data.val, val_batches(run, data), ctx)]
    evaluators += training_evaluators(cfg, run, ctx)  # --hellaswag; GPT-2 124M reference lines
    return evaluators


def build_probes(cfg: TrainConfig, run: RunSettings, ctx) -> list[StepProbe]:
    """The step probes a run's settings ask for (one line per optional one)."""
    probes: list[StepProbe] = []
    if cfg.diagnostics:  # --diagnostics N
        probes.append(probe_for(cfg, run, ctx))
    return probes
