"""Train and evaluate the SHA-RNN language model (Merity 2019).

Every flag's default is the paper's enwik8 first pass (flags.PAPER); the second pass
resumes from its weights with half the learning rate:

    python -u main.py --data data/enwik8/ --save ENWIK8.pt
    python -u main.py --data data/enwik8/ --save ENWIK8.pt --resume ENWIK8.pt --lr 1e-3 \\
        --epochs 5 --seed 125

The story, top to bottom: an epoch of training steps, validation, the run's epochs, the
test, then setup and main(). The step, the learning rate and evaluation are in
training.py; docs/model.md describes what each part computes.
Also runs under `torchrun --nproc_per_node=N main.py ...` (DistributedDataParallel).
"""

import signal

if __name__ == "__main__":  # a signal during the imports (seconds) waits for main()'s handlers
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import budget
import checkpoint as ckpt
import data
import outputs
import runtime
import training
from data import corpus_files
from dyneval import dynamic_evaluate
from model import model_for
from flags import (BUDGET_RULES, TEST_BATCH_SIZE, InputError, assign, eval_batch_size,
                   launched_rank, resolve_flags, settings_line)
from runtime import Dist, Stop, agree, amp_mode, leave, setup_distributed
from schedule import Schedule, plan_run, sample_seq_len
from training import (Limits, Meter, SaveTimer, Step, averaged_weights, build_optimizer,
                      check_fits, device_data, distributed, make_step, place_model, train_batch)
from utils import LOG2, RunLog, append_json_line, environment, safe_exp, write_json


# --- the run -----------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run works with (built once in setup)."""
    args: object
    step: Step      # model, optimizer, loss scaler: what train_step works with
    config: dict
    vocab: list
    train_data: torch.Tensor  # [N, B_local] ids, this rank's columns
    val_data: torch.Tensor
    test_data: torch.Tensor
    d: Dist
    log: RunLog
    rng: np.random.RandomState  # the sequence lengths, the same on every rank
    stop: Stop
    paths: dict     # save, last, run_dir
    fingerprint: dict  # {split: SHA-256} of the corpus, kept in checkpoints
    sources: dict = None  # {flag: where its value came from}, for the Settings line
    budget_note: str = None  # what --budget measured and chose
    pace: budget.Pace = None  # --budget's deadline, kept while training (not on --continue)
    unit: str = "bpc"  # the log's bits: "bpc" per character (bytes), "bpt" per token (words)

    @property
    def model(self):
        return self.step.model

    @property
    def device(self):
        return self.step.device

    @property
    def local_stop(self):
        """This process's signal flag, for loops that can stop on their own (one process)."""
        return self.stop if self.d.world == 1 else None

    @property
    def limits(self):
        return Limits.of(self.args)

    def plan(self, progress):
        """Where the epoch in progress ends and the run's last step (schedule.plan_run), and
        the Schedule of the rates up to it."""
        rows = self.train_data.shape[0]
        plan = plan_run(self.rng, epoch=progress.epoch, i=progress.i, batch=progress.batch,
                        steps=progress.steps, rows=rows, bptt=self.args.bptt,
                        epochs=self.limits.epochs, accumulate=self.args.accumulate,
                        max_steps=self.args.max_steps, batch_limit=self.limits.train_batches)
        return plan, Schedule.of(self.args, rows, plan.last_step)


def progress_bar(run, total, desc, done=0):
    if run.args.no_progress or not run.d.main or not sys.stderr.isatty():
        return None
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False,
               dynamic_ncols=True, file=sys.stderr)
    bar.update(done)
    return bar


class NonFinite(RuntimeError):
    """Too many consecutive non-finite losses."""


# --- an epoch ----------------------------------------------------------------------------

def train_epoch(run, progress):
    """Train to the end of the epoch (True) or to a stop the ranks agreed on (False)."""
    args = run.args
    plan, schedule = run.plan(progress)  # where the epoch ends, the rates up to the last step
    meter, saves = Meter(run.device), SaveTimer(args.save_interval, progress.steps)
    bar = progress_bar(run, (run.train_data.shape[0] - 1) * args.batch_size,
                       f"epoch {progress.epoch + 1}", progress.i * args.batch_size)
    run.model.train()
    started = time.time() - progress.epoch_time
    stopping = False
    while progress.batch < plan.epoch_batches and not stopping:
        batch = train_batch(run.step, progress, schedule, run.train_data,
                            seq_len=sample_seq_len(run.rng, args.bptt),
                            accumulate=args.accumulate, batch_size=args.batch_size)
        progress.epoch_time = time.time() - started
        meter.add(batch.loss, batch.tokens, batch.norm)
        if bar:
            bar.update(batch.tokens)
        at_log = progress.batch % args.log_interval == 0
        if at_log:
            log_train(run, progress, meter.read(run.d), plan.epoch_batches, batch.lr)
            if run.pace and keep_pace(run, progress):
                plan, schedule = run.plan(progress)
        update = batch.update
        if update and (run.d.world == 1 or at_log):  # under torchrun: no syncs between logs
            stopping = decide(run, progress, meter, at_log, saves)
        if (update and not stopping and args.eval_interval
                and progress.steps % args.eval_interval == 0
                and progress.batch < plan.epoch_batches):  # the epoch's end validates anyway
            with aside(run):
                validate(run, progress, within_epoch=True)
            run.model.train()
    if bar:
        bar.close()
    return not stopping


def log_train(run, progress, interval, batches, lr):
    """The log line of an interval (Meter.read) and its metrics record."""
    loss, nonfinite = interval["loss"], interval["nonfinite"]
    run.log(f"| epoch {progress.epoch + 1:3d} | {progress.batch:5d}/{batches:5d} batches | "
            f"lr {lr:05.5f} | ms/batch {interval['ms_per_batch']:5.2f} | loss {loss:5.2f} | "
            f"ppl {safe_exp(loss):8.2f} | {run.unit} {loss / LOG2:8.3f}"
            + (f" | non-finite losses {nonfinite}" if nonfinite else ""))
    run.log.metrics(type="train", epoch=progress.epoch + 1, step=progress.steps,
                    batch=progress.batch, tokens=progress.tokens, lr=lr, bpc=loss / LOG2,
                    **interval, time=time.time())


def decide(run, progress, meter, at_log, saves):
    """After an optimizer step, the stop, save and non-finite decisions, all taken on values
    every rank shares, so that no rank waits for another that went a different way. True
    when the run stops (the last checkpoint is then written)."""
    bad = meter.worst_streak() if at_log else 0.0
    code, due, bad = agree(run.d, run.device, run.stop.code, float(saves.due(progress.steps)), bad)
    stopping = run.stop.decide(code)
    if bad >= run.args.max_nonfinite:
        raise NonFinite(f"{int(bad)} consecutive non-finite losses at epoch "
                        f"{progress.epoch + 1}, batch {progress.batch}; stopping (try a lower "
                        f"--lr or --amp bf16)")
    if stopping or due:
        with aside(run):
            ckpt.save_last(run, progress)
        saves.restart(progress.steps)
    return stopping


@contextlib.contextmanager
def aside(run):
    """Work besides training (validations, checkpoint writes): kept out of the step times
    by which --budget forecasts the run's end."""
    if run.pace:
        run.pace.pause()
    try:
        yield
    finally:
        if run.pace:
            run.pace.resume()


def keep_pace(run, progress):
    """--budget, at a log interval: re-plan when the run would end past its deadline
    (budget.Pace), on times the ranks agree on; log and record the new plan. True when
    the plan changed."""
    args = run.args
    recent, elapsed = run.pace.sample(progress.steps)
    recent, elapsed = agree(run.d, run.device, -1.0 if recent is None else recent, elapsed)
    new = run.pace.replan(args, progress.steps, recent, elapsed) if recent > 0 else None
    if new is None:
        return False
    run.log(f"Budget {args.budget}: re-planned at step {new['step']:,}: last step "
            f"{new['old_last']:,} -> {new['max_steps']:,}, cooldown {args.cooldown or 0:,.6g} -> "
            f"{new['cooldown'] or 0:,.6g} (steps take {1000 * recent:,.1f} ms, measured "
            f"{1000 * new['measured_step']:,.1f} ms: the plan would end "
            f"{new['forecast'] - run.pace.seconds:,.1f} s past the budget)")
    plan = {"max_steps": new["max_steps"], "cooldown": new["cooldown"]}
    if new["epochs"] is not None:
        plan["epochs"] = new["epochs"]
    assign(args, run.sources, plan, f"budget {args.budget}", over_given=True)
    progress.replans.append(new)
    run.log.metrics(type="replan", **new, time=time.time())
    if run.d.main:
        try:
            write_json(os.path.join(run.paths["run_dir"], "args.json"),
                       dict(vars(args), model=run.config, replans=progress.replans))
        except OSError as e:
            run.log.fail(f"cannot write {run.paths['run_dir']}/args.json: {e.strerror or e}")
    run.pace.restart()
    return True


def validate(run, progress, within_epoch=False):
    """Validation after an epoch (or `within_epoch`, --eval-interval): returns the loss, or
    None if stopped by a signal."""
    bsz = eval_batch_size(run.args)
    bar = progress_bar(run, (run.val_data.shape[0] - 1) * bsz, "valid")
    with averaged_weights(run.model, run.step.optimizer):
        val_loss = training.evaluate(run.model, run.val_data, bsz, run.args.bptt,
                                     run.step.autocast(), run.d,
                                     max_batches=run.limits.eval_batches, stop=run.local_stop,
                                     bar=bar)
        if bar:
            bar.close()
        if val_loss is None:
            return None
        where = (f"| epoch {progress.epoch + 1:3d} | step {progress.steps:7,d}" if within_epoch
                 else f"| end of epoch {progress.epoch + 1:3d}")
        run.log("-" * 89)
        run.log(f"{where} | time: {progress.epoch_time:5.2f}s | "
                f"valid loss {val_loss:5.2f} | valid ppl {safe_exp(val_loss):8.2f} | "
                f"valid {run.unit} {val_loss / LOG2:8.3f}"
                + run.limits.note(run.val_data, run.args.bptt))
        run.log("-" * 89)
        run.log.metrics(type="valid", epoch=progress.epoch + 1, step=progress.steps,
                        tokens=progress.tokens, valid_loss=val_loss, valid_bpc=val_loss / LOG2,
                        epoch_time=progress.epoch_time, time=time.time())
        if val_loss < progress.best_val:
            if ckpt.save_best(run, progress, val_loss):
                progress.best_val = val_loss
        elif progress.best_val < float("inf"):
            run.log(f"Not saving: valid loss {val_loss:.4f} is not below the best, "
                    f"{progress.best_val:.4f}, which {run.paths['save']} keeps")
    return val_loss


def end_of_epoch(run, progress, val_loss):
    """After an epoch's validation: the checkpoint copy before a --when drop (the drop
    itself is the schedule's, schedule.Schedule), the switch to averaged SGD, then the next
    epoch."""
    args = run.args
    epoch = progress.epoch + 1
    progress.val_history.append(val_loss)
    if epoch in args.when:
        run.log("Saving model before learning rate decreased")
        ckpt.write_collectively(run, lambda: ckpt.base_checkpoint(run, {"epoch": epoch}),
                                f"{run.paths['save']}.e{epoch}")
        run.log("Dividing learning rate by 10")
    history = progress.val_history
    if (progress.optimizer_name == "sgd" and len(history) > args.nonmono
            and val_loss > min(history[:-args.nonmono])):
        run.log("Switching to ASGD")
        progress.optimizer_name = "asgd"
        run.step.optimizer = build_optimizer("asgd", run.model.parameters(), args.lr, args.wdecay)
    progress.next_epoch()


def train(run, progress):
    """Epochs of training and validation; returns how it ended: 'done', 'interrupt' or
    'terminate' (the last checkpoint is written in every case)."""
    while progress.epoch < run.limits.epochs:
        if not train_epoch(run, progress):
            return run.stop.agreed
        with aside(run):
            try:
                val_loss = validate(run, progress)
            except ckpt.WriteFailed:  # the best could not be written: keep the epoch if possible
                ckpt.save_last(run, progress)
                raise
            if val_loss is not None:
                end_of_epoch(run, progress, val_loss)
            ckpt.save_last(run, progress)
        if run.stop.agree(run.d, run.device):
            return run.stop.agreed
        if run.args.max_steps and progress.steps >= run.args.max_steps:
            break
    return "done"


# --- testing -----------------------------------------------------------------------------

def report(run, kind, name, loss, source):
    """One result line: loss, perplexity and bits per token (character) of `source`."""
    run.log(f"| {kind} | {name} loss {loss:5.2f} | {name} ppl {safe_exp(loss):8.2f} | "
            f"{name} {run.unit} {loss / LOG2:8.3f}" + run.limits.note(source, run.args.bptt))


def test(run, progress):
    """Load the best checkpoint this run wrote (if any) and report test loss/ppl/bpc; True
    when reported. A signal during the test (one process) stops it; the checkpoints are
    already written."""
    best = ckpt.load_checkpoint(run.paths["save"]) if progress.best_val < float("inf") else None
    if best:
        run.model.load_strict(best["model"])
    else:
        run.log("This run wrote no best checkpoint (no validation finished); testing the "
                "weights it ends with")
    run.stop.reason = None  # a Ctrl-C that ended training does not also stop the test
    bar = progress_bar(run, (run.test_data.shape[0] - 1) * TEST_BATCH_SIZE, "test")
    test_loss = training.evaluate(run.model, run.test_data, TEST_BATCH_SIZE, run.args.bptt,
                                  run.step.autocast(), run.d, max_batches=run.limits.eval_batches,
                                  stop=run.local_stop, bar=bar)
    if bar:
        bar.close()
    if test_loss is None:
        run.log("The test was stopped by a signal; the checkpoints are written")
        return False
    run.log("=" * 89)
    report(run, "End of training", "test", test_loss, run.test_data)
    run.log("=" * 89)
    if best and "test_loss" not in best["metrics"]:  # a best tested before stays as it is
        ckpt.record_test(run, best, test_loss)
    run.log.metrics(type="test", step=progress.steps, test_loss=test_loss,
                    test_bpc=test_loss / LOG2, time=time.time())
    if run.args.dynamic_eval:
        report_dynamic(run, run.test_data, TEST_BATCH_SIZE, "test", progress.steps)
    return True


def report_dynamic(run, source, bsz, name, steps=0):
    args = run.args
    loss, _ = dynamic_evaluate(run.model, run.train_data, source, bsz, bptt=args.bptt,
                               amp=args.amp, lr=args.dyn_lr, decay=args.dyn_decay,
                               eps=args.dyn_eps, stat_batches=args.dyn_stat_batches,
                               max_batches=run.limits.eval_batches)
    report(run, "dynamic eval", name, loss, source)
    run.log.metrics(type=f"dynamic_{name}", step=steps, loss=loss, bpc=loss / LOG2, time=time.time())


def eval_only(run):
    """--eval-only: valid and test of the resumed weights; nothing is trained or written."""
    for name, source, bsz in (("valid", run.val_data, eval_batch_size(run.args)),
                              ("test", run.test_data, TEST_BATCH_SIZE)):
        loss = training.evaluate(run.model, source, bsz, run.args.bptt, run.step.autocast(),
                                 run.d, max_batches=run.limits.eval_batches)
        report(run, "eval only", name, loss, source)
        if run.args.dynamic_eval:
            report_dynamic(run, source, bsz, name)


# --- setup -------------------------------------------------------------------------------

def claim_outputs(args, paths, start, d, device, tmp):
    """Rank 0 claims the run's outputs and locks them (outputs.claim_run); under torchrun the
    ranks agree on the outcome, so that a refused run ends on every rank at once (rank 0
    says why) instead of leaving the others waiting for it."""
    lock = refused = None
    if not args.eval_only and d.main:  # rank 0 writes
        try:
            lock = outputs.claim_run(args, paths, start, corpus_files(args.data), tmp)
        except InputError as e:
            refused = e
    if agree(d, device, float(refused is not None))[0]:
        raise refused or InputError("rank 0 refused the run's outputs")
    return lock


def setup(args, d, device, start, paths, stop, sources, started):
    """Load data and weights, and build the Run and its Progress; with --budget, measure
    and fix the run's steps (budget.py) before any record is written."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dynamic_eval and d.world > 1:
        raise InputError("--dynamic-eval runs in one process; launch it without torchrun")
    if args.batch_size % d.world:
        raise InputError(f"--batch_size {args.batch_size} does not divide over {d.world} ranks")
    rng = np.random.RandomState(args.seed)  # sequence lengths: the same on every rank
    torch.manual_seed(args.seed)
    corpus = data.Corpus(args.data, unk=args.unk, cache=not args.eval_only, write_later=True)
    if args.continue_from:
        ckpt.check_same_corpus(start, corpus.fingerprint, args)
    model, config = model_for(args, start, corpus)
    check_fits(config, args.bptt, args.batch_size // d.world, device)
    place_model(model, args, device)
    if d.world > 1:
        torch.manual_seed(args.seed + d.rank)  # distinct dropout masks per rank
    splits = device_data(corpus, args, d, device)
    progress = ckpt.progress_from(start, args, d, device, splits[0].shape[0])
    if not args.continue_from:
        progress.best_val = ckpt.best_to_beat(start, args, paths["save"], corpus.fingerprint)
    net = distributed(model, device) if d.world > 1 else None
    step = make_step(model, args, device, progress.optimizer_name, net)
    if args.continue_from:
        ckpt.restore_training(step, rng, start, d)
    run = Run(args=args, step=step, config=config, vocab=corpus.dictionary.idx2word,
              train_data=splits[0], val_data=splits[1], test_data=splits[2], d=d, log=None,
              rng=rng, stop=stop, paths=paths, fingerprint=corpus.fingerprint, sources=sources,
              unit="bpc" if corpus.byte_level else "bpt")
    if args.budget and not args.continue_from and not args.eval_only:
        chosen, run.budget_note, run.pace = budget.choose(
            run, started, eval_batch_size(args), TEST_BATCH_SIZE, BUDGET_RULES[args.recipe],
            given={k for k, source in sources.items() if source == "given"})
        assign(args, sources, chosen, f"budget {args.budget}")
        model.set_dropouts(args.dropout, args.dropouth, args.dropouti, args.dropoute, args.wdrop)
        run.step = make_step(model, args, device, progress.optimizer_name, net)  # its wdecay
    if d.main:
        corpus.write_cache()  # every check has passed
    run.log = open_records(args, paths, config, d, stop, progress.steps)
    return run, progress


def open_records(args, paths, config, d, stop, steps):
    """The run log (and --tensorboard's events from step `steps` + 1); a new run's folder
    gets its flags and machine (args.json, env.json), and each --continue adds a line to
    continues.jsonl."""
    writes = not args.eval_only
    try:
        log = RunLog(paths["run_dir"] if writes else None, enabled=d.main,
                     append=bool(args.continue_from), on_failure=stop.records_failed,
                     tensorboard=paths["tensorboard"] if writes else None, first_step=steps + 1)
        if writes and d.main:
            flags, env = dict(vars(args), model=config), environment()
            if args.continue_from:
                append_json_line(os.path.join(paths["run_dir"], "continues.jsonl"),
                                 {"time": time.time(), "args": flags, "env": env})
            else:
                write_json(os.path.join(paths["run_dir"], "args.json"), flags)
                write_json(os.path.join(paths["run_dir"], "env.json"), env)
    except OSError as e:
        raise InputError(f"cannot write the run records in {paths['run_dir']}: "
                         f"{e.strerror or e}") from None
    return log


def describe(run, notes):
    """The start-up lines: the settings, the model, the device, where the outputs go."""
    args, config = run.args, run.config
    run.log(settings_line(args, run.sources))
    for note in ([run.budget_note] if run.budget_note else []) + notes:
        run.log(note)
    nparams = sum(p.numel() for p in run.model.parameters())
    run.log(f"Model: {nparams:,} parameters, attention in blocks {config['attn_layers']}, "
            f"{config['ntoken']} tokens, device {run.device}"
            + (f", threads {torch.get_num_threads()}" if run.device.type == "cpu" else "")
            + (f" x {run.d.world} ranks" if run.d.world > 1 else "")
            + f", amp {amp_mode(run.device, args.amp)}")
    if run.paths["moved"]:
        run.log(f"Run records in {run.paths['run_dir']} ({run.paths['moved']} holds an earlier run)")
    if not args.eval_only:
        run.log(outputs.outputs_line(run.paths))
    if args.dry_run:
        limits = run.limits
        run.log(f"Dry run: {limits.train_batches} training batches of up to {args.bptt} x "
                f"{args.batch_size} tokens, each logged when done, then {limits.eval_batches} "
                f"chunks of each evaluation split" if not args.eval_only else
                f"Dry run: {limits.eval_batches} chunks of each evaluation split")


def finished(run, progress):
    """--continue of a run with nothing left to train: test it if its test never ended,
    else say how to train further (the flags to raise); True when there was nothing to do."""
    args = run.args
    by_steps = bool(args.max_steps) and progress.steps >= args.max_steps
    if not (by_steps or progress.epoch >= run.limits.epochs):
        return False
    if not progress.tested:
        run.log("Training is complete; running the final test")
        return False
    raise_flags = [("--max-steps", 2 * args.max_steps)] if by_steps else []
    if progress.epoch >= run.limits.epochs:
        raise_flags.append(("--epochs", 2 * max(args.epochs, 1)))
    run.log(f"This run is finished ({progress.epoch} epochs, {progress.steps} optimizer steps) "
            f"and tested. To train it further, continue it with a higher "
            f"{' and '.join(f for f, _ in raise_flags)}, e.g. "
            + outputs.command(run.d.world, "--continue", run.paths["last"],
                              *[x for f in raise_flags for x in f]))
    return True


def execute(run, progress, notes):
    """Evaluate only, or train then test; returns the exit code."""
    describe(run, notes)
    if run.stop.agree(run.d, run.device):
        if run.stop.agreed == "records":
            raise InputError(run.log.failure)
        run.log("Stopped by a signal during start-up; nothing was trained")
        return 0
    if run.args.eval_only:
        eval_only(run)
        return 0
    if run.args.continue_from and finished(run, progress):
        return 0
    try:
        ended = train(run, progress)
    except NonFinite as e:
        run.log(f"error: {e}")
        ckpt.save_last(run, progress)
        return 1
    resume = (outputs.command(run.d.world, "--continue", run.paths["last"]) if run.paths["kept"]
              else None)  # a dry run's checkpoints go with its temporary folder
    if ended == "records":
        raise InputError(f"{run.log.failure}; training stopped at step {progress.steps} with the "
                         f"last checkpoint written: free some space, then "
                         + (f"continue with {resume}" if resume else "run the dry run again"))
    if ended == "terminate":
        run.log(f"Stopped by SIGTERM; continue with: {resume}" if resume else
                "Stopped by SIGTERM; a dry run keeps nothing to continue")
        return 0
    if ended == "interrupt":
        run.log("-" * 89)
        run.log("Exiting from training early")
    if test(run, progress) and ended == "done":
        progress.tested = True
        ckpt.save_last(run, progress)
    run.log(outputs.outputs_line(run.paths, best=progress.best_val < float("inf")))
    if progress.best_val < float("inf") and run.paths["kept"]:
        run.log(f"Sample from the best checkpoint: {outputs.sample_command(run.paths)}")
    if ended == "interrupt":
        run.log(f"Stopped by Ctrl-C; continue with: {resume}" if resume else
                "Stopped by Ctrl-C; a dry run keeps nothing to continue")
    if run.log.failure:
        raise InputError(f"{run.log.failure}; the checkpoints are written")
    return 0


def main(argv=None):
    started = budget.process_start()  # --budget counts from the process's start
    tmp = lock = None
    stop = Stop()  # from the first moment: a signal at any phase ends the run cleanly
    try:
        with stop:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
            args, start, sources, notes = resolve_flags(argv, ckpt.load_start)
            tmp = tempfile.mkdtemp(prefix="sharnn-dry-run-") if args.dry_run else None
            paths = outputs.plan(args, tmp)
            d, device = setup_distributed(runtime.pick_device(args.device, not args.no_tf32))
            lock = claim_outputs(args, paths, start, d, device, tmp)
            run, progress = setup(args, d, device, start, paths, stop, sources, started)
            try:
                code = execute(run, progress, notes)
            finally:
                run.log.close()
            if dist.is_initialized():
                dist.barrier()  # no rank leaves while another still talks to it
    except InputError as e:
        if launched_rank() == 0:  # once under torchrun
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        if lock:
            lock.release()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        leave(code)  # a torchrun worker ends here, its run objects still alive
    return code


if __name__ == "__main__":
    sys.exit(main())
