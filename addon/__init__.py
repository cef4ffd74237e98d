"""Blender side of the product (bpy only; it must never import torch).

Planned (not built yet): a panel that starts or connects to the backend process, face objects whose
identity/expression/detail codes are keyframable properties, and a frame-change handler that asks the
backend for vertices over ZeroMQ and writes them with `foreach_set`. Until then this package registers
nothing, so enabling it is harmless.
"""


def register() -> None:
    pass


def unregister() -> None:
    pass
