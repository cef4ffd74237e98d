"""Training throughput of the batched Mini-Nets blocks against the looped reference.

One training step = ImFacePlusPlus.forward (ExpNet -> IDNet -> TempNet [-> DetailNet -> chain again],
spatial gradients with create_graph for the normal/Eikonal terms, landmark passes) + backward of the
total loss (the double backward). Both implementations share the same parameters; the run first
checks that they agree (SDF values, spatial gradients, loss values, parameter gradients; float64 and
float32), then times them interleaved (median over rounds) and prints sample points per second and the
ratio. A first line splits one block (ExpNet) into its K mini-nets (batched vs looped) and its fusion
network (the same code in both), which bounds the whole-chain ratio.

Timing: process CPU time on CPU (the machine may be shared; wall time would mostly measure the other
processes), wall time after synchronisation on CUDA. `--malloc-tune` keeps glibc from returning large
freed blocks to the OS (page faults on every big tensor otherwise).

    python benchmarks/bench_blend_field.py                      # paper sizes, CPU, 1 thread
    python benchmarks/bench_blend_field.py --preset cpu --points 2048 --batch 4
    python benchmarks/bench_blend_field.py --device cuda --batch 16 --points 4096
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.model import ImFacePlusPlus, ModelConfig  # noqa: E402
from backend.scans.frame import MM_PER_UNIT, NOSE_TIP_DEPTH_MM  # noqa: E402
from backend.scans.landmarks import CANONICAL_LANDMARKS_MM  # noqa: E402
from tests.looped_blend_field import local_fields_looped, use_looped  # noqa: E402


def template_landmarks() -> torch.Tensor:
    lm = torch.tensor(CANONICAL_LANDMARKS_MM / MM_PER_UNIT, dtype=torch.float32)
    lm[:, 2] += NOSE_TIP_DEPTH_MM / MM_PER_UNIT  # nose tip at (0, 0, 0.4)
    return lm


def make_batch(B: int, N: int, M: int, D: int, V: int, device: torch.device, gen: torch.Generator) -> dict:
    """Random face-sized batch in the normalised frame (values only matter for timing)."""
    def r(*s: int) -> torch.Tensor:
        return torch.rand(*s, generator=gen)

    def n(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen)

    tl = template_landmarks()
    b = {
        "scan_index": torch.arange(B), "identity_index": torch.arange(B) // 2,
        "neutral": torch.arange(B) % 4 == 0,
        "points": (r(B, N, 3) * 2 - 1) * 0.9, "sdf": n(B, N) * 0.05,
        "gradients": F.normalize(n(B, N, 3), dim=-1),
        "surface_points": (r(B, M, 3) * 2 - 1) * 0.9, "surface_normals": F.normalize(n(B, M, 3), dim=-1),
        "landmarks": tl + 0.02 * n(B, 5, 3), "neutral_landmarks": tl + 0.02 * n(B, 5, 3),
    }
    if D > 0:
        b.update(dense_index=torch.randperm(V, generator=gen)[:D], dense_points=r(B, D, 3) - 0.5,
                 neutral_dense_points=r(B, D, 3) - 0.5, dense_valid=r(B, D) > 0.1)
    return {k: v.to(device) for k, v in b.items()}


def step(model: ImFacePlusPlus, batch: dict, stage: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(batch, stage=stage, kappa=0.5)
    out["total"].backward()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _outputs(model: ImFacePlusPlus, batch: dict, stage: int) -> dict:
    out = step(model, batch, stage)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    codes = model.codes(batch["scan_index"], batch["identity_index"])
    x = batch["points"].detach().clone().requires_grad_(True)
    s = model.field(codes, neutral=batch["neutral"], detail=stage == 2).sdf(x, with_detail=stage == 2, chunk=None)
    g, = torch.autograd.grad(s.sum(), x)
    return {"loss": {k: v.detach() for k, v in out.items()}, "grads": grads, "sdf": s.detach(), "grad": g.detach()}


def compare(model: ImFacePlusPlus, batch: dict, stage: int) -> dict[str, float]:
    """Max differences between the batched and looped evaluations (same parameters, same batch).

    In float64 (the same code on a double copy of the model) the two must agree to rounding; in
    float32 the spatial gradient of this high-frequency SIREN chain carries ~1e-3 rounding error
    of its own (measured here as looped float32 vs looped float64), so batched vs looped is also
    reported next to that scale.
    """
    res: dict[str, dict] = {}
    m64 = copy.deepcopy(model).double()
    b64 = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    for impl in ("batched", "looped"):
        use_looped(model, impl == "looped")
        use_looped(m64, impl == "looped")
        res[impl] = _outputs(model, batch, stage)
        res[impl + "64"] = _outputs(m64, b64, stage)
    use_looped(model, False)

    def mx(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b.double()).abs().max().item()

    a, b, a64, b64_ = res["batched"], res["looped"], res["batched64"], res["looped64"]
    return {
        "sdf64": mx(a64["sdf"], b64_["sdf"]), "grad64": mx(a64["grad"], b64_["grad"]),
        "sdf": mx(a["sdf"], b["sdf"]), "grad_x": mx(a["grad"], b["grad"]),
        "grad_x_scale": b["grad"].abs().max().item(),
        "grad_x_f32_error": mx(b["grad"], b64_["grad"]),
        "loss_rel": max(((a["loss"][k] - b["loss"][k]).abs() / b["loss"][k].abs().clamp_min(1e-12)).item()
                        for k in b["loss"]),
        "param_grad_rel64": max((mx(a64["grads"][k], b64_["grads"][k])
                                 / b64_["grads"][k].abs().max().clamp_min(1e-12).item()) for k in b64_["grads"]),
    }


def tune_glibc_malloc() -> bool:
    """Keep freed memory in the heap (no mmap/munmap per large tensor, hence no page faults)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30))


def bench(model: ImFacePlusPlus, batch: dict, stage: int, rounds: int, iters: int,
          device: torch.device) -> dict[str, float]:
    """Median seconds per step. On CPU this is process CPU time (robust on a shared machine, where
    wall time mostly measures the other processes); on CUDA wall time after synchronisation."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {"batched": [], "looped": []}
    for impl in ("batched", "looped"):  # warm-up
        use_looped(model, impl == "looped")
        step(model, batch, stage)
    for _ in range(rounds):             # interleaved rounds: both see the same machine load
        for impl in ("batched", "looped"):
            use_looped(model, impl == "looped")
            sync(device)
            t0 = clock()
            for _ in range(iters):
                step(model, batch, stage)
            sync(device)
            times[impl].append((clock() - t0) / iters)
    use_looped(model, False)
    return {k: statistics.median(v) for k, v in times.items()}


def block_breakdown(model: ImFacePlusPlus, batch: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """ExpNet block alone (forward + gradient w.r.t. x + double backward), by part: the K mini-nets
    batched vs looped, and the fusion network that both implementations run identically."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    f = model.exp_net
    x0 = torch.cat((batch["points"], batch["surface_points"]), dim=1)
    z = model.codes(batch["scan_index"], batch["identity_index"]).expression.detach()
    lm = batch["landmarks"]

    def run(fn) -> None:
        x = x0.detach().clone().requires_grad_(True)
        y = fn(x)
        g, = torch.autograd.grad(y.sum(), x, create_graph=True)
        (y.square().mean() + g.square().mean()).backward()

    parts = {
        "minis_batched": lambda x: f.local_fields(x, lm, z),
        "minis_looped": lambda x: local_fields_looped(f, x, lm, z),
        "fusion": lambda x: f.blend_weights(x),
    }
    out: dict[str, list[float]] = {k: [] for k in parts}
    for k, fn in parts.items():
        run(fn)
    for _ in range(rounds):
        for k, fn in parts.items():
            sync(device)
            t0 = clock()
            run(fn)
            sync(device)
            out[k].append(clock() - t0)
    model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=("paper", "cpu"), default="paper")
    ap.add_argument("--batch", type=int, default=4, help="scans per batch (B)")
    ap.add_argument("--points", type=int, default=1024, help="SDF samples per scan (N)")
    ap.add_argument("--surface", type=int, default=None, help="on-surface samples per scan (default N/4)")
    ap.add_argument("--dense", type=int, default=None, help="dense correspondences per batch (default N/4)")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malloc-tune", action="store_true",
                    help="glibc: no mmap for large blocks, no trimming (fewer page faults on CPU)")
    args = ap.parse_args()
    if args.malloc_tune and not tune_glibc_malloc():
        print("warning: could not tune glibc malloc")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = ModelConfig.paper() if args.preset == "paper" else ModelConfig.cpu()
    M = args.surface if args.surface is not None else args.points // 4
    D = args.dense if args.dense is not None else min(args.points // 4, cfg.dense_per_batch)
    V = max(2 * D, 64)
    gen = torch.Generator().manual_seed(args.seed)
    model = ImFacePlusPlus(cfg, n_identities=(args.batch + 1) // 2, n_scans=args.batch,
                           template_landmarks=template_landmarks(),
                           template_dense=torch.rand(V, 3, generator=gen) - 0.5)
    model.to(device)
    batch = make_batch(args.batch, args.points, M, D, V, device, gen)
    n_pts = args.batch * (args.points + M)
    print(f"device={device} threads={torch.get_num_threads()} preset={args.preset} B={args.batch} "
          f"N={args.points} M={M} dense={D} -> {n_pts} SDF/normal points per step; torch {torch.__version__}")

    model.freeze_for_stage(1)
    br = block_breakdown(model, batch, args.rounds, device)
    print(f"ExpNet block alone, {n_pts} pts, fwd + grad + double bwd: K mini-nets batched "
          f"{br['minis_batched'] * 1e3:.1f} ms vs looped {br['minis_looped'] * 1e3:.1f} ms "
          f"(x{br['minis_looped'] / br['minis_batched']:.2f}); fusion net (same code in both) "
          f"{br['fusion'] * 1e3:.1f} ms")

    worst = 0.0
    for stage in (int(s) for s in args.stages.split(",")):
        model.freeze_for_stage(stage)
        d = compare(model, batch, stage)
        worst = max(worst, d["sdf64"], d["grad64"], d["sdf"])
        print(f"stage {stage}: max |batched - looped| float64: sdf {d['sdf64']:.1e}, grad_x {d['grad64']:.1e}, "
              f"param grads (rel) {d['param_grad_rel64']:.1e}")
        print(f"stage {stage}: max |batched - looped| float32: sdf {d['sdf']:.1e}, grad_x {d['grad_x']:.1e} "
              f"(|grad_x| <= {d['grad_x_scale']:.2f}; float32 rounding of the looped grad_x itself: "
              f"{d['grad_x_f32_error']:.1e}), losses (rel) {d['loss_rel']:.1e}")
        t = bench(model, batch, stage, args.rounds, args.iters, device)
        tb, tl = t["batched"], t["looped"]
        print(f"stage {stage}: batched {tb * 1e3:8.1f} ms/step {n_pts / tb:9.0f} pts/s | "
              f"looped {tl * 1e3:8.1f} ms/step {n_pts / tl:9.0f} pts/s | speed-up x{tl / tb:.2f}")
    print(f"max abs difference (float64 sdf and grad_x, float32 sdf): {worst:.1e} -> "
          f"{'OK (<= 1e-5)' if worst <= 1e-5 else 'ABOVE 1e-5'}")


if __name__ == "__main__":
    main()
