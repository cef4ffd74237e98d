"""Mini-Nets block / Neural Blend-Field of ImFace++ (§3.3, eq. 9).

    v(x) = Σ_n w_n(x) ψ_n(γ(x - l_n))

ψ_n: a small SIREN MLP per local region n (K = 5 landmarks), on the sinusoidal positional encoding γ
of the position relative to the landmark l_n. Its weights are either plain parameters (TempNet) or
generated per latent code by a hyper-net (ExpNet, IDNet, DetailNet). w(x): softmax output of a fusion
MLP on the absolute position.

Evaluation: the K mini-nets of all B codes run as ONE `baddbmm` per layer, weights stacked
  on a leading K*B dimension (as NPHM's EnsembledLinear); the hyper-net outputs are computed once
  per code batch (`batched_weights`) and reused by every call of the forward pass, ω is folded into
  them, the sine layers use a fused double backward, and the positional encoding of the K relative
  positions is one sin and one cos, fed to the first layer without concatenation.
The straightforward reference (a Python loop over the K mini-nets, as the official ImFace code does)
lives with the tests (tests/looped_blend_field.py), which check the two agree; the benchmark times both.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# One layer of generated/stacked weights ready for baddbmm: (W^T, b) with shapes
# (K*Bw, in, out) and (K*Bw, 1, out), ω already folded in for the sine layers; Bw = B or 1.
LayerWeights = tuple[torch.Tensor, torch.Tensor]


class _SineGrad(torch.autograd.Function):
    """g * cos(z): the backward of `_Sine`, itself differentiable once (for the Eikonal terms).

    Its backward is the hand-fused  (gg cos z, -gg g sin z)  reusing sin z from the forward pass,
    which replaces autograd's cos -> mul -> (mul, mul, sin, neg, mul) chain.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        c = torch.cos(z)
        ctx.save_for_backward(g, c, s)
        return g * c

    @staticmethod
    @once_differentiable
    def backward(ctx, gg: torch.Tensor):
        g, c, s = ctx.saved_tensors
        grad_g = gg * c if ctx.needs_input_grad[0] else None
        grad_z = torch.mul(gg, g).mul_(s).neg_() if ctx.needs_input_grad[1] else None
        return grad_g, grad_z, None


class _Sine(torch.autograd.Function):
    """sin(z) with a cheaper double backward than torch.sin (same values and gradients)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        s = torch.sin(z)
        ctx.save_for_backward(z, s)
        return s

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        z, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: keep the gradient differentiable
            return _SineGrad.apply(g, z, s)
        return g * torch.cos(z)


def sine(z: torch.Tensor) -> torch.Tensor:
    """sin with the fused double backward when gradients are tracked, plain torch.sin otherwise."""
    return _Sine.apply(z) if torch.is_grad_enabled() and z.requires_grad else torch.sin(z)


def encoding_dim(pe_freqs: int, include_input: bool = True) -> int:
    return 3 * (2 * pe_freqs + (1 if include_input else 0))


def positional_encoding(x: torch.Tensor, n_freqs: int, include_input: bool = True) -> torch.Tensor:
    """[x, sin(2^0 x), cos(2^0 x), ..., sin(2^{F-1} x), cos(2^{F-1} x)] along the last axis.

    Written as the official ImFace code writes it (a list of tensors, one cat); the batched field
    computes the same values with one sin and one cos over all frequencies.
    """
    enc = [x] if include_input else []
    for i in range(n_freqs):
        freq = 2.0 ** i
        enc.append(torch.sin(x * freq))
        enc.append(torch.cos(x * freq))
    return torch.cat(enc, dim=-1)


def siren_uniform_bound(fan_in: int, omega: float, first: bool) -> float:
    """SIREN init (Sitzmann et al. 2020): U(±1/fan_in) for the first layer, U(±sqrt(6/fan_in)/ω) after."""
    return 1.0 / fan_in if first else math.sqrt(6.0 / fan_in) / omega


class BlendField(nn.Module):
    """K local SIREN fields blended by a fusion network.

    Args:
        n_regions: K, number of local regions / landmarks.
        out_dim: output channels of every local field (6 for an SE(3) twist, 1 for an SDF, ...).
        hidden, n_hidden_layers, omega: SIREN sizes (`n_hidden_layers` sine layers of width
            `hidden`, then a linear output layer); ω multiplies every pre-activation.
        pe_freqs, pe_include_input: positional encoding of x - l_n.
        code_dim: latent code size, or None for an unconditioned field (plain parameters).
        hyper_hidden, hyper_out_scale: hyper-nets (one ReLU hidden layer per generated tensor).
        split_code: give local hyper-net n the n-th slice of the code (official ImFace code).
        fusion_width, fusion_layers, fusion_layernorm: fusion MLP on the absolute position.
        fused_sine: batched sine layers use `_Sine` (cheaper double backward, but not three times
            differentiable); False when third derivatives are needed.
    """

    def __init__(self, n_regions: int, out_dim: int, hidden: int, n_hidden_layers: int, omega: float,
                 pe_freqs: int, pe_include_input: bool = True, code_dim: int | None = None,
                 hyper_hidden: int = 32, hyper_out_scale: float = 1e-2, split_code: bool = True,
                 fusion_width: int = 128, fusion_layers: int = 3, fusion_layernorm: bool = True,
                 fused_sine: bool = True) -> None:
        super().__init__()
        self.fused_sine = fused_sine
        self.n_regions = n_regions
        self.out_dim = out_dim
        self.omega = float(omega)
        self.pe_freqs = pe_freqs
        self.pe_include_input = pe_include_input
        self.fusion_layernorm = fusion_layernorm
        in_dim = encoding_dim(pe_freqs, pe_include_input)
        if in_dim == 0:
            raise ValueError("empty positional encoding")
        dims = [in_dim] + [hidden] * n_hidden_layers + [out_dim]
        # (out, in) of every linear layer of a mini-net, nn.Linear layout.
        self.layer_shapes: list[tuple[int, int]] = [(dims[i + 1], dims[i]) for i in range(len(dims) - 1)]
        self.register_buffer("freq_bands", 2.0 ** torch.arange(pe_freqs, dtype=torch.float32),
                             persistent=False)
        # Rows of the first layer's input fed by x - l, sin(2^f (x - l)), cos(2^f (x - l)) in the
        # encoding order [x, sin f0 (3), cos f0 (3), sin f1, ...] (see `local_fields`).
        off = 3 if pe_include_input else 0
        self.register_buffer("sin_rows", torch.tensor(
            [off + 6 * f + c for f in range(pe_freqs) for c in range(3)], dtype=torch.long), persistent=False)
        self.register_buffer("cos_rows", self.sin_rows + 3, persistent=False)

        self.code_dim = code_dim
        K = n_regions
        if code_dim is None:
            # Unconditioned: weights stacked over the K mini-nets, SIREN init.
            self.weights = nn.ParameterList()
            self.biases = nn.ParameterList()
            for i, (o, n_in) in enumerate(self.layer_shapes):
                self.weights.append(nn.Parameter(self._siren_weight((K, o, n_in), i)))
                self.biases.append(nn.Parameter(self._default_bias((K, o), n_in)))
        else:
            if split_code and code_dim % K:
                raise ValueError("code_dim must be divisible by n_regions with split_code")
            self.split_code = split_code
            c = code_dim // K if split_code else code_dim
            self.local_code_dim = c
            # Generated tensors, in order W0, b0, W1, b1, ...; each has its own ReLU hidden layer
            # (one hyper-net per parameter tensor, as SIREN's / ImFace's HyperNetwork).
            self.param_shapes: list[tuple[int, ...]] = []
            for o, n_in in self.layer_shapes:
                self.param_shapes += [(o, n_in), (o,)]
            L = len(self.param_shapes)
            w1 = torch.randn(K, L, hyper_hidden, c) * math.sqrt(2.0 / c)  # kaiming normal (ReLU)
            self.hyper_in_weight = nn.Parameter(w1)
            # Zero hidden bias: with codes ~N(0, 0.01²) the code-dependent part of the generated
            # weights starts at < 2 % of the SIREN bound, so the init statistics are SIREN's.
            self.hyper_in_bias = nn.Parameter(torch.zeros(K, L, hyper_hidden))
            self.hyper_out_weight = nn.ParameterList()
            self.hyper_out_bias = nn.ParameterList()
            for j, shape in enumerate(self.param_shapes):
                numel = math.prod(shape)
                w2 = torch.randn(K, numel, hyper_hidden) * (math.sqrt(2.0 / hyper_hidden) * hyper_out_scale)
                self.hyper_out_weight.append(nn.Parameter(w2))
                layer = j // 2
                if j % 2 == 0:  # weight tensor: bias of the hyper output = a SIREN-initialised weight
                    b2 = self._siren_weight((K, numel), layer)
                else:           # bias tensor: PyTorch/SIREN default bias init U(±1/sqrt(fan_in))
                    b2 = self._default_bias((K, numel), self.layer_shapes[layer][1])
                self.hyper_out_bias.append(nn.Parameter(b2))

        # Fusion network: Linear -> [LayerNorm] -> LeakyReLU ... -> Linear(K) -> softmax.
        fdims = [3] + [fusion_width] * (fusion_layers - 1) + [K]
        self.fusion = nn.ModuleList(nn.Linear(fdims[i], fdims[i + 1]) for i in range(len(fdims) - 1))
        self.fusion_norms = nn.ModuleList(
            nn.LayerNorm(fusion_width) for _ in range(fusion_layers - 1)) if fusion_layernorm else None

    # ------------------------------------------------------------------ init helpers
    def _siren_weight(self, shape: tuple[int, ...], layer: int) -> torch.Tensor:
        fan_in = self.layer_shapes[layer][1]
        bound = siren_uniform_bound(fan_in, self.omega, first=(layer == 0))
        return torch.empty(shape).uniform_(-bound, bound)

    @staticmethod
    def _default_bias(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound)

    @property
    def conditioned(self) -> bool:
        return self.code_dim is not None

    # ------------------------------------------------------------------ hyper-nets
    def _local_codes(self, code: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (K, B, c): the code seen by each local hyper-net."""
        B = code.shape[0]
        if self.split_code:
            return code.reshape(B, self.n_regions, self.local_code_dim).transpose(0, 1)
        return code.unsqueeze(0).expand(self.n_regions, B, code.shape[1])

    def generate_params(self, code: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-net parameters per layer: W (K, Bw, out, in), b (K, Bw, out); Bw = B, or 1 unconditioned.

        All K hyper-nets (and all their parameter tensors' hidden layers) in one einsum; one bmm per
        generated tensor for the output layers.
        """
        if not self.conditioned:
            return [(w.unsqueeze(1), b.unsqueeze(1)) for w, b in zip(self.weights, self.biases)]
        if code is None:
            raise ValueError("this field is conditioned on a latent code")
        zk = self._local_codes(code)                                            # (K, B, c)
        hidden = torch.relu(torch.einsum("kbc,klhc->klbh", zk, self.hyper_in_weight)
                            + self.hyper_in_bias.unsqueeze(2))                  # (K, L, B, H)
        K, B = zk.shape[:2]
        flat = [torch.baddbmm(b2.unsqueeze(1), hidden[:, j], w2.transpose(1, 2))  # (K, B, numel)
                for j, (w2, b2) in enumerate(zip(self.hyper_out_weight, self.hyper_out_bias))]
        return [(flat[2 * i].reshape(K, B, *self.param_shapes[2 * i]),
                 flat[2 * i + 1].reshape(K, B, *self.param_shapes[2 * i + 1]))
                for i in range(len(self.layer_shapes))]

    def batched_weights(self, code: torch.Tensor | None = None) -> list[LayerWeights]:
        """Weights for `forward`: computed once per code batch and reused by every call with it.

        W is transposed to (in, out) for x @ W and both W and b of the sine layers are multiplied by
        ω (sin(ω(xW + b)) = sin(x(ωW) + ωb)), which saves one elementwise op per layer in the
        forward, backward and double-backward passes.
        """
        out = []
        last = len(self.layer_shapes) - 1
        for i, (w, b) in enumerate(self.generate_params(code)):
            K, Bw, o, n_in = w.shape
            scale = self.omega if i < last else 1.0
            wt = (w * scale).transpose(-1, -2).reshape(K * Bw, n_in, o)
            out.append((wt, (b * scale).reshape(K * Bw, 1, o)))
        return out

    # ------------------------------------------------------------------ fusion
    def blend_weights(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Softmax blend weights (B, N, K) from the absolute positions x (B, N, 3).

        `frozen` uses detached parameters (no parameter gradients, gradients w.r.t. x still flow).
        """
        h = x
        n = len(self.fusion)
        for i, lin in enumerate(self.fusion):
            w, b = (lin.weight.detach(), lin.bias.detach()) if frozen else (lin.weight, lin.bias)
            h = F.linear(h, w, b)
            if i < n - 1:
                if self.fusion_norms is not None:
                    ln = self.fusion_norms[i]
                    lw, lb = (ln.weight.detach(), ln.bias.detach()) if frozen else (ln.weight, ln.bias)
                    h = F.layer_norm(h, ln.normalized_shape, lw, lb, ln.eps)
                h = F.leaky_relu(h)
        return torch.softmax(h, dim=-1)

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def _landmarks(landmarks: torch.Tensor, B: int) -> torch.Tensor:
        return landmarks.unsqueeze(0).expand(B, *landmarks.shape) if landmarks.dim() == 2 else landmarks

    def forward(self, x: torch.Tensor, landmarks: torch.Tensor, code: torch.Tensor | None = None, *,
                weights: list[LayerWeights] | None = None, frozen: bool = False) -> torch.Tensor:
        """Blend-field value (B, N, out) at points x (B, N, 3).

        landmarks: (B, K, 3) or (K, 3). code: (B, C) for a conditioned field. weights: output of
        `batched_weights(code)` to reuse across calls. frozen: no gradients to
        this field's parameters (gradients w.r.t. x and through given weights still flow).
        """
        local = self.local_fields(x, landmarks, code, weights=weights, frozen=frozen)  # (K, B, N, out)
        w = self.blend_weights(x, frozen=frozen)                                        # (B, N, K)
        # Σ_n w_n ψ_n as multiply + sum over K (an einsum here becomes B*N tiny GEMMs on CPU).
        return (local * w.permute(2, 0, 1).unsqueeze(-1)).sum(0)

    def local_fields(self, x: torch.Tensor, landmarks: torch.Tensor, code: torch.Tensor | None = None, *,
                     weights: list[LayerWeights] | None = None, frozen: bool = False) -> torch.Tensor:
        """The K local fields ψ_n(γ(x - l_n)) (K, B, N, out), batched: one baddbmm per layer."""
        landmarks = self._landmarks(landmarks, x.shape[0])
        if weights is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                weights = self.batched_weights(code)
        K, B, N = self.n_regions, x.shape[0], x.shape[1]
        rel = x.unsqueeze(0) - landmarks.transpose(0, 1).unsqueeze(2)          # (K, B, N, 3)
        Bw = weights[0][0].shape[0] // K
        rows = (K, B * N) if Bw == 1 else (K * B, N)                             # bmm batch, rows

        # First layer without materialising the encoding: W γ = W_x (x-l) + W_s sin(.) + W_c cos(.),
        # three accumulated GEMMs (a cat/stack of the encoding costs zero-filled buffers in the
        # double backward).
        wt, b = weights[0]
        h = b
        if self.pe_include_input:
            h = torch.baddbmm(h, rel.reshape(*rows, 3), wt[:, :3])
        if self.pe_freqs:
            arg = (rel.unsqueeze(-2) * self.freq_bands.to(rel.dtype)[:, None]).reshape(*rows, 3 * self.pe_freqs)
            h = torch.baddbmm(h, self._sin(arg), wt[:, self.sin_rows])
            h = torch.baddbmm(h, torch.cos(arg), wt[:, self.cos_rows])
        for wt, b in weights[1:]:
            h = torch.baddbmm(b, self._sin(h), wt)                               # one GEMM for all K (x B)
        return h.reshape(K, B, N, self.out_dim)

    def _sin(self, z: torch.Tensor) -> torch.Tensor:
        return sine(z) if self.fused_sine else torch.sin(z)
