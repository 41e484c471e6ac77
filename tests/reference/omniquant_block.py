"""An independent PyTorch transcription of omniq's OmniQuant block (spec/omniquant.md §1-4): the fake
quantizers, the functional LLaMA / OPT decoder blocks, and the LWC + LET quantizer of one block.
Used by omniquant_reference.py (calibrate / bench / gradfix).

Written from the spec and the C++ semantics (ops/fake_quant.h, quant/block_quantizer.cpp,
models/decoder_block.cpp), sharing no code with them, so that:
  * every floating-point step of the weight quantizer is the same IEEE fp32 operation in the same
    order as omniq's (sigma in fp64 rounded to fp32, as omniq), so fake-quantized weights agree bit
    for bit given the same LET scales;
  * the LET transform is applied in the same order (consumer columns · s, then producer rows ÷ s,
    then the qkt consumer rows · s; bias corrections b + δ·W_origᵀ), so what trains is what fuses;
  * gradients follow the reference code's surrogate: round_ste on x/scale (identity gradient), a
    plain round on the zero point (zero gradient), torch.clamp (gradient inside the range,
    inclusive), amax/amin (ties share), and the |s| floor passed straight through.
Block parameter keys are omniq's: "q_proj.weight", "input_layernorm.weight", "fc1.bias", ...
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# quantizers

class _RoundSTE(torch.autograd.Function):
    """round-half-to-even forward, identity backward (the reference code's round_ste)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _AbsFloorSTE(torch.autograd.Function):
    """sign(s)·max(|s|, floor), sign(0) = +1; gradient passed straight through (omniq's LET floor)."""

    @staticmethod
    def forward(ctx, s, floor):
        sign = torch.where(s >= 0, torch.ones_like(s), -torch.ones_like(s))
        return sign * s.abs().clamp(min=floor)

    @staticmethod
    def backward(ctx, g):
        return g, None


def abs_floor_ste(s, floor):
    return _AbsFloorSTE.apply(s, floor)


def fake_quant_groups(x, bits, gamma=None, beta=None):
    """Asymmetric min-max fake-quant of every row of x [n, g] (fp32). gamma/beta: [n] LWC or None."""
    qmax = float(2 ** bits - 1)
    xmax = x.amax(dim=-1, keepdim=True)
    xmin = x.amin(dim=-1, keepdim=True)
    if gamma is not None:
        # sigma in fp64 rounded to fp32: omniq does this on both backends (ops/fake_quant.h)
        xmax = torch.sigmoid(gamma.double()).float().view(-1, 1) * xmax
        xmin = torch.sigmoid(beta.double()).float().view(-1, 1) * xmin
    scale = ((xmax - xmin) / qmax).clamp(min=1e-5, max=1e4)
    zp = (-xmin / scale).clamp(min=-1e4, max=1e4).round()  # plain round: zero gradient
    q = (_RoundSTE.apply(x / scale) + zp).clamp(0.0, qmax)
    return (q - zp) * scale


def fake_quant_weight(w, bits, group, gamma=None, beta=None):
    """w [out, in] fp32; group 0 = per output channel. bits >= 16: identity."""
    if bits >= 16:
        return w
    out_f, in_f = w.shape
    g = group if group > 0 else in_f
    assert in_f % g == 0, f"group size {g} does not divide in_features {in_f}"
    return fake_quant_groups(w.reshape(-1, g), bits, gamma, beta).reshape(out_f, in_f)


def fake_quant_act(x, bits):
    """Dynamic per-token (per row of the last dim) fake-quant, computed in fp32, returned in x's dtype."""
    if bits >= 16:
        return x
    shape = x.shape
    y = fake_quant_groups(x.float().reshape(-1, shape[-1]), bits)
    return y.reshape(shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# the architectures

class BlockConfig:
    """What the block forward needs from a HF config (or a synthetic shape for bench)."""

    def __init__(self, arch, C, H, Hkv, D, inter, eps, rope_theta=10000.0, bias=False):
        self.arch, self.C, self.H, self.Hkv, self.D, self.inter = arch, C, H, Hkv, D, inter
        self.eps, self.rope_theta, self.bias = eps, rope_theta, bias

    @property
    def is_llama(self):
        return self.arch == "llama"

    @staticmethod
    def from_hf(cfg):
        if cfg.model_type == "opt":
            assert cfg.do_layer_norm_before, "post-LN OPT (350m) has no LET pairs: not supported here"
            assert cfg.word_embed_proj_dim == cfg.hidden_size, "OPT project_in/out not supported"
            H = cfg.num_attention_heads
            return BlockConfig("opt", cfg.hidden_size, H, H, cfg.hidden_size // H, cfg.ffn_dim, 1e-5,
                               bias=cfg.enable_bias)
        assert cfg.model_type == "llama", cfg.model_type
        rp = getattr(cfg, "rope_parameters", None) or {}
        theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        assert rp.get("rope_type", "default") == "default", "only default RoPE is implemented"
        H = cfg.num_attention_heads
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        return BlockConfig("llama", cfg.hidden_size, H, cfg.num_key_value_heads, D, cfg.intermediate_size,
                           cfg.rms_norm_eps, theta, bias=bool(getattr(cfg, "attention_bias", False)))

    def linear_sites(self):
        if self.is_llama:
            return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

    def pairs(self):
        """(name, kind, producer, consumers, channels, producer_has_bias) as models/decoder_block.cpp."""
        kv = self.Hkv * self.D
        if self.is_llama:
            return [("qkv", "norm", "input_layernorm", ["q_proj", "k_proj", "v_proj"], self.C, False),
                    ("out", "rows", "v_proj", ["o_proj"], kv, self.bias),
                    ("fc1", "norm", "post_attention_layernorm", ["gate_proj", "up_proj"], self.C, False),
                    ("qkt", "qkt", "q_proj", ["k_proj"], kv, self.bias)]
        return [("qkv", "norm", "self_attn_layer_norm", ["q_proj", "k_proj", "v_proj"], self.C, True),
                ("out", "rows", "v_proj", ["out_proj"], kv, self.bias),
                ("fc1", "norm", "final_layer_norm", ["fc1"], self.C, True),
                ("qkt", "qkt", "q_proj", ["k_proj"], kv, self.bias)]


def hf_module_of(layer, cfg, prefix):
    """The HF submodule of a decoder layer for omniq's key prefix ("q_proj", "input_layernorm", ...)."""
    if prefix in ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj"):
        return getattr(layer.self_attn, prefix)
    if prefix in ("gate_proj", "up_proj", "down_proj"):
        return getattr(layer.mlp, prefix)
    return getattr(layer, prefix)  # norms, fc1, fc2


def block_keys(cfg):
    norms = ["input_layernorm", "post_attention_layernorm"] if cfg.is_llama else \
        ["self_attn_layer_norm", "final_layer_norm"]
    keys = []
    for p in cfg.linear_sites() + norms:
        keys.append(p + ".weight")
        if not cfg.is_llama or (p in ("q_proj", "k_proj", "v_proj", "o_proj") and cfg.bias):
            keys.append(p + ".bias")
    return keys


def hf_block_params(layer, cfg, device):
    """fp32 copies of a HF decoder layer's tensors, keyed like omniq's block."""
    out = {}
    for key in block_keys(cfg):
        prefix, leaf = key.rsplit(".", 1)
        t = getattr(hf_module_of(layer, cfg, prefix), leaf)
        if t is not None:
            out[key] = t.detach().to(device=device, dtype=torch.float32).clone()
    return out


def write_hf_block(layer, cfg, params, round_f16=True):
    with torch.no_grad():
        for key, t in params.items():
            prefix, leaf = key.rsplit(".", 1)
            dst = getattr(hf_module_of(layer, cfg, prefix), leaf)
            v = t.detach().float()
            if round_f16:
                v = v.half().float()  # omniq's export stores fp16
            dst.copy_(v.to(device=dst.device, dtype=dst.dtype))


def rope(x, theta):
    """HF rotate_half RoPE on x [B, T, H, D], positions 0..T-1, angles in fp32 as HF."""
    T, D = x.shape[1], x.shape[3]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=x.device).float() / D))
    freqs = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().to(x.dtype)[None, :, None, :]
    sin = emb.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rmsnorm(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


# "sdpa": F.scaled_dot_product_attention (flash; stronger than the reference code). "eager": the
# OmniQuant reference code's attention (QuantLlamaAttention: q·kᵀ and p·v as matmuls under autocast,
# an additive causal mask, softmax in fp32 cast back to the compute dtype). Set by the CLI.
ATTENTION = "sdpa"


def eager_attention(q, k, v, scale):
    """The reference code's materialised attention ([B, H, T, T] scores in the autocast dtype)."""
    T = q.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s + torch.full((T, T), torch.finfo(s.dtype).min, device=s.device, dtype=s.dtype).triu(1)
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def causal_attention(q, k, v, scale):
    """[B, H, T, D] causal softmax attention: SDPA (torch >= 2.1), a plain fallback for older torch;
    the reference code's eager form when ATTENTION == "eager"."""
    if ATTENTION == "eager":
        return eager_attention(q, k, v, scale)
    if hasattr(F, "scaled_dot_product_attention") and tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    T = q.shape[2]
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


class StatsRecorder:
    """Per-input-channel absmax / max / min of every Linear input (omniq's ActivationStatsRecorder)."""

    def __init__(self):
        self.stats = {}

    def record(self, site, x):
        x = x.detach().float().reshape(-1, x.shape[-1])
        s = self.stats.get(site)
        cur = (x.abs().amax(0), x.amax(0), x.amin(0))
        if s is None:
            self.stats[site] = cur
        else:
            self.stats[site] = (torch.maximum(s[0], cur[0]), torch.maximum(s[1], cur[1]),
                                torch.minimum(s[2], cur[2]))


def block_forward(cfg, P, x, abits=16, stats=None):
    """x [B, T, C] -> [B, T, C] with parameters P (key -> tensor). abits < 16 quantizes every Linear
    input and q, k (after RoPE), v per token. `stats` records Linear inputs (fp passes)."""

    def act(site, v):
        if stats is not None and site not in ("q", "k", "v"):
            stats.record(site, v)
        return fake_quant_act(v, abits)

    def lin(site, v):
        return F.linear(act(site, v), P[site + ".weight"], P.get(site + ".bias"))

    def attention(n, out_site):
        B, T, _ = n.shape
        H, Hkv, D = cfg.H, cfg.Hkv, cfg.D
        q = lin("q_proj", n).view(B, T, H, D)
        k = lin("k_proj", n).view(B, T, Hkv, D)
        v = lin("v_proj", n).view(B, T, Hkv, D)
        if cfg.is_llama:
            q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        q, k, v = act("q", q), act("k", k), act("v", v)  # per (token, head) over D
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if Hkv != H:  # query head h reads kv head h // (H / Hkv)
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        o = causal_attention(q, k, v, 1.0 / math.sqrt(D))
        return lin(out_site, o.transpose(1, 2).reshape(B, T, H * D))

    if cfg.is_llama:
        h = x + attention(rmsnorm(x, P["input_layernorm.weight"], cfg.eps), "o_proj")
        n2 = rmsnorm(h, P["post_attention_layernorm.weight"], cfg.eps)
        m = F.silu(lin("gate_proj", n2)) * lin("up_proj", n2)
        return h + lin("down_proj", m)

    def ln(name, v):
        # in fp32 (as CUDA autocast runs layer_norm); the next Linear casts back under autocast
        return F.layer_norm(v.float(), (cfg.C,), P[name + ".weight"].float(), P[name + ".bias"].float(), cfg.eps)

    h = x + attention(ln("self_attn_layer_norm", x), "out_proj")
    m = F.relu(lin("fc1", ln("final_layer_norm", h)))
    return h + lin("fc2", m)


# ---------------------------------------------------------------------------------------------
# the OmniQuant quantizer of one block

class OmniQuantBlock:
    """LWC + LET of one block, mirroring quant/block_quantizer.cpp. P0: the original fp32 params."""

    def __init__(self, cfg, P0, wbits=4, abits=16, group=0, lwc=True, let=False, stats=None, alpha=0.5,
                 floor=1e-2):
        self.cfg, self.P0, self.wbits, self.abits, self.group = cfg, P0, wbits, abits, group
        self.floor = floor
        dev = next(iter(P0.values())).device
        self.params = {}  # name -> fp32 leaf tensor requiring grad (omniq's learned() names)
        H, Hkv, D = cfg.H, cfg.Hkv, cfg.D
        self.kv_of_q = torch.tensor([(h // (H // Hkv)) * D + d for h in range(H) for d in range(D)], device=dev)
        self.rope_tie = torch.tensor([h * (D // 2) + d % (D // 2) for h in range(Hkv) for d in range(D)], device=dev)
        if lwc and wbits < 16:
            for site in cfg.linear_sites():
                o, i = P0[site + ".weight"].shape
                n = o * (i // (group if group > 0 else i))
                self.params[site + ".lwc_gamma"] = torch.full((n,), 4.0, device=dev)
                self.params[site + ".lwc_beta"] = torch.full((n,), 4.0, device=dev)
        self.pairs = cfg.pairs() if let else []
        self.has_shift = {}
        for name, kind, producer, consumers, channels, has_bias in self.pairs:
            shift = (not cfg.is_llama) and abits < 16 and has_bias and kind != "qkt" and \
                all(c + ".bias" in P0 for c in consumers)
            self.has_shift[name] = shift
            if kind == "qkt":
                n = channels // 2 if cfg.is_llama else channels
                self.params[name + ".let_scale"] = torch.ones(n, device=dev)
                continue
            assert stats is not None, "LET needs activation statistics"
            absmax, amax, amin = stats[consumers[0]]
            wabs = torch.stack([P0[c + ".weight"].abs().amax(0) for c in consumers]).amax(0)
            if absmax.numel() != channels:  # out pair with GQA: o_proj inputs -> kv channels
                absmax, wabs, amax = (self._reduce_to_kv(t, channels, True) for t in (absmax, wabs, amax))
                amin = self._reduce_to_kv(amin, channels, False)
            a = absmax.clamp(min=1e-5).double()
            w = wabs.clamp(min=1e-5).double()
            s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5).float()
            self.params[name + ".let_scale"] = s
            if shift:
                self.params[name + ".let_shift"] = (0.5 * (amax + amin)).float()
        for p in self.params.values():
            p.requires_grad_(True)

    def _reduce_to_kv(self, t, channels, take_max):
        r = torch.full((channels,), -math.inf if take_max else math.inf, device=t.device)
        return r.scatter_reduce(0, self.kv_of_q, t.float(), reduce="amax" if take_max else "amin")

    def lwc_params(self):
        return [v for k, v in sorted(self.params.items()) if ".lwc_" in k]

    def let_params(self):
        return [v for k, v in sorted(self.params.items()) if ".let_" in k]

    def _scale(self, pair, expand_to_q):
        s = abs_floor_ste(self.params[pair + ".let_scale"], self.floor)
        if pair == "qkt" and self.cfg.is_llama:
            s = s[self.rope_tie]
        if expand_to_q and self.cfg.H != self.cfg.Hkv:
            s = s[self.kv_of_q]
        return s

    def _shift(self, pair):
        return self.params.get(pair + ".let_shift") if self.has_shift.get(pair) else None

    def transform(self, key):
        """The tensor the quantized block computes with for `key` (LET applied, weights fake-quantized)."""
        prefix, leaf = key.rsplit(".", 1)
        is_w = leaf == "weight"
        v = self.P0[key]
        for name, kind, producer, consumers, _, _ in self.pairs:  # 1. consumer columns · s, b + δ·Wᵀ
            if prefix not in consumers or kind == "qkt":
                continue
            if is_w:
                v = v * self._scale(name, kind == "rows")
            elif self._shift(name) is not None:
                d = self._shift(name)
                v = v + F.linear(d.view(1, -1), self.P0[prefix + ".weight"]).view(-1)
        for name, kind, producer, consumers, _, _ in self.pairs:  # 2. producer ÷ s (and − δ)
            if producer != prefix:
                continue
            if kind in ("norm", "rows"):
                s = self._scale(name, False)
                if not is_w and self._shift(name) is not None:
                    v = v - self._shift(name)
                if kind == "rows" and is_w:
                    s = s.view(-1, 1)
                v = v / s
            else:
                s = self._scale(name, True)
                v = v / (s.view(-1, 1) if is_w else s)
        for name, kind, producer, consumers, _, _ in self.pairs:  # 3. qkt consumer rows · s
            if kind == "qkt" and prefix in consumers:
                s = self._scale(name, False)
                v = v * (s.view(-1, 1) if is_w else s)
        if is_w and prefix in self.cfg.linear_sites() and self.wbits < 16:
            g = self.params.get(prefix + ".lwc_gamma")
            b = self.params.get(prefix + ".lwc_beta")
            v = fake_quant_weight(v, self.wbits, self.group, g, b)
        return v

    def block_params(self):
        return {k: self.transform(k) for k in self.P0}

    def forward(self, x):
        return block_forward(self.cfg, self.block_params(), x, self.abits)

    @torch.no_grad()
    def fused(self):
        return {k: v.detach().clone() for k, v in self.block_params().items()}
