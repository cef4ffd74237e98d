"""ImFace++ model: config, Mini-Nets blocks (Neural Blend-Field), exp map, losses, full model."""
from .blend_field import BlendField, positional_encoding
from .config import LossWeights, ModelConfig
from .imface import FaceCodes, FaceField, ImFacePlusPlus
from .losses import kappa_schedule
from .se3 import se3_apply, se3_exp_matrix, so3_exp_matrix

__all__ = [
    "BlendField", "FaceCodes", "FaceField", "ImFacePlusPlus", "LossWeights", "ModelConfig",
    "kappa_schedule", "positional_encoding", "se3_apply", "se3_exp_matrix", "so3_exp_matrix",
]
