"""Training batches: contract shapes, determinism by (seed, step), DDP sharding, neutral fallbacks."""
from __future__ import annotations

import json

import pytest
import torch

from training.dataset import DatasetError, ProcessedScans
from synthetic_samples import write_synthetic_processed

KW = dict(seed=3, scans_per_batch=4, points_per_scan=64, near_fraction=0.75, surface_points=16, dense_points=32)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> ProcessedScans:
    folder = write_synthetic_processed(tmp_path_factory.mktemp("samples"), n_identities=3,
                                       expressions=("neutral", "smile", "frown"), n_samples=1000,
                                       n_surface=200, n_dense=100, skip_neutral_for=(2,))
    return ProcessedScans.load(folder)


def test_batch_follows_the_model_contract(scans):
    b = scans.batch(5, **KW)
    B, N, M, D = 4, 64, 16, 32
    shapes = {"scan_index": (B,), "identity_index": (B,), "neutral": (B,), "points": (B, N, 3), "sdf": (B, N),
              "gradients": (B, N, 3), "surface_points": (B, M, 3), "surface_normals": (B, M, 3),
              "landmarks": (B, 5, 3), "neutral_landmarks": (B, 5, 3), "dense_index": (D,),
              "dense_points": (B, D, 3), "neutral_dense_points": (B, D, 3), "dense_valid": (B, D)}
    assert {k: tuple(v.shape) for k, v in b.items()} == shapes
    assert b["scan_index"].dtype == torch.long and b["neutral"].dtype == torch.bool
    assert b["dense_valid"].dtype == torch.bool and b["points"].dtype == torch.float32
    # 3/4 of the points come from the near-surface part of each file (|sdf| small there).
    near = b["sdf"][:, :48].abs().mean()
    uniform = b["sdf"][:, 48:].abs().mean()
    assert near < uniform


def test_same_seed_and_step_same_batch_any_order(scans):
    a = scans.batch(7, **KW)
    scans.batch(2, **KW)  # other steps in between change nothing
    b = scans.batch(7, **KW)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = scans.batch(8, **KW)
    assert not torch.equal(a["points"], c["points"])


def test_epochs_visit_every_scan(scans):
    spe = scans.steps_per_epoch(4)
    seen = torch.cat([scans.global_slots(3, s, 4) for s in range(spe)])
    assert set(seen.tolist()) == set(range(scans.n_scans))
    other_epoch = torch.cat([scans.global_slots(3, s, 4) for s in range(spe, 2 * spe)])
    assert not torch.equal(seen, other_epoch)


def test_rank_shards_compose_the_global_batch(scans):
    full = scans.batch(4, **KW)
    parts = [scans.batch(4, **KW, rank=r, world_size=2) for r in range(2)]
    for k in full:
        if k == "dense_index":  # one vertex subset for the whole batch, on every rank
            assert all(torch.equal(p[k], full[k]) for p in parts)
        else:
            assert torch.equal(torch.cat([p[k] for p in parts]), full[k]), k
    with pytest.raises(ValueError, match="divisible"):
        scans.batch(0, **{**KW, "scans_per_batch": 3}, rank=0, world_size=2)


def test_neutral_targets_and_templates(scans):
    assert any("id02" in n and "no neutral" in n for n in scans.notes)
    b = scans.batch(0, **KW)
    for i in range(4):
        ident = int(b["identity_index"][i])
        members = [k for k, s in enumerate(scans.scans) if s.identity_index == ident]
        neutral = [k for k in members if scans.scans[k].neutral]
        src = neutral or members
        expect = torch.stack([scans._data[k].landmarks for k in src]).mean(0)
        assert torch.allclose(b["neutral_landmarks"][i], expect)
    assert scans.template_landmarks().shape == (5, 3)
    assert scans.template_dense().shape == (100, 3)
    assert torch.allclose(scans.template_landmarks(), scans.neutral_landmarks.mean(0))


def test_memory_cap_keeps_a_fixed_subset(tmp_path):
    folder = write_synthetic_processed(tmp_path / "s", n_identities=2, n_samples=1000, n_surface=50, n_dense=10)
    a = ProcessedScans.load(folder, max_samples_per_scan=300, seed=1)
    b = ProcessedScans.load(folder, max_samples_per_scan=300, seed=1)
    assert a._data[0].points.shape == (300, 3) and a._data[0].n_near == 150
    assert torch.equal(a._data[0].points, b._data[0].points)


def test_broken_folders_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no index.json"):
        ProcessedScans.load(tmp_path)
    folder = write_synthetic_processed(tmp_path / "s", n_identities=2, n_samples=200, n_surface=20, n_dense=10)
    victim = folder / "id01" / "smile.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DatasetError, match="id01/smile.*re-run preprocessing"):
        ProcessedScans.load(folder)
    index = json.loads((folder / "index.json").read_text())
    index["format"] = "something-else"
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="format"):
        ProcessedScans.load(folder)


def test_memory_mapped_storage_gives_the_same_batches(tmp_path):
    folder = write_synthetic_processed(tmp_path / "s", n_identities=2, n_samples=500, n_surface=50, n_dense=20)
    mem = ProcessedScans.load(folder)
    mapped = ProcessedScans.load(folder, storage="mmap")
    assert mapped.memory_bytes() < mem.memory_bytes()
    a, b = mem.batch(3, **KW), mapped.batch(3, **KW)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_worker_processes_build_the_same_batches(scans):
    from training.dataset import StepBatches, iterate_batches

    kw = {k: v for k, v in KW.items()}
    batches = StepBatches(scans, total_steps=6, rank=0, world_size=1, **kw)
    inline = list(iterate_batches(batches, start_step=2, workers=0))
    workers = list(iterate_batches(batches, start_step=2, workers=1))
    assert len(inline) == len(workers) == 4
    for a, b in zip(inline, workers):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_surface_sample_is_a_fixed_subset_of_the_scans_surface_samples(scans):
    every = scans.surface_sample(0, 10**9)
    assert torch.equal(every, scans._data[0].surface_points)
    part = scans.surface_sample(0, 50, seed=1)
    assert part.shape == (50, 3) and torch.equal(part, scans.surface_sample(0, 50, seed=1))
    assert not torch.equal(part, scans.surface_sample(0, 50, seed=2))
    # each drawn point is one of the scan's samples, none twice
    rows = {tuple(r) for r in every.tolist()}
    assert all(tuple(r) in rows for r in part.tolist()) and len({tuple(r) for r in part.tolist()}) == 50


def test_points_drawn_where_the_face_moves(tmp_path):
    import numpy as np

    folder = write_synthetic_processed(tmp_path / "s", n_identities=2, expressions=("neutral", "smile"),
                                       n_samples=1000, n_surface=200, n_dense=100)
    data = ProcessedScans.load(folder)
    with pytest.raises(ValueError, match="mark_moving"):
        data.batch(0, **KW, moving_fraction=0.25)
    k = next(i for i, s in enumerate(data.scans) if not s.neutral)
    d, meta = data._data[k], data.scans[k]
    ref = data.neutral_dense[meta.identity_index]
    ok = (d.dense_valid & data.neutral_dense_valid[meta.identity_index]).numpy()
    motion = torch.linalg.norm(d.dense_points - ref, dim=1).numpy()
    threshold = float(np.median(motion[ok]))          # half of the valid vertices count as moving
    assert data.mark_moving(threshold) == 2
    assert all(len(data._data[i].moving_near) == 0 for i, s in enumerate(data.scans) if s.neutral)
    # A near sample is marked exactly when its closest valid vertex moves more than the threshold.
    verts, moves = d.dense_points.numpy()[ok], motion[ok] > threshold
    near = d.points[:d.n_near].numpy()
    closest = np.argmin(((near[:, None, :] - verts[None]) ** 2).sum(-1), axis=1)
    assert set(d.moving_near.tolist()) == set(np.flatnonzero(moves[closest]).tolist())
    assert 0 < len(d.moving_near) < d.n_near
    # A quarter of each expressive scan's near and surface draws now come from the marked ones.
    b = data.batch(0, **KW, moving_fraction=0.25)
    k_near, k_move = 48, 12
    marked = d.points[d.moving_near]
    assert (b["scan_index"] == k).any()               # 4 scans, 4 per batch: every batch holds them all
    slot = int((b["scan_index"] == k).nonzero()[0, 0])
    drawn = b["points"][slot, k_near - k_move:k_near]
    assert all(bool((marked == p).all(1).any()) for p in drawn)
    s_marked = d.surface_points[d.moving_surface]
    assert all(bool((s_marked == p).all(1).any()) for p in b["surface_points"][slot, -4:])
    # Same seed and step, same batch; moving_fraction 0 is the uniform draw.
    again = data.batch(0, **KW, moving_fraction=0.25)
    assert all(torch.equal(b[key], again[key]) for key in b)
    assert torch.equal(data.batch(0, **KW, moving_fraction=0.0)["points"], data.batch(0, **KW)["points"])


def test_moving_points_need_shared_topology(tmp_path):
    folder = write_synthetic_processed(tmp_path / "s", n_identities=2, shared_topology=False,
                                       n_samples=400, n_surface=50)
    with pytest.raises(DatasetError, match="shared-topology"):
        ProcessedScans.load(folder).mark_moving()
