"""The training step under DistributedDataParallel, in two CPU ranks (gloo) started by
torch.multiprocessing: with the adaptive softmax (find_unused_parameters) it takes the
step one process takes on the same global batch."""

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import CPU, tiny_model
from runtime import Dist
from training import Carry, distributed, make_step, train_step

ARGS = argparse.Namespace(optimizer="lamb", lr=1e-2, wdecay=1e-6, clip=0.25, amp="none")
STEPS = 3


# Targets only below 10: the last cluster gets no gradient, as a batch of frequent words.
ADAPTIVE = dict(ntoken=20, attn_layers=[1], mem_len=16, cutoffs=[5, 10])


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 10, (8, 4), generator=gen), torch.randint(0, 10, (8, 4), generator=gen))
            for _ in range(STEPS)]


def train(step, columns):
    carry = Carry()
    for x, y in batches():
        train_step(step, carry, x[:, columns], y[:, columns], ARGS.lr, True)
    return {k: v.detach().clone() for k, v in step.model.state_dict().items()}


def rank_main(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = tiny_model(**ADAPTIVE)
        step = make_step(model, ARGS, CPU, net=distributed(model, CPU))
        torch.save(train(step, Dist(rank, 2).share(4)), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_the_adaptive_softmax_take_the_single_process_step(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    model = tiny_model(**ADAPTIVE)
    one = train(make_step(model, ARGS, CPU), slice(0, 4))
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert weights.keys() == one.keys()
        for key, value in one.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-6, msg=key)
    start = tiny_model(**ADAPTIVE).state_dict()
    assert not torch.equal(one["adaptive.head.weight"], start["adaptive.head.weight"])
    assert torch.equal(one["adaptive.tail.1.1.weight"], start["adaptive.tail.1.1.weight"])
