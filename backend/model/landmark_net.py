"""Landmark-Nets of ImFace++ (§3.1): η(z_exp, z_id) -> l (observed) and η'(z_id) -> l' (canonical)."""
from __future__ import annotations

import torch
from torch import nn


class LandmarkNet(nn.Module):
    """Fully connected layers (LeakyReLU) from a code to K 3-D landmarks.

    The output is an offset added to the template landmarks l'' (the training-set mean): with the
    small initial codes the predicted landmarks start at the mean face instead of near the origin.
    """

    def __init__(self, in_dim: int, n_landmarks: int, width: int = 256, n_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [width] * (n_layers - 1) + [3 * n_landmarks]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.LeakyReLU())
        self.net = nn.Sequential(*layers)
        self.n_landmarks = n_landmarks

    def forward(self, code: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        """code (B, C), template (K, 3) -> landmarks (B, K, 3)."""
        return template + self.net(code).view(code.shape[0], self.n_landmarks, 3)
