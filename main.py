"""Train and evaluate the SHA-RNN language model (Merity 2019).

Every flag's default is the paper's enwik8 first pass (flags.PAPER); the second pass
resumes from its weights with half the learning rate:

    python -u main.py --data data/enwik8/ --save ENWIK8.pt
    python -u main.py --data data/enwik8/ --save ENWIK8.pt --resume ENWIK8.pt --lr 1e-3 \\
        --epochs 5 --seed 125

The story, top to bottom: the learning rate and sequence lengths, one training step,
evaluation, an epoch, the run, then main(). docs/model.md describes what each part computes.
Also runs under `torchrun --nproc_per_node=N main.py ...` (DistributedDataParallel).
"""

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoint as ckpt
import outputs
from data import Corpus, device_data, get_batch
from dyneval import detach, dynamic_evaluate
from flags import DRY_RUN, MIN_TRUST, TEST_BATCH_SIZE, InputError, eval_batch_size
from lamb import Lamb
from runtime import (Dist, Stop, agree, all_sum, amp_mode, autocast, make_scaler, pick_device,
                     setup_distributed)
from utils import RunLog, append_json_line, environment, safe_exp, write_json

LOG2 = math.log(2)


# --- the learning rate and the sequence length ------------------------------------------

def lr_at(batch, base_lr, warmup, epoch=0, when=(), cooldown=None, total_batches=None):
    """Learning rate for global batch number `batch` (1-based, counted over the whole run
    as epoch * nominal batches per epoch + batch in epoch + 1, as the original counts)
    in 0-based `epoch`: linear warmup over `warmup` batches, divided by 10 after each epoch
    in `when` (1-based, as printed), and an optional linear cooldown to 0 over the last
    `cooldown` of `total_batches`."""
    lr = base_lr * min(batch, warmup) / warmup
    lr *= 0.1 ** sum(1 for w in when if w <= epoch)
    if cooldown:
        lr *= min(1.0, max(0.0, (total_batches - batch) / cooldown))
    return lr


def sample_seq_len(rng, bptt):
    """The original's random sequence length: bptt (p = 0.95) or bptt / 2, plus N(0, 5),
    clamped to [5, bptt]. `rng` is a numpy RandomState (the original's global stream)."""
    base = bptt if rng.random_sample() < 0.95 else bptt / 2.0
    return min(max(5, int(rng.normal(base, 5))), bptt)


def batches_left(rng, i, rows, bptt):
    """How many batches the epoch still takes from stream position `i`: the sequence
    lengths drawn from a copy of `rng`, so the real stream is untouched."""
    twin = np.random.RandomState()
    twin.set_state(rng.get_state())
    n = 0
    while i < rows - 2:
        i += min(sample_seq_len(twin, bptt), rows - 1 - i)
        n += 1
    return n


# --- the optimizer -----------------------------------------------------------------------

def build_optimizer(name, params, args):
    if name == "lamb":
        return Lamb(params, lr=args.lr, weight_decay=args.wdecay, min_trust=MIN_TRUST)
    if name == "asgd":
        return torch.optim.ASGD(params, lr=args.lr, t0=0, lambd=0.0, weight_decay=args.wdecay)
    cls = dict(sgd=torch.optim.SGD, adam=torch.optim.Adam, adamw=torch.optim.AdamW,
               adagrad=torch.optim.Adagrad)[name]
    return cls(params, lr=args.lr, weight_decay=args.wdecay)


@contextlib.contextmanager
def averaged_weights(model, optimizer):
    """Averaged SGD: evaluate (and save) with the averaged parameters, then swap back."""
    if not isinstance(optimizer, torch.optim.ASGD):
        yield
        return
    saved = {}
    with torch.no_grad():
        for p in model.parameters():
            if "ax" in optimizer.state[p]:
                saved[p] = p.detach().clone()
                p.copy_(optimizer.state[p]["ax"])
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved.items():
                p.copy_(value)


# --- one training step -------------------------------------------------------------------

def train_step(run, x, y, hidden, mems, pending, lr, step):
    """Forward one batch [T, B] with the carried state and add its mean loss to `pending`,
    the loss of the batches since the last optimizer step. When `step`: backward that sum
    once (gradients flow through the state carried between those batches), then unscale,
    clip, step, update the loss scale and zero the gradients; a step whose gradients hold
    an inf or nan is skipped by the scaler. Returns (this batch's loss, hidden, mems,
    pending), the state detached after a step."""
    with run.amp():
        output, hidden, mems = run.net(x, hidden, mems)  # output: [T, B, E]
        loss = run.model.loss(output, y).mean()           # float32 under autocast too
    pending = loss if pending is None else pending + loss
    if not step:
        return loss.detach(), hidden, mems, pending
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.scaler.scale(pending).backward()
    run.scaler.unscale_(run.optimizer)  # true gradients, so that clipping sees true norms
    if run.args.clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, run.args.clip)
    run.scaler.step(run.optimizer)      # skipped on inf/nan gradients
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return (loss.detach(), *detach(hidden, mems), None)


# --- evaluation --------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, source, bsz, bptt, amp_ctx, d, max_batches=None, stop=None, bar=None):
    """The sum over chunks of bptt of len(chunk) * mean loss(chunk), state carried from chunk
    to chunk, divided by the split's (batchified) length: docs/model.md, Evaluation. `bsz`
    is the global batch size: ranks hold shares of its columns and their sums are added.
    Cut short by `max_batches`, the sum is divided by the rows scored instead: the mean
    loss of what was evaluated. Returns None if stopped by a signal."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=source.device)
    hidden = mems = None
    rows = source.shape[0]
    for n, i in enumerate(range(0, source.shape[0] - 1, bptt)):
        if max_batches is not None and n >= max_batches:
            rows = i  # the rows scored so far
            break
        if stop and stop.reason:
            break
        x, y = get_batch(source, i, bptt)
        with amp_ctx:
            output, hidden, mems = model(x, hidden, mems)
            total += model.loss(output, y).sum(dtype=torch.float64)
        if bar:
            bar.update(x.numel() * d.world)
    if stop and stop.reason:
        return None
    return all_sum(total, d).item() / (rows * bsz)


# --- the run -----------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run works with (built once in setup)."""
    args: object
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: dict
    vocab: list
    train_data: torch.Tensor  # [N, B_local] ids, this rank's columns
    val_data: torch.Tensor
    test_data: torch.Tensor
    device: torch.device
    d: Dist
    log: RunLog
    rng: np.random.RandomState
    stop: Stop
    paths: dict
    fingerprint: dict = None  # {split: SHA-256} of the corpus, kept in checkpoints

    def amp(self):
        return autocast(self.device, self.args.amp)

    @property
    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def limit(self, kind):
        """--dry-run's cap on training or evaluation batches ('train' or 'eval'), else None."""
        return DRY_RUN[f"{kind}_batches"] if self.args.dry_run else None

    def dry_note(self, source):
        """What a --dry-run evaluation of `source` covered, to mark its numbers; else ''."""
        if not self.args.dry_run:
            return ""
        chunks = len(range(0, source.shape[0] - 1, self.args.bptt))
        return f" | dry run: {min(chunks, self.limit('eval'))} of {chunks} chunks"


def progress_bar(run, total, desc):
    if run.args.no_progress or not run.d.main or not sys.stderr.isatty():
        return None
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False,
                dynamic_ncols=True, file=sys.stderr)


class NonFinite(RuntimeError):
    """Too many consecutive non-finite losses."""


def train_epoch(run, progress):
    """Train until the end of the epoch (True) or a stop the ranks agreed on (False). Every
    decision to stop or save is taken on values all ranks share, never on this process's
    own signal flag, so no rank waits for another that went a different way."""
    args, d = run.args, run.d
    n = run.train_data.shape[0]
    nominal = n // args.bptt  # the original's batches per epoch, used in the lr schedule
    limit = run.limit("train")
    last_batch = args.epochs * nominal  # where --cooldown ends: the last epoch, or --max-steps
    if args.max_steps:
        last_batch = min(last_batch, args.max_steps * args.accumulate)
    batches = progress.batch + batches_left(run.rng, progress.i, n, args.bptt)  # logged
    batches = min(batches, limit) if limit else batches
    if args.max_steps and progress.steps < args.max_steps:  # the batch of the last step
        first = -(-progress.batch // args.accumulate) * args.accumulate
        batches = min(batches, first + (args.max_steps - progress.steps - 1) * args.accumulate + 1)
    run.model.train()
    total_loss = torch.zeros((), device=run.device)
    finite_batches = torch.zeros((), device=run.device)  # of those since the last log line
    streak = torch.zeros((), device=run.device)  # consecutive non-finite losses
    worst = torch.zeros((), device=run.device)   # longest streak since the last check
    logged_batches = logged_tokens = 0
    pending = None  # summed loss of the batches since the last optimizer step
    stopping = False
    epoch_start = time.time() - progress.epoch_time
    log_start = last_save_time = time.time()
    last_save_step = progress.steps
    interval, unit = args.save_interval
    bar = progress_bar(run, (n - 1) * args.batch_size, f"epoch {progress.epoch + 1}")
    if bar:
        bar.update(progress.i * args.batch_size)
    while (progress.i < n - 2 and not (limit and progress.batch >= limit)
           and not (args.max_steps and progress.steps >= args.max_steps)):
        seq_len = sample_seq_len(run.rng, args.bptt)
        lr = lr_at(progress.epoch * nominal + progress.batch + 1, args.lr, args.warmup,
                   progress.epoch, args.when, args.cooldown, last_batch)
        x, y = get_batch(run.train_data, progress.i, seq_len)  # [T, B_local] each
        step = progress.batch % args.accumulate == 0  # steps after batches 0, N, 2N, ...
        loss, progress.hidden, progress.mems, pending = train_step(
            run, x, y, progress.hidden, progress.mems, pending, lr, step)
        tokens = x.shape[0] * args.batch_size
        progress.i += x.shape[0]
        progress.batch += 1
        progress.steps += step
        progress.tokens += tokens
        logged_batches += 1
        logged_tokens += tokens
        finite = torch.isfinite(loss)  # no host synchronisation until the log interval
        total_loss += torch.where(finite, loss, 0.0)
        finite_batches += finite
        streak = torch.where(finite, 0.0, streak + 1)
        worst = torch.maximum(worst, streak)
        if bar:
            bar.update(tokens)

        at_log = progress.batch % args.log_interval == 0
        if at_log:
            elapsed = time.time() - log_start
            loss_sum, finite_sum = all_sum(torch.stack([total_loss, finite_batches]), d).tolist()
            nonfinite = logged_batches * d.world - int(finite_sum)
            cur_loss = loss_sum / finite_sum if finite_sum else float("nan")  # finite ones
            ms = elapsed * 1000 / logged_batches
            run.log(f"| epoch {progress.epoch + 1:3d} | {progress.batch:5d}/{batches:5d} batches | "
                    f"lr {lr:05.5f} | ms/batch {ms:5.2f} | loss {cur_loss:5.2f} | "
                    f"ppl {safe_exp(cur_loss):8.2f} | bpc {cur_loss / LOG2:8.3f}"
                    + (f" | non-finite losses {nonfinite}" if nonfinite else ""))
            run.log.metrics(type="train", epoch=progress.epoch + 1, step=progress.steps,
                            batch=progress.batch, tokens=progress.tokens, lr=lr, loss=cur_loss,
                            bpc=cur_loss / LOG2, nonfinite=nonfinite, ms_per_batch=ms,
                            tokens_per_s=logged_tokens / max(elapsed, 1e-9), time=time.time())
            total_loss.zero_()
            finite_batches.zero_()
            logged_batches = logged_tokens = 0
            log_start = time.time()
        # After an optimizer step: stop, save and non-finite checks, decided by all ranks
        # together (under torchrun only at log intervals, to keep the step free of syncs).
        if not step or (d.world > 1 and not at_log):
            continue
        save_due = (time.time() - last_save_time >= 60 * interval if unit == "min"
                    else progress.steps - last_save_step >= interval)
        bad = worst.item() if at_log else 0.0
        stop_code, save_due, bad = agree(d, run.device, run.stop.code, float(save_due), bad)
        stopping = run.stop.decide(stop_code)
        if at_log:
            worst.zero_()
        if bad >= args.max_nonfinite:
            raise NonFinite(f"{int(bad)} consecutive non-finite losses at epoch "
                            f"{progress.epoch + 1}, batch {progress.batch}; stopping (try a "
                            f"lower --lr or --amp bf16)")
        if stopping or save_due:
            progress.epoch_time = time.time() - epoch_start
            ckpt.save_last(run, progress)
            last_save_time, last_save_step = time.time(), progress.steps
        if stopping:
            break
    if bar:
        bar.close()
    progress.epoch_time = time.time() - epoch_start
    return not stopping


def validate(run, progress):
    """Validation after an epoch: returns the loss, or None if stopped by a signal."""
    args = run.args
    bar = progress_bar(run, (run.val_data.shape[0] - 1) * eval_batch_size(args), "valid")
    with averaged_weights(run.model, run.optimizer):
        val_loss = evaluate(run.model, run.val_data, eval_batch_size(args), args.bptt, run.amp(),
                            run.d, max_batches=run.limit("eval"),
                            stop=run.stop if run.d.world == 1 else None, bar=bar)
        if bar:
            bar.close()
        if val_loss is None:
            return None
        run.log("-" * 89)
        run.log(f"| end of epoch {progress.epoch + 1:3d} | time: {progress.epoch_time:5.2f}s | "
                f"valid loss {val_loss:5.2f} | valid ppl {safe_exp(val_loss):8.2f} | "
                f"valid bpc {val_loss / LOG2:8.3f}" + run.dry_note(run.val_data))
        run.log("-" * 89)
        run.log.metrics(type="valid", epoch=progress.epoch + 1, step=progress.steps,
                        tokens=progress.tokens, valid_loss=val_loss, valid_bpc=val_loss / LOG2,
                        epoch_time=progress.epoch_time, time=time.time())
        if val_loss < progress.best_val and ckpt.save_best(run, progress, val_loss):
            progress.best_val = val_loss
    return val_loss


def end_of_epoch(run, progress, val_loss):
    """--when learning-rate drops and the switch to averaged SGD, then the next epoch."""
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
        run.optimizer = build_optimizer("asgd", run.model.parameters(), args)
    progress.epoch += 1
    progress.i = progress.batch = 0
    progress.hidden = progress.mems = None
    progress.epoch_time = 0.0


def train(run, progress):
    """Epochs of training and validation; returns how it ended: 'done', 'interrupt' or
    'terminate' (the last checkpoint is written in every case)."""
    epochs = DRY_RUN["epochs"] if run.args.dry_run else run.args.epochs
    while progress.epoch < epochs:
        if not train_epoch(run, progress):
            return run.stop.agreed
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


def report(run, kind, name, loss, source):
    """One result line: loss, perplexity and bits per character of `source`."""
    run.log(f"| {kind} | {name} loss {loss:5.2f} | {name} ppl {safe_exp(loss):8.2f} | "
            f"{name} bpc {loss / LOG2:8.3f}" + run.dry_note(source))


def test(run, progress):
    """Load the best checkpoint this run wrote (if any) and report test loss/ppl/bpc. A
    signal during the test (one process) stops it; the checkpoints are already written."""
    if progress.best_val < float("inf"):
        run.model.load_strict(ckpt.load_checkpoint(run.paths["save"])["model"])
    else:
        run.log("This run wrote no best checkpoint (no validation finished); testing the "
                "weights it ends with")
    run.stop.reason = None  # a Ctrl-C that ended training does not also stop the test
    bar = progress_bar(run, (run.test_data.shape[0] - 1) * TEST_BATCH_SIZE, "test")
    test_loss = evaluate(run.model, run.test_data, TEST_BATCH_SIZE, run.args.bptt, run.amp(),
                         run.d, max_batches=run.limit("eval"),
                         stop=run.stop if run.d.world == 1 else None, bar=bar)
    if bar:
        bar.close()
    if test_loss is None:
        run.log("The test was stopped by a signal; the checkpoints are written")
        return
    run.log("=" * 89)
    report(run, "End of training", "test", test_loss, run.test_data)
    run.log("=" * 89)
    run.log.metrics(type="test", test_loss=test_loss, test_bpc=test_loss / LOG2, time=time.time())
    if run.args.dynamic_eval:
        report_dynamic(run, run.test_data, TEST_BATCH_SIZE, "test")


def report_dynamic(run, source, bsz, name):
    args = run.args
    loss, _ = dynamic_evaluate(run.model, run.train_data, source, bsz, args.bptt, run.amp(),
                               args.dyn_lr, args.dyn_decay, args.dyn_eps, args.dyn_stat_batches,
                               max_batches=run.limit("eval"))
    report(run, "dynamic eval", name, loss, source)
    run.log.metrics(type=f"dynamic_{name}", loss=loss, bpc=loss / LOG2, time=time.time())


def eval_only(run):
    """--eval-only: valid and test of the resumed weights; nothing is trained or written."""
    for name, source, bsz in (("valid", run.val_data, eval_batch_size(run.args)),
                              ("test", run.test_data, TEST_BATCH_SIZE)):
        loss = evaluate(run.model, source, bsz, run.args.bptt, run.amp(), run.d,
                        max_batches=run.limit("eval"))
        report(run, "eval only", name, loss, source)
        if run.args.dynamic_eval:
            report_dynamic(run, source, bsz, name)


# --- setup -------------------------------------------------------------------------------

def setup(args, start, paths, stop):
    """Load data and weights, and build the Run and its Progress."""
    d, device = setup_distributed(pick_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    writes = not args.eval_only
    if args.dynamic_eval and d.world > 1:
        raise InputError("--dynamic-eval runs in one process; launch it without torchrun")
    if args.batch_size % d.world:
        raise InputError(f"--batch_size {args.batch_size} does not divide over {d.world} ranks")

    rng = np.random.RandomState(args.seed)  # sequence lengths: the same on every rank
    torch.manual_seed(args.seed)
    corpus = Corpus(args.data, unk=args.unk, cache=writes, write_later=True)
    if args.continue_from:
        ckpt.check_same_corpus(start, corpus.fingerprint, args)
    model, config = ckpt.model_for(args, start, corpus)
    model.to(device)
    model.set_checkpoint_activations(args.checkpoint_activations)
    if args.compile:
        model.compile_blocks()
    if d.world > 1:
        torch.manual_seed(args.seed + d.rank)  # distinct dropout masks per rank
    train_data, val_data, test_data = device_data(corpus, args, d, device)

    net = model
    if d.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=config["cutoffs"] is not None)
    progress = ckpt.progress_from(start, args, d, device)
    optimizer = build_optimizer(progress.optimizer_name, model.parameters(), args)
    scaler = make_scaler(device, args.amp)
    if args.continue_from:
        optimizer.load_state_dict(start["optimizer"])
        if start["scaler"]:
            scaler.load_state_dict(start["scaler"])
        ckpt.restore_rng(rng, start["rng"], d)

    if d.main:
        corpus.write_cache()  # every check has passed
    log = RunLog(paths["run_dir"] if writes else None, enabled=d.main,
                 append=bool(args.continue_from))
    if writes and d.main:  # the first start's flags and machine; each --continue adds a line
        flags, env = dict(vars(args), model=config), environment()
        if args.continue_from:
            append_json_line(os.path.join(paths["run_dir"], "continues.jsonl"),
                             {"time": time.time(), "args": flags, "env": env})
        else:
            write_json(os.path.join(paths["run_dir"], "args.json"), flags)
            write_json(os.path.join(paths["run_dir"], "env.json"), env)
    run = Run(args, model, net, optimizer, scaler, config, corpus.dictionary.idx2word,
              train_data, val_data, test_data, device, d, log, rng, stop, paths,
              corpus.fingerprint)
    return run, progress


def execute(run, progress, notes):
    """Evaluate only, or train then test; returns the exit code."""
    args, config = run.args, run.config
    for note in notes:
        run.log(note)
    nparams = sum(p.numel() for p in run.model.parameters())
    run.log(f"Model: {nparams:,} parameters, attention in blocks {config['attn_layers']}, "
            f"{config['ntoken']} tokens, device {run.device}"
            + (f", threads {torch.get_num_threads()}" if run.device.type == "cpu" else "")
            + (f" x {run.d.world} ranks" if run.d.world > 1 else "")
            + f", amp {amp_mode(run.device, args.amp)}")
    default_dir = os.path.splitext(args.save)[0] + ".run"
    if not args.continue_from and not args.dry_run and run.paths["run_dir"] != default_dir:
        run.log(f"Run records in {run.paths['run_dir']} ({default_dir} holds an earlier run)")
    if run.stop.agree(run.d, run.device):
        run.log("Stopped by a signal during start-up; nothing was trained")
        return 0
    if args.eval_only:
        eval_only(run)
        return 0
    try:
        ended = train(run, progress)
    except NonFinite as e:
        run.log(f"error: {e}")
        ckpt.save_last(run, progress)
        return 1
    if ended == "terminate":
        run.log(f"Stopped by SIGTERM; continue with --continue {run.paths['last']}")
        return 0
    if ended == "interrupt":
        run.log("-" * 89)
        run.log("Exiting from training early")
    test(run, progress)
    if ended == "interrupt":
        run.log(f"Stopped by Ctrl-C; continue with --continue {run.paths['last']}")
    return 0


def main(argv=None):
    tmp = lock = None
    stop = Stop()  # from the first moment: a signal at any phase ends the run cleanly
    try:
        with stop:
            args, start, notes = ckpt.resolve_flags(argv)
            tmp = tempfile.mkdtemp(prefix="sharnn-dry-run-") if args.dry_run else None
            paths = outputs.plan(args, tmp)
            if not args.eval_only and os.environ.get("RANK", "0") == "0":  # rank 0 writes
                lock = outputs.claim(args, paths, tmp)
            run, progress = setup(args, start, paths, stop)
            try:
                code = execute(run, progress, notes)
            finally:
                run.log.close()
            if dist.is_initialized():
                dist.barrier()  # no rank tears the group down while another still talks to it
            return code
    except InputError as e:
        if os.environ.get("RANK", "0") == "0":  # once under torchrun
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if lock:
            lock.release()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
