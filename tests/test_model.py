"""model.py: the SHA-RNN against docs/model.md (Model): sizes, init, numerics, carried state
(and the gradient through it), loading the original's weights, the dropouts, the float32
paths under mixed precision, and the fast paths (the cached mask, activation checkpointing,
compiled blocks) that compute what the plain ones compute."""

import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from conftest import CPU, perturb, tiny_model
from model import SHARNN, attn_layers_in, lstm_dtype
from runtime import autocast


def float64_model(**kw):
    """conftest's tiny model at these sizes in float64, with non-trivial gates and
    LayerNorms so that every term of the computation matters; eval mode."""
    cfg = dict(ntoken=11, ninp=8, nhid=16, nlayers=3)
    cfg.update(kw)
    return perturb(tiny_model(**cfg).double()).eval()


# --- sizes and initialisation ------------------------------------------------------------

def test_paper_parameter_counts():
    assert sum(p.numel() for p in SHARNN(205, 1024, 4096, 4).parameters()) == 53_773_517
    every = SHARNN(205, 1024, 4096, 4, attn_layers=range(4))
    assert sum(p.numel() for p in every.parameters()) == 63_247_565


def test_initialisation():
    torch.manual_seed(1)
    model = SHARNN(205, 1024, 4096, 4)
    for name, p in model.named_parameters():
        if ".ln" in name or ".qln" in name:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.equal(p, torch.full_like(p, expected)), name
        if name.endswith((".qs", ".ks", ".vs")):
            assert torch.equal(p, torch.zeros(1, 1, 1024)), name
        if name.endswith("bias") and ".rnn." not in name and ".ln" not in name:
            assert torch.equal(p, torch.zeros_like(p)), name
    assert model.decoder.weight is model.encoder.weight
    assert abs(model.encoder.weight.std().item() - 0.1 / math.sqrt(1024)) < 0.02 * 0.003125
    assert abs(model.blocks[0].ff.linear1.weight.std().item() - 0.003125) < 0.01 * 0.003125
    # LSTMs keep PyTorch's default U(-1/sqrt(H), 1/sqrt(H)), far wider than the normal init.
    w = model.blocks[0].rnn.weight_hh_l0
    assert w.abs().max().item() <= 1 / 32 and w.std().item() > 0.015


def test_parameter_names_follow_the_original():
    names = set(float64_model(nlayers=4).state_dict())
    assert {"encoder.weight", "decoder.weight", "decoder.bias", "blocks.2.attn.qs",
            "blocks.2.attn.vq.l1.weight", "blocks.2.attn.qln.bias", "blocks.2.lnmem.weight",
            "blocks.0.rnn.weight_hh_l0", "blocks.3.ff.linear1.bias", "blocks.1.lnxff.bias"} <= names
    assert not any(".lnout." in n or "qkvs" in n or "r_gate" in n for n in names)
    assert not any(n.startswith(("blocks.0.lnmid", "blocks.0.attn", "blocks.3.lnmem")) for n in names)
    assert attn_layers_in(float64_model(nlayers=4).state_dict()) == [2]


@pytest.mark.parametrize("kw, message", [
    (dict(attn_layers=[3]), "out of range"),
    (dict(attn_layers=[-1]), "out of range"),
    (dict(heads=3), "divisible by heads"),
    (dict(nhid=12), "multiple of ninp"),
    (dict(ninp=-8), "positive"),
    (dict(mem_len=-1), "mem_len"),
    (dict(dropouth=1.0), "dropouth"),
    (dict(cutoffs=[5, 3]), "cutoffs"),
])
def test_impossible_configs_raise(kw, message):
    cfg = dict(ntoken=11, ninp=8, nhid=16, nlayers=3)
    cfg.update(kw)
    with pytest.raises(ValueError, match=message):
        tiny_model(**cfg)


# --- numerics against an independent reference computation ------------------------------

def reference(model, x, hidden=None, mems=None):
    """docs/model.md (Model) written out directly from the state_dict, in float64."""
    sd = model.state_dict()
    E, M = model.ninp, model.mem_len
    T = x.shape[0]
    ln = lambda z, name: F.layer_norm(z, (E,), sd[name + ".weight"], sd[name + ".bias"], 1e-12)
    h = sd["encoder.weight"][x]
    if mems is not None:
        mems = [None if m is None else m[max(len(m) - (M - T), 0):] for m in mems]
    out_hidden, out_mems = [], []
    for i in range(model.nlayers):
        p = f"blocks.{i}."
        h = ln(h, p + "lnstart")
        hx, cx = (torch.zeros(x.shape[1], E, dtype=h.dtype),) * 2 if hidden is None else \
            (hidden[i][0][0], hidden[i][1][0])
        outs = []
        for t in range(T):
            gates = (h[t] @ sd[p + "rnn.weight_ih_l0"].T + sd[p + "rnn.bias_ih_l0"]
                     + hx @ sd[p + "rnn.weight_hh_l0"].T + sd[p + "rnn.bias_hh_l0"])
            gi, gf, gg, go = gates.chunk(4, dim=-1)
            cx = torch.sigmoid(gf) * cx + torch.sigmoid(gi) * torch.tanh(gg)
            hx = torch.sigmoid(go) * torch.tanh(cx)
            outs.append(hx)
        h = torch.stack(outs)
        out_hidden.append((hx[None], cx[None]))
        mem_out = None
        if p + "attn.qs" in sd:
            mh, h = ln(h, p + "lnmem"), ln(h, p + "lnmid")
            mem = None if mems is None else mems[i]
            big = mh if mem is None else torch.cat([mem, mh])
            mem_out = big[-M:]
            m = big.shape[0] - T
            mask = torch.zeros(T, m + T, dtype=h.dtype)
            for t in range(T):
                mask[t, m + t + 1:] = float("-inf")
            qs, ks = torch.sigmoid(sd[p + "attn.qs"]), torch.sigmoid(sd[p + "attn.ks"])
            c, f = (torch.sigmoid(sd[p + "attn.vs"]) @ sd[p + "attn.vq.l1.weight"].T
                    + sd[p + "attn.vq.l1.bias"]).split(E, dim=-1)
            vs = torch.sigmoid(f) * torch.tanh(c)
            q = ln(h @ sd[p + "attn.q.weight"].T + sd[p + "attn.q.bias"], p + "attn.qln") * qs
            k, v = big * ks, big * vs
            H, D = model.heads, E // model.heads
            mix = torch.empty_like(h)
            for b in range(h.shape[1]):
                for j in range(H):
                    sl = slice(j * D, (j + 1) * D)
                    scores = q[:, b, sl] @ k[:, b, sl].T / math.sqrt(D) + mask
                    mix[:, b, sl] = torch.softmax(scores, dim=-1) @ v[:, b, sl]
            h = h + mix
        out_mems.append(mem_out)
        hn, z = ln(h, p + "lnff"), ln(h, p + "lnxff")
        y = z @ sd[p + "ff.linear1.weight"].T + sd[p + "ff.linear1.bias"]
        y = y * torch.sigmoid(1.702 * y)
        h = hn + sum(y.split(E, dim=-1))
    return h, out_hidden, out_mems


@pytest.mark.parametrize("kw", [dict(), dict(attn_layers=[0, 1, 2], heads=2), dict(sdpa=False)])
def test_forward_matches_reference(kw):
    model = float64_model(mem_len=9, **kw)
    x = torch.randint(0, 11, (6, 3))
    out, hid, mems = model(x)
    ref, ref_hid, ref_mems = reference(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    x2 = torch.randint(0, 11, (5, 3))  # second chunk: memory is cut to 9 - 5 = 4 positions
    out2, _, mems2 = model(x2, hid, mems)
    ref2, _, ref_mems2 = reference(model, x2, ref_hid, ref_mems)
    torch.testing.assert_close(out2, ref2, rtol=1e-10, atol=1e-10)
    for m, r in zip(mems2, ref_mems2):
        assert (m is None) == (r is None)
        if m is not None:
            torch.testing.assert_close(m, r, rtol=1e-10, atol=1e-10)
    logits = model.decoder(out2)
    torch.testing.assert_close(logits, out2 @ model.encoder.weight.T + model.decoder.bias)


def test_sdpa_equals_plain_attention():
    model = float64_model(attn_layers=[0, 2], heads=2)
    plain = float64_model(attn_layers=[0, 2], heads=2, sdpa=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, 11, (7, 2))
    a, hid, mems = model(x)
    b, hid_b, mems_b = plain(x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x, hid, mems)[0], plain(x, hid_b, mems_b)[0],
                               rtol=1e-12, atol=1e-12)


def test_loss_is_full_softmax_cross_entropy():
    model = float64_model()
    x, y = torch.randint(0, 11, (4, 2)), torch.randint(0, 11, (4, 2))
    out = model(x)[0]
    logp = torch.log_softmax(out @ model.encoder.weight.T + model.decoder.bias, dim=-1)
    expected = -logp.gather(-1, y[..., None]).reshape(-1)
    torch.testing.assert_close(model.loss(out, y), expected.float())
    torch.testing.assert_close(model.log_probs(out.reshape(-1, 8)), logp.reshape(-1, 11).float())


# --- carried state, causality, memory cap ----------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(attn_layers=[0, 1, 2], heads=2)])
def test_two_chunks_equal_whole_sequence(kw):
    model = float64_model(mem_len=50, **kw)
    x = torch.randint(0, 11, (23, 4))
    whole, whole_hidden, whole_mems = model(x)
    a, hidden, mems = model(x[:9])
    b, hidden, mems = model(x[9:], hidden, mems)
    torch.testing.assert_close(torch.cat([a, b]), whole, rtol=1e-10, atol=1e-10)
    for (h1, c1), (h2, c2) in zip(hidden, whole_hidden):
        torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(c1, c2, rtol=1e-10, atol=1e-10)
    for m1, m2 in zip(mems, whole_mems):
        assert (m1 is None) == (m2 is None)
        if m1 is not None:
            torch.testing.assert_close(m1, m2, rtol=1e-10, atol=1e-10)


def test_causality():
    model = float64_model(attn_layers=[0, 1, 2], mem_len=30)
    x = torch.randint(0, 11, (12, 2))
    prime = torch.randint(0, 11, (6, 2))
    _, hidden, mems = model(prime)
    base = model(x, hidden, mems)[0]
    for t in (0, 5, 11):
        changed = x.clone()
        changed[t] = (changed[t] + 1) % 11
        out = model(changed, hidden, mems)[0]
        torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=0)
        assert not torch.allclose(out[t], base[t])


def test_memory_keeps_exactly_the_last_mem_len_positions():
    model = float64_model(mem_len=12, attn_layers=[0, 2])
    captured = []
    model.blocks[2].lnmem.register_forward_hook(lambda mod, inp, out: captured.append(out))
    x = torch.randint(0, 11, (40, 2))
    hidden = mems = None
    memory = torch.zeros(0, 2, 8, dtype=torch.float64)  # what block 2 should hold
    for start, T in [(0, 5), (5, 5), (10, 5), (15, 8), (23, 17)]:
        _, hidden, mems = model(x[start:start + T], hidden, mems)
        # The incoming memory is cut to its last mem_len - T positions, the T new LN_mem
        # outputs are appended, and the block keeps the last mem_len of those.
        kept = memory[len(memory) - min(len(memory), max(12 - T, 0)):]
        memory = torch.cat([kept, captured[-1]])[-12:]
        assert mems[2].shape == memory.shape
        torch.testing.assert_close(mems[2], memory, rtol=0, atol=0)
        assert mems[1] is None and mems[0].shape == memory.shape
    assert len(memory) == 12


def test_mem_len_zero_carries_no_memory():
    model = float64_model(mem_len=0)
    x = torch.randint(0, 11, (10, 2))
    out1, hidden, mems = model(x[:4])
    assert all(m is None for m in mems)
    out2 = model(x[4:], hidden, mems)[0]
    # Same as attention restricted to the current chunk: only the LSTM state carries over.
    fresh = float64_model(mem_len=50)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(out2, fresh(x[4:], hidden, None)[0], rtol=1e-12, atol=1e-12)


def test_accumulated_group_gradient_flows_through_the_carried_state():
    """The summed loss of a group backpropagates into the first batch through the state
    it hands to the second: the group gradient differs from the sum of detached gradients."""
    model = perturb(tiny_model(10, 8, 16, attn_layers=[0], mem_len=12))
    data = torch.randint(0, 10, (20, 2))
    x1, y1, x2, y2 = data[:8], data[1:9], data[8:16], data[9:17]

    out, hidden, mems = model(x1)
    loss = model.loss(out, y1).mean()
    out, _, _ = model(x2, hidden, mems)
    (loss + model.loss(out, y2).mean()).backward()
    joint = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    out, hidden, mems = model(x1)
    model.loss(out, y1).mean().backward()
    hidden = [tuple(t.detach() for t in h) for h in hidden]
    mems = [None if m is None else m.detach() for m in mems]
    out, _, _ = model(x2, hidden, mems)
    model.loss(out, y2).mean().backward()
    detached = [p.grad for p in model.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(joint, detached))


# --- loading weights written by the original code ---------------------------------------

def original_style(model):
    """The state_dict the original code writes: plus the keys it declared but never used."""
    sd = dict(model.state_dict())
    E = model.ninp
    for i, block in enumerate(model.blocks):
        sd[f"blocks.{i}.lnout.weight"], sd[f"blocks.{i}.lnout.bias"] = torch.ones(E), torch.zeros(E)
        if block.attn is None:
            for ln in ("lnmid", "lnmem"):
                sd[f"blocks.{i}.{ln}.weight"], sd[f"blocks.{i}.{ln}.bias"] = torch.ones(E), torch.zeros(E)
        else:
            sd[f"blocks.{i}.attn.qkvs"] = torch.zeros(1, 3, E)
            sd[f"blocks.{i}.attn.r_gate"] = torch.ones(1, 1, E)
    return sd


def test_load_original_state_dict():
    source = float64_model()
    target = tiny_model(11, 8, 16, 3).double().eval()
    target.load_original_state_dict(original_style(source))
    x = torch.randint(0, 11, (5, 2))
    torch.testing.assert_close(target(x)[0], source(x)[0], rtol=0, atol=0)
    assert target.decoder.weight is target.encoder.weight


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.__setitem__("blocks.0.ff.linear1.bias", torch.zeros(17)), r"shape \(17,\)"),
    (lambda sd: sd.__setitem__("blocks.0.surprise", torch.zeros(1)), "unexpected blocks.0.surprise"),
    (lambda sd: sd.pop("blocks.1.attn.q.weight"), "missing blocks.1.attn.q.weight"),
    (lambda sd: sd.__setitem__("blocks.0.attn.qs", torch.zeros(1, 1, 8)), r"attention in blocks \[0, 1\]"),
])
def test_load_original_state_dict_fails_loudly(change, message):
    sd = original_style(float64_model())
    change(sd)
    with pytest.raises(ValueError, match=message):
        tiny_model(11, 8, 16, 3).load_original_state_dict(sd)


# --- dropouts ----------------------------------------------------------------------------

def test_dropouts_set_after_building_give_the_model_built_with_them():
    rates = dict(dropout=0.1, dropouth=0.2, dropouti=0.3, dropoute=0.1, wdrop=0.2)
    built = tiny_model(20, attn_layers=[0, 1], mem_len=12, seed=3, **rates).train()
    changed = tiny_model(20, attn_layers=[0, 1], mem_len=12, seed=3).train()
    changed.set_dropouts(**rates)
    x = torch.randint(0, 20, (9, 3))
    torch.manual_seed(4)
    a, _, _ = built(x)
    torch.manual_seed(4)
    b, _, _ = changed(x)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        changed.set_dropouts(1.0, 0, 0, 0, 0)


def test_weight_drop_masks_change_per_batch_and_vanish_in_eval():
    model = tiny_model(11, 8, 16, wdrop=0.5)
    plain = tiny_model(11, 8, 16, seed=None)
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, 11, (6, 3))
    model.train()
    a, b = model(x)[0], model(x)[0]
    assert not torch.allclose(a, b)  # a fresh mask per batch
    w = model.blocks[0].rnn.weight_hh_l0
    before = w.detach().clone()
    a.sum().backward()
    assert torch.equal(w, before)  # the parameter itself is never overwritten
    zero = (w.grad == 0).float().mean().item()
    assert 0.3 < zero < 0.7  # dropped connections get no gradient
    model.eval()
    torch.testing.assert_close(model(x)[0], plain.eval()(x)[0], rtol=0, atol=0)


def test_embedding_dropout_drops_whole_rows_in_training_only():
    model = tiny_model(50, 8, 16, dropoute=0.5).train()
    x = torch.arange(50).view(50, 1)
    e = model.embed(x)  # [50, 1, 8]
    dropped = (e == 0).all(dim=-1).float().mean().item()
    assert 0.3 < dropped < 0.7
    kept = ~(e == 0).all(dim=-1)
    torch.testing.assert_close(e[kept], 2 * model.encoder.weight[x][kept])
    model.eval()
    torch.testing.assert_close(model.embed(x), model.encoder.weight[x])


# --- mixed precision, on the CPU ---------------------------------------------------------

AMP_SIZES = dict(ntoken=13, ninp=8, nhid=16, attn_layers=[0], mem_len=12)


def test_float32_paths_hold_under_autocast():
    """The attention's query path and the loss run in float32 under bf16 and fp16 autocast,
    and on the CPU an fp16 LSTM runs in float32 (no kernel) while bf16 stays bf16."""
    model = perturb(tiny_model(**AMP_SIZES))
    block = model.blocks[0]
    seen = {}
    block.attn.qln.register_forward_hook(lambda m, i, o: seen.__setitem__("query", o.dtype))
    block.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o.dtype))
    block.rnn.register_forward_hook(lambda m, i, o: seen.__setitem__("lstm", o[0].dtype))
    x = torch.randint(0, 13, (6, 2))
    for amp, low, lstm in (("bf16", torch.bfloat16, torch.bfloat16),
                           ("fp16", torch.float16, torch.float32)):
        with autocast(CPU, amp):
            out, _, _ = model(x)
            loss = model.loss(out, x)
        assert seen["query"] == torch.float32, amp
        assert seen["attn"] == low, amp  # the rest of the attention is in the low precision
        assert seen["lstm"] == lstm, amp
        assert loss.dtype == torch.float32, amp
        loss.mean().backward()


def test_the_carried_state_takes_the_precision_of_the_run():
    """A state carried in any precision continues in the dtypes a run from no state has,
    under every --amp."""
    model = perturb(tiny_model(**AMP_SIZES))
    x = torch.randint(0, 13, (6, 2))
    for amp in ("none", "bf16", "fp16"):
        with autocast(CPU, amp):
            _, fresh_hidden, fresh_mems = model(x)
        want = [t.dtype for h in fresh_hidden for t in h] + [m.dtype for m in fresh_mems if m is not None]
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            hidden = [tuple(t.to(dtype) for t in h) for h in fresh_hidden]
            mems = [None if m is None else m.to(dtype) for m in fresh_mems]
            with autocast(CPU, amp):
                _, hidden, mems = model(x, hidden, mems)
            got = [t.dtype for h in hidden for t in h] + [m.dtype for m in mems if m is not None]
            assert got == want, (amp, dtype)


def test_one_table_decides_the_lstm_dtype():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    table = {("cpu", None): f32, ("cpu", f16): f32, ("cpu", bf16): bf16,
             ("cuda", None): f32, ("cuda", f16): f16, ("cuda", bf16): f32}
    assert {key: lstm_dtype(*key) for key in table} == table


def test_where_the_table_says_float32_under_autocast_the_lstm_runs_in_float32(monkeypatch):
    """The path CUDA bf16 takes (autocast would run the cuDNN LSTM in float16), on the CPU:
    the LSTMs run in float32 with autocast off, the rest in bf16, and gradients flow."""
    model = perturb(tiny_model(**AMP_SIZES))
    seen = {}
    model.blocks[0].rnn.register_forward_hook(lambda m, i, o: seen.__setitem__("lstm", o[0].dtype))
    model.blocks[0].ff.register_forward_hook(lambda m, i, o: seen.__setitem__("ff", o.dtype))
    x = torch.randint(0, 13, (6, 2))
    monkeypatch.setattr(model_module, "lstm_dtype", lambda device, amp: torch.float32)
    with autocast(CPU, "bf16"):
        out, hidden, _ = model(x)
        loss = model.loss(out, x).mean()
    assert seen == {"lstm": torch.float32, "ff": torch.bfloat16}
    assert hidden[0][0].dtype == torch.float32
    loss.backward()
    assert model.blocks[0].rnn.weight_hh_l0.grad.abs().sum() > 0


# --- fast paths: the cached mask, activation checkpointing, compiled blocks --------------

FAST_SIZES = dict(ntoken=13, nlayers=3, attn_layers=[0, 2], mem_len=24)


def test_mask_is_built_once_and_sliced():
    model = perturb(tiny_model(**FAST_SIZES))
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
    model = perturb(tiny_model(**FAST_SIZES, dropout=0.2, dropouth=0.2, dropouti=0.2)).train()
    x, y = torch.randint(0, 13, (9, 3)), torch.randint(0, 13, (9, 3))
    plain = grads_after_step(model, x, y, seed=3)
    model.set_checkpoint_activations(True)
    checkpointed = grads_after_step(model, x, y, seed=3)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    model = perturb(tiny_model(**FAST_SIZES)).eval()
    x = torch.randint(0, 13, (7, 2))
    with torch.no_grad():
        eager, hidden, mems = model(x)
        eager2 = model(x[:5], hidden, mems)[0]
        model.compile_blocks()
        compiled, hidden, mems = model(x)
        compiled2 = model(x[:5], hidden, mems)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled2, eager2, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(tiny_model(**FAST_SIZES).state_dict())  # names unchanged
