"""The straightforward reference of a Mini-Nets block: the K mini-nets one after the other, each
hyper-net evaluated inside the loop (the official ImFace code's structure). Same parameters as the
batched `BlendField`; the tests check the two agree and benchmarks/bench_blend_field.py times both.

`use_looped(model)` switches every block of a model (or one block) to it; `use_looped(model, False)`
switches back. A looped block regenerates its hyper-net weights in every call, as ImFace does, so its
`batched_weights` gives None (the model then precomputes nothing for it).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from backend.model.blend_field import BlendField, positional_encoding


def use_looped(module: nn.Module, on: bool = True) -> None:
    """Evaluate every BlendField inside `module` with the looped reference (on) or batched (off)."""
    for m in module.modules():
        if isinstance(m, BlendField):
            if on:  # instance attributes win over the class's methods
                m.forward = types.MethodType(forward_looped, m)
                m.batched_weights = lambda code=None: None
            else:
                for name in ("forward", "batched_weights"):
                    m.__dict__.pop(name, None)


def local_params_looped(self: BlendField, k: int, code: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Parameters of mini-net k only, (B|1, out, in) and (B|1, out): the hyper-net of region k."""
    if not self.conditioned:
        return [(w[k].unsqueeze(0), b[k].unsqueeze(0)) for w, b in zip(self.weights, self.biases)]
    c = self.local_code_dim
    z = code[:, k * c:(k + 1) * c] if self.split_code else code
    flat = []
    for j in range(len(self.param_shapes)):
        h = torch.relu(z @ self.hyper_in_weight[k, j].t() + self.hyper_in_bias[k, j])
        flat.append(h @ self.hyper_out_weight[j][k].t() + self.hyper_out_bias[j][k])
    B = z.shape[0]
    return [(flat[2 * i].reshape(B, *self.param_shapes[2 * i]),
             flat[2 * i + 1].reshape(B, *self.param_shapes[2 * i + 1]))
            for i in range(len(self.layer_shapes))]

def local_fields_looped(self: BlendField, x: torch.Tensor, landmarks: torch.Tensor, code: torch.Tensor | None = None,
                        frozen: bool = False) -> torch.Tensor:
    """Reference: the K local fields one mini-net after the other, (B, N, K, out)."""
    landmarks = BlendField._landmarks(landmarks, x.shape[0])
    last = len(self.layer_shapes) - 1
    outputs = []
    for k in range(self.n_regions):
        rel = x - landmarks[:, k].unsqueeze(1)
        h = positional_encoding(rel, self.pe_freqs, self.pe_include_input)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            params = local_params_looped(self, k, code)                      # hyper-net of region k
        for i, (w, b) in enumerate(params):
            h = h.matmul(w.transpose(-1, -2)) + b.unsqueeze(-2)
            if i < last:
                h = torch.sin(self.omega * h)
        outputs.append(h.unsqueeze(2))                                       # (B, N, 1, out)
    return torch.cat(outputs, dim=2)                                         # (B, N, K, out)

def forward_looped(self: BlendField, x: torch.Tensor, landmarks: torch.Tensor, code: torch.Tensor | None = None,
                   *, weights: object = None, frozen: bool = False) -> torch.Tensor:
    """Straightforward reference: one mini-net after the other (official ImFace structure)."""
    outputs = local_fields_looped(self, x, landmarks, code, frozen=frozen)
    w = self.blend_weights(x, frozen=frozen)
    return torch.sum(w.unsqueeze(-1) * outputs, dim=2)
