"""LAMB (You et al. 2019) in the "minimum trust" variant used by SHA-RNN (docs/model.md, LAMB).

For each parameter p with gradient g:
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2           (no bias correction)
    u = m / (sqrt(v) + eps) + weight_decay * p
    r = min(||p||, 10) / ||u||, or 1 when either norm is 0;  r = max(r, min_trust)
    p = p - lr r u

The step never waits on the host: the trust ratio is computed with tensor ops
(`torch.where`, `clamp`), never `.item()` or a Python `if` on a tensor value.

Mixed precision: with `torch.amp.GradScaler` the optimizer handles the scaler's
`found_inf` flag itself (`_step_supports_amp_scaling`), so an fp16 overflow step is
skipped exactly (m, v and p unchanged) without a host synchronisation.
"""

import torch

MAX_WEIGHT_NORM = 10.0


class Lamb(torch.optim.Optimizer):
    """LAMB with no bias correction, weight norm clamped to 10 and an optional floor on the
    trust ratio (`min_trust`; the paper uses 0.25). Hyper-parameters live in the param
    groups. `foreach` (default: on CUDA) uses the multi-tensor kernels; it computes the
    same update as the per-tensor loop."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 min_trust=None, foreach=None):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if min_trust is not None and not 0.0 <= min_trust <= 1.0:
            raise ValueError(f"invalid min_trust: {min_trust}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        min_trust=min_trust, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by GradScaler.step() (see _step_supports_amp_scaling); grad_scale is None
        # when the gradients were already unscaled (unscale_ before clipping).
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            update = _multi_tensor_lamb if foreach else _single_tensor_lamb
            update(params, [self.state[p]["exp_avg"] for p in params],
                   [self.state[p]["exp_avg_sq"] for p in params], group, found_inf, grad_scale)
        return loss


def _coefficients(group, found_inf, device):
    """(b1, b2, lr factor) as numbers, or as 0-d tensors that turn the update into the
    identity when found_inf is set (m * 1 + 0, v * 1 + 0, p + 0 * u)."""
    b1, b2 = group["betas"]
    if found_inf is None:
        return b1, b2, None
    skip = found_inf.to(device) > 0
    one = torch.ones((), device=device)
    return torch.where(skip, one, b1), torch.where(skip, one, b2), (~skip).float()


def _trust(weight_norm, update_norm, min_trust):
    """Trust ratio min(||p||, 10) / ||u||, 1 when either norm is 0, floored at min_trust."""
    w = weight_norm.clamp(0.0, MAX_WEIGHT_NORM)
    ok = (w > 0) & (update_norm > 0)
    r = torch.where(ok, w / torch.where(ok, update_norm, 1.0), 1.0)
    return r if min_trust is None else r.clamp(min=min_trust)


def _grad(p, found_inf, grad_scale):
    g = p.grad
    if grad_scale is not None:
        g = g / grad_scale.to(g.device)
    if found_inf is not None:
        g = torch.where(found_inf.to(g.device) > 0, 0.0, g)
    return g


def _single_tensor_lamb(params, exp_avgs, exp_avg_sqs, group, found_inf, grad_scale):
    beta1, beta2 = group["betas"]
    eps, wd, lr = group["eps"], group["weight_decay"], group["lr"]
    b1, b2, keep = _coefficients(group, found_inf, params[0].device)
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
        g = _grad(p, found_inf, grad_scale)
        m.mul_(b1).add_(g, alpha=1 - beta1)
        v.mul_(b2).addcmul_(g, g, value=1 - beta2)
        u = m / v.sqrt().add_(eps)
        if wd != 0:
            u.add_(p, alpha=wd)
        r = _trust(torch.linalg.vector_norm(p), torch.linalg.vector_norm(u), group["min_trust"])
        scale = -lr * r if keep is None else -lr * r * keep
        p.add_(u * scale)


def _multi_tensor_lamb(params, exp_avgs, exp_avg_sqs, group, found_inf, grad_scale):
    beta1, beta2 = group["betas"]
    eps, wd, lr = group["eps"], group["weight_decay"], group["lr"]
    b1, b2, keep = _coefficients(group, found_inf, params[0].device)
    grads = [_grad(p, found_inf, grad_scale) for p in params]
    torch._foreach_mul_(exp_avgs, b1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)  # u = m / (sqrt(v) + eps)
    if wd != 0:
        torch._foreach_add_(updates, params, alpha=wd)
    r = _trust(torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(updates)),
               group["min_trust"])
    scale = -lr * r if keep is None else -lr * r * keep
    torch._foreach_mul_(updates, list(scale.unbind()))
    torch._foreach_add_(params, updates)
