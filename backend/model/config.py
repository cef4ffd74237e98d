"""Configuration of the ImFace++ model (sizes, SIREN frequencies, loss weights).

Everything here is a plain dataclass so that a config can be written into a checkpoint with
`dataclasses.asdict(cfg)` (JSON-serialisable) and read back with `ModelConfig.from_dict(d)` (the one
config loader, `backend.config_loader`: typed, fixed choices, bad fields named).

Sizes follow ImFace++ §4.2 (`ModelConfig.paper()`); `ModelConfig.cpu()` keeps the same architecture
with smaller widths so that a short training run on two CPU cores is feasible.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from backend.config_loader import check_choices, config_from_dict

WarpKind = Literal["se3", "translation"]


@dataclass
class LossWeights:
    """Trade-off weights λ1..λ9 of ImFace++ eq. 13-18 and the eq. 12 constraint (§4.2 values).

    Every term is a *mean* (over points, landmarks, code entries, ...), never a sum, so that the
    weights do not depend on batch size or on the number of samples per scan; the relative weights
    are the paper's (the official ImFace code normalises the same way).
    """

    sdf: float = 3e3                    # λ1  |f(p) - s̄|
    normal: float = 1e2                 # λ2  1 - cos(∇f(p), n̄)
    eikonal: float = 5e1                # λ3  observation + canonical space Eikonal terms
    embedding: float = 1e5              # λ4  ||z_exp||², ||z_id||²
    embedding_detail: float = 1e3       # λ5  ||z_detail||²
    landmark_generation: float = 1e3    # λ6  Landmark-Nets η, η'
    landmark_consistency: float = 1e2   # λ7  E(l) -> neutral, I(E(l)) -> template
    residual: float = 1e2               # λ8  |δ|
    expression: float = 1e4             # λ9  ||E(p) - p||² on neutral scans


@dataclass
class ModelConfig:
    """All sizes of ImFacePlusPlus. Defaults are the paper's (§4.2)."""

    # Local regions: one mini-net per landmark (outer eye corners, nose tip, mouth corners).
    n_landmarks: int = 5
    # Latent codes (auto-decoded, normal init with a small std).
    id_dim: int = 160
    exp_dim: int = 160
    detail_dim: int = 160
    code_init_std: float = 0.01
    # The official ImFace code gives each local hyper-net its own slice of the code (dim / K each);
    # False feeds the whole code to every local hyper-net.
    split_code: bool = True
    # Sinusoidal positional encoding of x - l_n: [x, sin(2^i x), cos(2^i x)] for i < pe_freqs.
    pe_freqs: int = 6
    pe_include_input: bool = True
    # Mini-nets of ExpNet, IDNet and TempNet: SIREN MLPs with `mini_layers` hidden sine layers.
    mini_hidden: int = 32
    mini_layers: int = 3
    omega: float = 30.0
    # Mini-nets of DetailNet (wider, higher frequency).
    detail_hidden: int = 64
    detail_layers: int = 3
    detail_omega: float = 60.0
    # Hyper-nets: one ReLU hidden layer per generated parameter tensor; the output layer's weights
    # are scaled by `hyper_out_scale` so the generated mini-net weights start at SIREN init.
    hyper_hidden: int = 32
    hyper_out_scale: float = 1e-2
    # Fusion network (blend weights from the absolute position; softmax over the K regions).
    fusion_width: int = 128
    fusion_layers: int = 3
    fusion_layernorm: bool = True
    # Landmark-Nets η(z_exp, z_id) and η'(z_id): fully connected, LeakyReLU.
    landmark_width: int = 256
    landmark_layers: int = 3
    # Deformation types: ExpNet is an SE(3) field (§3.3.1); IDNet a translation field by default.
    exp_warp: WarpKind = "se3"
    id_warp: WarpKind = "translation"
    # DetailNet refinement displacement (eq. 7): d = max * tanh(D(p'')), attenuation
    # χ(s) = 1 / (1 + (s / attenuation)^4) as in IDF; the base SDF value in χ and the base normal are
    # detached (IDF / official code), which avoids a third-order backward through the base chain.
    detail_max_displacement: float = 0.05
    detail_attenuation: float = 0.02
    detail_detach_base: bool = True
    # Landmark consistency (eq. 17): dense corresponding points used per batch (m).
    dense_per_batch: int = 4096
    # Stage-two blending κ L_f + (1 - κ) L_f̂: T_m of the cosine ramp (see losses.kappa_schedule).
    kappa_t_m: float = 0.0
    # Learning-rate multiplier of the latent codes relative to the networks (parameter_groups).
    code_lr_scale: float = 1.0
    # The K mini-nets run in one bmm per layer; the one choice is kept so that every model file
    # (they all store it) still loads. The looped reference is in tests/looped_blend_field.py.
    blend_impl: Literal["batched"] = "batched"
    loss: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):  # tolerate a nested dict given straight to the constructor
            self.loss = LossWeights(**self.loss)
        if self.split_code:
            for name in ("id_dim", "exp_dim", "detail_dim"):
                if getattr(self, name) % self.n_landmarks:
                    raise ValueError(f"{name}={getattr(self, name)} must be divisible by "
                                     f"n_landmarks={self.n_landmarks} when split_code is True")
        check_choices(self)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> "ModelConfig":
        """Inverse of `dataclasses.asdict`; unknown keys are an error (they are usually typos)."""
        return config_from_dict(cls, d, where)

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls) -> "ModelConfig":
        """Sizes of ImFace++ §4.2 (160-d codes, 32/64-wide mini-nets, ω 30/60, ...)."""
        return cls()

    @classmethod
    def cpu(cls) -> "ModelConfig":
        """Same architecture, smaller: for a short training run on two CPU cores.

        Codes 80-d (16 per region), 4 frequency bands, narrower detail/fusion/landmark nets and
        fewer dense correspondences per batch.
        """
        return cls(
            id_dim=80, exp_dim=80, detail_dim=80,
            pe_freqs=4,
            detail_hidden=32,
            fusion_width=64,
            landmark_width=128,
            dense_per_batch=512,
        )
