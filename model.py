"""The SHA-RNN language model (Merity 2019, arXiv:1911.11423).

A stack of blocks, each an LSTM followed by an optional single-headed attention over a long
memory of past positions and a "Boom" feed-forward. Shapes are time-major: `[T, B, E]`.
Numerics, initialisation and parameter names follow docs/model.md (Model), so weights trained by
the original code load here and give the same outputs.
"""

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from flags import MODEL_FLAGS, PAPER, InputError, attention_blocks, check_config
from runtime import out_of_memory

LN_EPS = 1e-12


def gelu(x):
    """The sigmoid approximation of GELU used by the original: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class Boom(nn.Module):
    """Feed-forward without a second Linear: GELU(linear1(x)), dropout, then the
    nhid / ninp chunks of width ninp are summed back to ninp."""

    def __init__(self, ninp, nhid, dropout=0.0):
        super().__init__()
        self.linear1 = nn.Linear(ninp, nhid)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # x: [T, B, ninp]
        y = self.drop(gelu(self.linear1(x)))  # [T, B, nhid]
        return y.view(*y.shape[:-1], -1, x.shape[-1]).sum(dim=-2)  # [T, B, ninp]


class Overparam(nn.Module):
    """The value gate's over-parameterisation: sigmoid(f) * tanh(c), (c, f) = split(l1(z))."""

    def __init__(self, ninp):
        super().__init__()
        self.l1 = nn.Linear(ninp, 2 * ninp)
        self.ninp = ninp

    def forward(self, z):
        c, f = self.l1(z).split(self.ninp, dim=-1)
        return torch.sigmoid(f) * torch.tanh(c)


class Attention(nn.Module):
    """Single-headed attention: a projected, normalised query; key and value unprojected,
    each scaled by a learned sigmoid gate. `heads` splits it into equal heads.

    `sdpa` routes the product through `F.scaled_dot_product_attention`; otherwise the
    plain matmul-softmax-matmul reference computation is used. Both compute the same
    function (tests compare them).
    """

    def __init__(self, ninp, heads=1, dropout=0.0, sdpa=True):
        super().__init__()
        self.qs = nn.Parameter(torch.zeros(1, 1, ninp))
        self.ks = nn.Parameter(torch.zeros(1, 1, ninp))
        self.vs = nn.Parameter(torch.zeros(1, 1, ninp))
        self.q = nn.Linear(ninp, ninp)
        self.qln = nn.LayerNorm(ninp, eps=LN_EPS)
        self.vq = Overparam(ninp)
        self.drop = nn.Dropout(dropout)
        self.heads = heads
        self.sdpa = sdpa

    def forward(self, query, key, value, mask):
        # query: [T, B, E]; key, value: [S, B, E]; mask: [T, S] bool, True = visible
        qs, ks = torch.sigmoid(self.qs), torch.sigmoid(self.ks)
        vs = self.vq(torch.sigmoid(self.vs))  # [1, 1, E]
        with torch.autocast(query.device.type, enabled=False):  # query path in float32
            query = self.qln(self.q(query.to(self.q.weight.dtype)))
        # q = qs * query, k = ks * key, v = vs * value, with dropout on q and v. The key and
        # value gates are per-feature constants, so they are applied to the query and to the
        # result instead of to the long [S, B, E] memory: the same function, less work.
        q, k, v = self.drop(qs * query) * ks, key, self.drop(value)

        T, B, E = q.shape
        S, H = k.shape[0], self.heads
        q = q.reshape(T, B, H, E // H).permute(1, 2, 0, 3)  # [B, H, T, D]
        k = k.reshape(S, B, H, E // H).permute(1, 2, 0, 3)  # [B, H, S, D]
        v = v.reshape(S, B, H, E // H).permute(1, 2, 0, 3)  # [B, H, S, D]
        if self.sdpa:
            p = self.drop.p if self.training else 0.0
            mix = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(E // H)  # [B, H, T, S]
            scores = scores.masked_fill(~mask, float("-inf"))
            mix = torch.matmul(self.drop(F.softmax(scores, dim=-1)), v)  # [B, H, T, D]
        return mix.permute(2, 0, 1, 3).reshape(T, B, E) * vs  # [T, B, E]


class Block(nn.Module):
    """LSTM (no residual around it), optional attention over memory, Boom feed-forward."""

    def __init__(self, ninp, nhid, dropout=0.0, attn=False, heads=1, wdrop=0.0, sdpa=True):
        super().__init__()
        self.attn = Attention(ninp, heads, dropout, sdpa) if attn else None
        self.ff = Boom(ninp, nhid, dropout)
        self.lnstart = nn.LayerNorm(ninp, eps=LN_EPS)
        if attn:
            self.lnmid = nn.LayerNorm(ninp, eps=LN_EPS)
            self.lnmem = nn.LayerNorm(ninp, eps=LN_EPS)
        self.lnff = nn.LayerNorm(ninp, eps=LN_EPS)
        self.lnxff = nn.LayerNorm(ninp, eps=LN_EPS)
        self.rnn = nn.LSTM(ninp, ninp)
        self.drop = nn.Dropout(dropout)
        self.wdrop = wdrop
        self.checkpoint_activations = False

    def recurrent(self, h, hidden):
        """The LSTM in the dtype of lstm_dtype (under autocast where autocast computes it in
        that dtype, else with autocast off), the carried state cast to it; with DropConnect
        on its hidden-to-hidden weights while training (`wdrop`, from AWD-LSTM): a fresh
        mask each call, applied functionally so the optimizer keeps stepping the real
        parameter and the fused kernel still runs."""
        device = h.device.type
        amp = autocast_dtype(device)
        if amp is not None and lstm_dtype(device, amp) == torch.float32:
            with torch.autocast(device, enabled=False):
                return self.recurrent(h.float(), hidden)
        if amp is None and hidden is not None:  # a state carried in another precision
            hidden = tuple(t.to(h.dtype) for t in hidden)
        if self.training and self.wdrop > 0:
            w_hh = F.dropout(self.rnn.weight_hh_l0, p=self.wdrop, training=True)
            with warnings.catch_warnings():  # cuDNN warns that the weights are not one block
                warnings.filterwarnings("ignore", message="RNN module weights are not part")
                return torch.func.functional_call(self.rnn, {"weight_hh_l0": w_hh}, (h, hidden))
        return self.rnn(h, hidden)

    def mix(self, h, big, mask):
        """Attention of the current positions over memory + current positions."""
        return self.drop(self.attn(h, big, big, mask))

    def feedforward(self, h):
        """Boom on one normalisation of h, added to another normalisation of h."""
        return self.lnff(h) + self.drop(self.ff(self.lnxff(h)))

    def _maybe_checkpoint(self, fn, *args):
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, h, mask, mem_len, mem=None, hidden=None):
        # h: [T, B, E]; mask: [T, m + T]; mem: [m, B, E] or None
        h = self.lnstart(h)
        x, new_hidden = self.recurrent(h, hidden)
        h = self.drop(x)
        new_mem = None
        if self.attn is not None:
            mh, h = self.lnmem(h), self.lnmid(h)
            big = mh if mem is None else torch.cat([mem.to(mh.dtype), mh], dim=0)  # [m + T, B, E]
            if mem_len > 0:
                new_mem = big[max(big.shape[0] - mem_len, 0):]
            h = h + self._maybe_checkpoint(self.mix, h, big, mask)
        h = self._maybe_checkpoint(self.feedforward, h)
        return h, new_hidden, new_mem


def autocast_dtype(device_type):
    """The dtype autocast computes in on `device_type` ("cpu", "cuda"), or None when off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def lstm_dtype(device_type, amp):
    """The dtype the LSTMs compute in on `device_type` under autocast to `amp` (None: no
    autocast): the one place that decides it.

    | device | no autocast | float16 | bfloat16 |
    |---|---|---|---|
    | cpu | float32 | float32 (the CPU has no float16 LSTM kernel) | bfloat16 |
    | cuda | float32 | float16 (under the loss scaler) | float32 |

    On CUDA under bf16, float32: autocast would run the cuDNN LSTM in float16 whatever its
    dtype (PyTorch's autocast wrapper of _cudnn_rnn casts to half), and bf16 has no loss
    scaler to keep small gradients in float16's range. Where this says float32 under
    autocast, Block.recurrent runs the LSTM with autocast off."""
    if amp is None:
        return torch.float32
    if device_type == "cpu":
        return torch.float32 if amp == torch.float16 else amp
    return torch.float16 if amp == torch.float16 else torch.float32


class SHARNN(nn.Module):
    """The SHA-RNN. `forward(x, hidden, mems)` with token ids x `[T, B]` returns
    `(output [T, B, ninp], new_hidden, new_mems)`; `decoder(output)` gives the logits.
    A keyword left out takes the paper's value, from flags.PAPER.

    attn_layers: block indices with attention; None is the paper's default, block nlayers - 2.
    mem_len: total attention window (memory + current positions); 0 carries no memory.
    dropoute: embedding dropout (whole token rows, AWD-LSTM); wdrop: DropConnect on each
    LSTM's hidden-to-hidden weights. Both 0 by default, as in the paper's runs.
    cutoffs: if given, an adaptive softmax (`nn.AdaptiveLogSoftmaxWithLoss`) replaces the
    tied decoder, for large word vocabularies.
    """

    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=PAPER["dropout"],
                 dropouth=PAPER["dropouth"], dropouti=PAPER["dropouti"], attn_layers=None,
                 heads=PAPER["heads"], mem_len=PAPER["mem_len"], dropoute=PAPER["dropoute"],
                 wdrop=PAPER["wdrop"], cutoffs=None, sdpa=True):
        super().__init__()
        attn_layers = attention_blocks(attn_layers, nlayers)
        check_config(ntoken, ninp, nhid, nlayers, attn_layers, heads, mem_len,
                     dict(dropout=dropout, dropouth=dropouth, dropouti=dropouti,
                          dropoute=dropoute, wdrop=wdrop))
        if cutoffs is not None and not (list(cutoffs) == sorted(set(cutoffs))
                                        and 0 < cutoffs[0] and cutoffs[-1] < ntoken):
            raise ValueError(f"cutoffs must be increasing, between 0 and ntoken ({ntoken}), "
                             f"got {list(cutoffs)}")
        self.ntoken, self.ninp, self.nhid, self.nlayers = ntoken, ninp, nhid, nlayers
        self.attn_layers, self.heads, self.mem_len = attn_layers, heads, mem_len
        self.dropoute = dropoute
        self.idrop = nn.Dropout(dropouti)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(ninp, nhid, dropouth, attn=i in attn_layers, heads=heads, wdrop=wdrop, sdpa=sdpa)
            for i in range(nlayers))
        self.encoder = nn.Embedding(ntoken, ninp)
        if cutoffs is None:
            self.decoder = nn.Linear(ninp, ntoken)
            self.decoder.weight = self.encoder.weight
            self.adaptive = None
        else:
            self.decoder = None
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(ninp, ntoken, list(cutoffs))
        self.apply(self._init_weights)
        self._mask = torch.ones(0, 0, dtype=torch.bool)  # cache, see causal_mask()

    def _init_weights(self, module):
        # Linear and Embedding weights N(0, 0.1 / sqrt(ninp)), biases 0. LayerNorms keep
        # gain 1 and bias 0; LSTMs keep PyTorch's default init.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.1 / math.sqrt(self.ninp))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def causal_mask(self, T, m, device):
        """Bool mask `[T, m + T]`, True where visible: all m memory positions, and among the
        current ones position t sees positions <= t. Slices one cached band matrix, rebuilt
        only when a larger T or m is asked for."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # no cache under tracing
            return torch.ones(T, m + T, dtype=torch.bool, device=device).tril(diagonal=m)
        cached = self._mask
        rows, cols = cached.shape
        M = cols - rows  # the cache covers memories up to M positions
        if T > rows or m > M or cached.device != torch.device(device):
            rows, M = max(T, rows), max(m, M)
            cached = torch.ones(rows, M + rows, dtype=torch.bool, device=device).tril(diagonal=M)
            self._mask = cached
        return cached[:T, M - m:M + T]

    def embed(self, x):
        """Token embedding with optional whole-row embedding dropout (training only)."""
        weight = self.encoder.weight
        if self.training and self.dropoute > 0:
            keep = torch.empty_like(weight[:, :1]).bernoulli_(1 - self.dropoute)
            weight = weight * keep / (1 - self.dropoute)
        return F.embedding(x, weight)

    def forward(self, x, hidden=None, mems=None):
        # x: [T, B] token ids; hidden: per block (h, c) or None; mems: per block [m, B, E] or None
        T = x.shape[0]
        h = self.idrop(self.embed(x))  # [T, B, E]
        m = 0
        if self.mem_len == 0 or mems is None:
            mems = [None] * self.nlayers
        else:
            keep = max(self.mem_len - T, 0)
            mems = [None if mem is None else mem[max(mem.shape[0] - keep, 0):] for mem in mems]
            m = max((mem.shape[0] for mem in mems if mem is not None), default=0)
        mask = self.causal_mask(T, m, x.device)
        hidden = [None] * self.nlayers if hidden is None else hidden
        new_hidden, new_mems = [], []
        for block, mem, hid in zip(self.blocks, mems, hidden):
            h, hid, mem = block(h, mask, self.mem_len, mem=mem, hidden=hid)
            new_hidden.append(hid)
            new_mems.append(mem)
        return self.drop(h), new_hidden, new_mems

    def loss(self, output, targets):
        """Per-token cross-entropy (natural log) `[T * B]` in float32 of output `[T, B, E]`
        against targets `[T, B]`: the full softmax of the tied decoder, or the adaptive one."""
        flat, targets = output.reshape(-1, self.ninp), targets.reshape(-1)
        if self.adaptive is not None:
            return -self.adaptive(flat, targets).output.float()
        return F.cross_entropy(self.decoder(flat).float(), targets, reduction="none")

    def log_probs(self, output):
        """Log-probabilities `[N, ntoken]` of the next token for output rows `[N, E]`."""
        if self.adaptive is not None:
            return self.adaptive.log_prob(output.float())
        return F.log_softmax(self.decoder(output).float(), dim=-1)

    def compile_blocks(self):
        """torch.compile each block's attention and feed-forward parts (dynamic shapes: the
        sequence and memory lengths vary); the LSTMs stay eager (cuDNN)."""
        for block in self.blocks:
            block.mix = torch.compile(block.mix, dynamic=True)
            block.feedforward = torch.compile(block.feedforward, dynamic=True)

    def set_dropouts(self, dropout, dropouth, dropouti, dropoute, wdrop):
        """Change the dropout rates of a built model (they hold no weights): the model is then
        the one built with these rates."""
        check_config(self.ntoken, self.ninp, self.nhid, self.nlayers, self.attn_layers,
                     self.heads, self.mem_len, dict(dropout=dropout, dropouth=dropouth,
                                                    dropouti=dropouti, dropoute=dropoute,
                                                    wdrop=wdrop))
        self.drop.p, self.idrop.p, self.dropoute = dropout, dropouti, dropoute
        for block in self.blocks:
            block.wdrop = wdrop
            for module in block.modules():
                if isinstance(module, nn.Dropout):
                    module.p = dropouth

    def set_checkpoint_activations(self, enabled):
        """Recompute attention and feed-forward activations in backward to save memory."""
        for block in self.blocks:
            block.checkpoint_activations = enabled

    def load_original_state_dict(self, state_dict):
        """Load weights saved by the original code: skip exactly the keys it declared but
        never used, and raise ValueError on any other missing, unexpected or mis-shaped key."""
        ignored = set()
        for i, block in enumerate(self.blocks):
            ignored |= {f"blocks.{i}.lnout.weight", f"blocks.{i}.lnout.bias"}
            if block.attn is not None:
                ignored |= {f"blocks.{i}.attn.qkvs", f"blocks.{i}.attn.r_gate"}
            else:
                ignored |= {f"blocks.{i}.{ln}.{p}" for ln in ("lnmid", "lnmem")
                            for p in ("weight", "bias")}
        self.load_strict({k: v for k, v in state_dict.items() if k not in ignored})

    def check_weights(self, state_dict):
        """ValueError naming every key of `state_dict` that is missing, unexpected or of
        another shape than this model's (the model may be on the meta device)."""
        own = self.state_dict()
        problems = []
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            problems.append("missing " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            problems.append("unexpected " + ", ".join(unexpected[:5])
                            + (" ..." if len(unexpected) > 5 else ""))
        for k, v in state_dict.items():
            if k in own and tuple(v.shape) != tuple(own[k].shape):
                problems.append(f"{k} has shape {tuple(v.shape)}, the model has {tuple(own[k].shape)}")
        if problems:
            found = attn_layers_in(state_dict)
            hint = (f" (the weights have attention in blocks {found}, this model in "
                    f"{self.attn_layers})" if found != self.attn_layers else "")
            raise ValueError("weights do not fit the model: " + "; ".join(problems) + hint)

    def load_strict(self, state_dict):
        """`load_state_dict` with one clear ValueError naming every mismatch."""
        self.check_weights(state_dict)
        self.load_state_dict(state_dict)


def attn_layers_in(state_dict):
    """The block indices that have attention weights in a state_dict."""
    return sorted(int(k.split(".")[1]) for k in state_dict
                  if k.startswith("blocks.") and k.endswith(".attn.qs"))


# --- the model of the flags, or of a checkpoint -----------------------------------------

# Used when --adaptive-softmax is given without --cutoffs (AWD-LSTM's splits).
DEFAULT_CUTOFFS = {500_000: [4200, 35000, 180000], 75_000: [2800, 20000, 76000], 0: [2000, 10000]}


def default_cutoffs(ntokens):
    """AWD-LSTM's adaptive softmax splits for a vocabulary of this size."""
    cuts = next(c for n, c in DEFAULT_CUTOFFS.items() if ntokens > n)
    cuts = [c for c in cuts if c < ntokens]
    if not cuts:
        raise InputError(f"give --cutoffs for a vocabulary of {ntokens} tokens")
    return cuts


def model_config(args, ntokens, saved=None, byte_level=True):
    """The SHARNN keyword arguments of the flags. With `saved` (a checkpoint's config, whose
    values are the flags' defaults after `flags_from`), a flag whose value differs from it
    was given on the command line and contradicts the checkpoint: an error."""
    if args.adaptive_softmax and byte_level:
        raise InputError("--adaptive-softmax is for word-level vocabularies; this corpus is "
                         "byte-level and keeps the plain softmax")
    config = dict(ntoken=ntokens, ninp=args.emsize, nhid=args.nhid, nlayers=args.nlayers,
                  attn_layers=attention_blocks(args.attn_layers, args.nlayers), heads=args.heads,
                  mem_len=args.mem_len,
                  cutoffs=(args.cutoffs or default_cutoffs(ntokens)) if args.adaptive_softmax
                  else None)
    if saved is None:
        return config
    if saved["ntoken"] != ntokens:
        raise InputError(f"the checkpoint has {saved['ntoken']} tokens, the data {args.data} "
                         f"has {ntokens}")
    if args.adaptive_softmax != (saved["cutoffs"] is not None):
        raise InputError(f"--adaptive-softmax contradicts the checkpoint, which has the "
                         f"{'adaptive' if saved['cutoffs'] else 'plain'} softmax; drop the flag "
                         f"to use the checkpoint's")
    for flag, key in MODEL_FLAGS.items():
        if config[key] != saved[key]:
            raise InputError(f"--{flag.replace('_', '-')} {flag_text(getattr(args, flag))} "
                             f"contradicts the checkpoint's {key}={saved[key]}; drop the flag to "
                             f"use the checkpoint's")
    return dict(saved)


def flag_text(value):
    return ",".join(map(str, value)) if isinstance(value, list) else value


def build_model(config, args, **extra):
    """The SHARNN of a config with the flags' dropouts (and `extra` keyword arguments);
    a config the model refuses, or a model beyond memory, is an InputError."""
    kwargs = dict(config, dropout=args.dropout, dropouth=args.dropouth, dropouti=args.dropouti,
                  dropoute=args.dropoute, wdrop=args.wdrop, **extra)
    try:
        return SHARNN(**kwargs)
    except ValueError as e:
        raise InputError(str(e)) from None
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        with torch.device("meta"):  # count without allocating
            n = sum(p.numel() for p in SHARNN(**kwargs).parameters())
        raise InputError(f"the model does not fit in memory: {n:,} parameters, "
                         f"{4 * n / 2**30:,.1f} GiB of float32 weights alone") from None


def model_from_checkpoint(ckpt, **kwargs):
    """The SHARNN of a checkpoint of this project (its config and weights), on the CPU."""
    if ckpt.get("kind") != "sha-rnn":
        raise InputError("this needs a checkpoint written by main.py (with its config and "
                         "vocabulary), not a bare state_dict")
    model = SHARNN(**ckpt["config"], **kwargs)
    try:
        model.load_strict(ckpt["model"])
    except ValueError as e:
        raise InputError(str(e)) from None
    return model


def model_for(args, start, corpus):
    """The model of the flags (which hold a start checkpoint's architecture unless given
    anew) with the checkpoint's weights loaded; returns (model, config)."""
    ntokens = len(corpus.dictionary)
    if start is not None and start["kind"] == "sha-rnn":
        if start["vocab"] != corpus.dictionary.idx2word:
            raise InputError(f"the checkpoint's vocabulary ({len(start['vocab'])} tokens) differs "
                             f"from that of {args.data} ({ntokens} tokens)")
        config = model_config(args, ntokens, start["config"], corpus.byte_level)
    else:
        config = model_config(args, ntokens, byte_level=corpus.byte_level)
    if start is not None and start["kind"] == "state_dict":
        rows = start["model"]["encoder.weight"].shape[0]
        if rows != ntokens:
            raise InputError(f"the weights have {rows} tokens, the data {args.data} has {ntokens}")
    model = build_model(config, args)
    try:
        if start is not None and start["kind"] == "state_dict":
            model.load_original_state_dict(start["model"])
        elif start is not None:
            model.load_strict(start["model"])
    except ValueError as e:
        raise InputError(str(e)) from None
    return model, config
