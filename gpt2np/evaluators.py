"""What the training loop measures besides the train loss: evaluators and step probes.

Evaluators run at every eval step (every --eval-interval steps, and the last step), after
that step's update, in list order:

    class MyEval:
        panels = [...]  # optional: gpt2np.run_outputs.Panel(s) to add to loss.png
        def evaluate(self, step, engine) -> dict:
            return {"my_metric": 0.5}  # merged into the step's log.jsonl record

`step` is the record's step (0-based; the params are those after its update). Under data
parallelism every rank calls every evaluator, so an evaluator does its own collectives
(ctx.all_reduce_mean ...) and returns the same fields on every rank; rank 0 logs them.
The val loss is one: ValLoss -> {"val_loss": ...}.

Step probes watch every step from inside it (e.g. gradient diagnostics every N steps); a
probe subclasses StepProbe and overrides what it needs:

    start_step(step, engine)            before the micro-steps (it may set
                                        engine.forward_hook, see gpt2np.engines)
    before_update(step, engine)         grads accumulated and all-reduced, before clipping:
                                        engine.grads and engine.params, name -> array
    after_update(step, engine, record)  after the AdamW step; `record` is the step's log
                                        record so far: add fields to it to log them

Adding one behind a flag: a field on train_settings.TrainConfig, a line in
gpt2np.train.build_parser, and one line in build_evaluators or build_probes below.
May touch: the engine's params/grads read-only (a probe may set engine.forward_hook), its
own loaders; never the training data loader, the optimizer or the files of the run.
"""
from __future__ import annotations

from .references import training_evaluators
from .train_data import TrainData
from .train_settings import RunSettings, TrainConfig


class ValLoss:
    """The mean loss over the same val batches each time; data parallel: the ranks' mean."""

    def __init__(self, loader, batches: int, ctx):
        self.loader, self.batches, self.ctx = loader, batches, ctx

    def evaluate(self, step, engine) -> dict:
        self.loader.reset()  # the same val batches every time
        local = sum(engine.loss(*self.loader.next_batch())
                    for _ in range(self.batches)) / self.batches
        return {"val_loss": self.ctx.all_reduce_mean(local)}


class StepProbe:
    """A probe that does nothing; subclass and override the hooks you need."""

    def start_step(self, step, engine):
        pass

    def before_update(self, step, engine):
        pass

    def after_update(self, step, engine, record):
        pass


def val_batches(run: RunSettings, data: TrainData, world_size: int) -> int:
    """Val batches per rank: --eval-batches, else as many as fit in the val split (<= 16)."""
    B, T = run.batch_size, run.block_size
    return run.eval_batches or max(1, min(16, (data.n_val - 1) // (B * T * world_size)))


def build_evaluators(cfg: TrainConfig, run: RunSettings, data: TrainData, ctx) -> list:
    """The evaluators a run's settings ask for (one line per optional one)."""
    evaluators = [ValLoss(data.val, val_batches(run, data, cfg.world_size), ctx)]
    evaluators += training_evaluators(cfg, run, ctx)  # --hellaswag; GPT-2 124M reference lines
    return evaluators


def build_probes(cfg: TrainConfig, run: RunSettings, ctx) -> list[StepProbe]:
    """The step probes a run's settings ask for (one line per optional one)."""
    probes: list[StepProbe] = []
    if cfg.diagnostics:  # --diagnostics N (imported here: gpt2np.diagnostics imports StepProbe)
        from .diagnostics import probe_for
        probes.append(probe_for(cfg, run, ctx))
    return probes
