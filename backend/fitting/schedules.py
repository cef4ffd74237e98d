"""Fitting schedules: stages of optimiser steps, each with its points, learning rate and codes.

The default `fast()` is coarse to fine (few points per step while the codes are far off, more once
they are close), identity and expression first on the base SDF f̂ without the second-order terms, then
every code on the full f with the normal / Eikonal terms, Adam with cosine decay. `plain()` is the
straightforward reference: one stage, every code, the full objective, a constant learning rate, a
fixed number of points (1,500 steps by default).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from backend.codes import PARTS
from backend.config_loader import config_from_dict

CodePart = Literal["identity", "expression", "detail"]


@dataclass
class FitStage:
    """A run of optimiser steps with one setting."""

    steps: int
    points: int = 2048              # SDF samples per step (near and uniform, 3:1)
    surface: int = 1024             # surface points per step
    free: int = 1024                # free-space samples per step (point-cloud targets)
    lr: float = 3e-3                # Adam learning rate at the start of the stage
    lr_end: float | None = None     # cosine decay to this at the end of the stage (None: constant)
    codes: tuple[CodePart, ...] = PARTS  # the codes this stage moves (the others stay where they are)
    detail: bool = True             # the full f (with DetailNet) or the base f̂
    gradient_terms: bool = True     # normal + Eikonal terms on the surface points (a double backward)


@dataclass
class FitSchedule:
    name: str
    stages: list[FitStage]
    near_fraction: float = 0.75     # share of the SDF samples drawn near the surface

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def evaluations(self, free: bool = False) -> int:
        """SDF point queries the schedule makes (f and f̂ alike)."""
        return sum(s.steps * (s.points + s.surface + (s.free if free else 0)) for s in self.stages)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitSchedule":
        """A schedule from JSON/YAML data (the one config loader: typed, bad fields named)."""
        return config_from_dict(cls, d, "schedule")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def fast(cls) -> "FitSchedule":
        """Coarse to fine: identity + expression on f̂ with few points, then everything on f."""
        return cls("fast", [
            FitStage(steps=40, points=512, surface=256, free=512, lr=1e-2, lr_end=3e-3,
                     codes=("identity", "expression"), detail=False, gradient_terms=False),
            FitStage(steps=40, points=2048, surface=1024, free=1024, lr=3e-3, lr_end=3e-4,
                     codes=PARTS, detail=True, gradient_terms=True),
        ])

    @classmethod
    def plain(cls, steps: int = 1500, points: int = 2048, surface: int = 1024, lr: float = 1e-3) -> "FitSchedule":
        """The straightforward reference: every code, the full objective, constant lr, fixed points."""
        return cls("plain", [FitStage(steps=steps, points=points, surface=surface, free=points // 2, lr=lr,
                                      lr_end=None, codes=PARTS, detail=True, gradient_terms=True)])

    @classmethod
    def scaled(cls, base: "FitSchedule", factor: float) -> "FitSchedule":
        """`base` with every stage's step count multiplied by factor (at least one step each)."""
        stages = [FitStage(**{**asdict(s), "steps": max(1, int(round(s.steps * factor)))}) for s in base.stages]
        return cls(f"{base.name}x{factor:g}", stages, base.near_fraction)
