"""LAMB against a step computed by hand (docs/model.md, LAMB)."""

import copy
import math

import pytest
import torch

from lamb import Lamb


def hand_step(p, g, m, v, lr, b1=0.9, b2=0.999, eps=1e-6, wd=0.0, min_trust=None):
    """One LAMB step on plain Python lists, written from docs/model.md."""
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    u = [mi / (math.sqrt(vi) + eps) + wd * pi for mi, vi, pi in zip(m, v, p)]
    w = min(math.sqrt(sum(x * x for x in p)), 10.0)
    a = math.sqrt(sum(x * x for x in u))
    r = 1.0 if w == 0 or a == 0 else w / a
    if min_trust is not None:
        r = max(r, min_trust)
    return [pi - lr * r * ui for pi, ui in zip(p, u)], m, v, r


CASES = {
    "plain": ([0.5, -1.0, 2.0], [0.1, 0.2, -0.3], dict()),
    "weight decay": ([0.5, -1.0, 2.0], [0.1, 0.2, -0.3], dict(wd=0.01)),
    "zero-norm parameter": ([0.0, 0.0, 0.0], [0.1, -0.2, 0.3], dict()),
    "zero update": ([0.3, 0.4, 0.0], [0.0, 0.0, 0.0], dict()),
    "weight norm above 10": ([30.0, -40.0, 0.0], [1e-3, 2e-3, -4e-3], dict(wd=1e-3)),
    "min_trust binding": ([0.01, 0.02, -0.01], [1.0, -2.0, 3.0], dict(min_trust=0.25)),
    "min_trust not binding": ([3.0, 4.0, -1.0], [0.1, -0.2, 0.3], dict(min_trust=0.25)),
}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_two_steps_match_hand_computation(case, foreach):
    p0, g, kw = CASES[case]
    lr = 0.05
    param = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = Lamb([param], lr=lr, weight_decay=kw.get("wd", 0.0), min_trust=kw.get("min_trust"),
               foreach=foreach)
    p, m, v = list(p0), [0.0] * 3, [0.0] * 3
    trusts = []
    for step in range(2):
        grad = [gi * (1 + step) for gi in g]
        param.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        p, m, v, r = hand_step(p, grad, m, v, lr, **kw)
        trusts.append(r)
        torch.testing.assert_close(param.detach(), torch.tensor(p, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[param]["exp_avg"], torch.tensor(m, dtype=torch.float64))
        torch.testing.assert_close(opt.state[param]["exp_avg_sq"], torch.tensor(v, dtype=torch.float64))
    if case == "min_trust binding":
        assert trusts[0] == 0.25
    if case == "min_trust not binding":
        assert trusts[0] > 0.25
    if case in ("zero-norm parameter", "zero update"):
        assert trusts[0] == 1.0
    if case == "zero update":
        assert p == p0


def make_params(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(4, 3, requires_grad=True), torch.zeros(5, requires_grad=True),
            torch.randn(2, requires_grad=True)]


def run(opt, params, steps, seed):
    torch.manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


def test_foreach_equals_per_tensor_loop():
    a, b = make_params(), make_params()
    run(Lamb(a, lr=0.01, weight_decay=1e-3, min_trust=0.25, foreach=False), a, 5, seed=3)
    run(Lamb(b, lr=0.01, weight_decay=1e-3, min_trust=0.25, foreach=True), b, 5, seed=3)
    for x, y in zip(a, b):  # bit-exact on CPU
        assert torch.equal(x, y)


def test_state_dict_round_trip_continues_identically():
    params = make_params()
    opt = Lamb(params, lr=0.01, weight_decay=1e-3, min_trust=0.25)
    run(opt, params, 3, seed=1)
    saved_params = [p.detach().clone().requires_grad_() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, 3, seed=2)

    restored = Lamb(saved_params, lr=0.5)  # hyper-parameters come back from the state_dict
    restored.load_state_dict(saved_state)
    assert restored.param_groups[0]["lr"] == 0.01 and restored.param_groups[0]["min_trust"] == 0.25
    run(restored, saved_params, 3, seed=2)
    for x, y in zip(params, saved_params):
        assert torch.equal(x, y)


def test_per_group_hyper_parameters():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = Lamb([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.0}])
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and not torch.equal(a, torch.ones(3))


def test_found_inf_skips_the_step_exactly():
    params = make_params()
    opt = Lamb(params, lr=0.01, weight_decay=1e-3)
    run(opt, params, 2, seed=4)
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.found_inf
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], state[i]["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], state[i]["exp_avg_sq"])


def test_grad_scaler_integration_skips_overflow_and_steps_otherwise():
    params = make_params()
    reference = [p.detach().clone().requires_grad_() for p in params]
    opt = Lamb(params, lr=0.01)
    ref_opt = Lamb(reference, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for overflow in (True, False):
        opt.zero_grad()
        scaler.scale(sum(0.5 * p.sum() for p in params)).backward()
        for r in reference:
            r.grad = torch.full_like(r, 0.5)
        if overflow:
            params[0].grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if not overflow:
            ref_opt.step()
        for p, r in zip(params, reference):
            torch.testing.assert_close(p, r, rtol=0, atol=0)
    assert scaler.get_scale() == 2.0  # backed off once


def test_step_never_reads_tensor_values_on_the_host(monkeypatch):
    params = make_params()
    opt = Lamb(params, lr=0.01, weight_decay=1e-3, min_trust=0.25)
    for p in params:
        p.grad = torch.randn_like(p)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside Lamb.step")

    for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    opt.found_inf = torch.tensor(0.0)
    opt.step()


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="learning rate"):
        Lamb([torch.zeros(1, requires_grad=True)], lr=-1)
    with pytest.raises(ValueError, match="min_trust"):
        Lamb([torch.zeros(1, requires_grad=True)], min_trust=2.0)
