"""The fast paths compute what the plain paths compute (issue: speed), on the CPU."""

import pytest
import torch

from conftest import perturb
from model import SHARNN


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(ntoken=13, ninp=16, nhid=32, nlayers=3, attn_layers=[0, 2], mem_len=24)
    cfg.update(kw)
    return perturb(SHARNN(**cfg))


def test_mask_is_built_once_and_sliced():
    model = tiny()
    model.causal_mask(10, 14, torch.device("cpu"))
    base = model._mask
    for T, m in [(10, 14), (3, 0), (7, 14), (1, 5), (10, 0)]:
        mask = model.causal_mask(T, m, torch.device("cpu"))
        expected = torch.ones(T, m + T, dtype=torch.bool).tril(diagonal=m)
        assert torch.equal(mask, expected), (T, m)
        assert model._mask is base  # no new mask for smaller requests
        sliced = mask.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        assert sliced, (T, m)  # a view into the cached mask, not a copy
    model.causal_mask(12, 20, torch.device("cpu"))
    assert model._mask is not base and model._mask.shape == (12, 32)


def grads_after_step(model, x, y, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    out, hidden, mems = model(x)
    out2, _, _ = model(x, hidden, mems)
    (model.loss(out, y).mean() + model.loss(out2, y).mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_identical_gradients_with_dropout():
    model = tiny(dropout=0.2, dropouth=0.2, dropouti=0.2).train()
    x, y = torch.randint(0, 13, (9, 3)), torch.randint(0, 13, (9, 3))
    plain = grads_after_step(model, x, y, seed=3)
    model.set_checkpoint_activations(True)
    checkpointed = grads_after_step(model, x, y, seed=3)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    model = tiny().eval()
    x = torch.randint(0, 13, (7, 2))
    with torch.no_grad():
        eager, hidden, mems = model(x)
        eager2 = model(x[:5], hidden, mems)[0]
        model.compile_blocks()
        compiled, hidden, mems = model(x)
        compiled2 = model(x[:5], hidden, mems)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled2, eager2, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(tiny().state_dict())  # names unchanged
