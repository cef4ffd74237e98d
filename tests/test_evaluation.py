"""Honest evaluation (backend/evaluate.py, docs/evaluation.md): exact point-to-surface distances, like
with like, EDE only where it means something, and seen / unseen expressions and training / held-out
identities reported apart."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import trimesh
from model_fixture import one_thread, tiny_model  # noqa: F401  (fixtures)

from backend.evaluate import EvaluationTable, ScanEvaluation, front_view_mm
from backend.geometry.metrics import BallRegion, compare_meshes


def _grid(n: int, z: float = 0.0, size: float = 80.0, diagonal: str = "/") -> tuple[np.ndarray, np.ndarray]:
    xs = np.linspace(-size / 2, size / 2, n)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    v = np.c_[x.ravel(), y.ravel(), np.full(n * n, z)]
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    f = np.r_[np.c_[a, b, c], np.c_[a, c, d]] if diagonal == "/" else np.r_[np.c_[a, b, d], np.c_[b, c, d]]
    return v, f


def test_exact_distances_have_no_sampling_floor():
    a = _grid(41)
    b = _grid(29, diagonal="\\")        # the same square, another triangulation
    region = BallRegion((0.0, 0.0, 0.0), 35.0)
    r = compare_meshes(a, b, n_points=20_000, region=region, exact=True)
    assert r["chamfer_l1"] > 0.05                 # two samplings of one surface are ~0.1 mm apart
    assert r["exact_chamfer"] < 1e-9 and r["exact_fscore"] == 1.0
    # A surface 0.7 mm away: exactly 0.7, both directions; the sampled value can only be larger.
    e = compare_meshes(a, _grid(29, z=0.7), n_points=20_000, region=region, exact=True)
    assert e["exact_accuracy"] == pytest.approx(0.7, abs=1e-9) and e["exact_completeness"] == pytest.approx(0.7, abs=1e-9)
    assert e["chamfer_l1"] > 0.7


def test_front_view_is_what_the_viewer_sees_with_holes_closed():
    v, f = _grid(41, z=20.0)
    hidden = _grid(11, z=5.0, size=30.0)          # a structure behind the face (a mouth's inside)
    hole = np.linalg.norm(v[f].mean(1)[:, :2] - [-25.0, 20.0], axis=1) < 6.0   # and a hole in the face
    mesh_v = np.concatenate([v, hidden[0]])
    mesh_f = np.concatenate([f[~hole], hidden[1] + len(v)])
    sv, sf = front_view_mm(mesh_v, mesh_f)
    assert np.allclose(sv[:, 2], 20.0)             # the hidden plane is gone
    area = trimesh.Trimesh(sv, sf).area
    assert area == pytest.approx(80.0 * 80.0, rel=1e-6)   # the hole is closed (the square's full area)


def test_table_means_and_groups():
    rows = [ScanEvaluation("a/neutral", "a", "neutral", neutral=True, neutral_scan=True, training_identity=True,
                           chamfer_mm=0.4, tde_mm=1.0),
            ScanEvaluation("a/smile", "a", "smile", training_identity=True, chamfer_mm=0.6, ede_mm=2.0, tde_mm=3.0),
            ScanEvaluation("b/smile", "b", "smile", training_identity=False, unseen=True, chamfer_mm=1.0, ede_mm=4.0,
                           tde_mm=5.0),
            ScanEvaluation("b/bad", "b", "bad", error="unreadable")]
    t = EvaluationTable(rows)
    g = t.groups()
    assert g["all"]["ede_mm"] == pytest.approx(3.0)             # EDE over the non-neutral scans only
    assert g["all"]["tde_mm"] == pytest.approx(3.0) and g["all"]["n"] == 3
    assert g["training identities"]["chamfer_mm"] == pytest.approx(0.5)
    assert g["held-out identities"]["chamfer_mm"] == pytest.approx(1.0)
    assert g["seen expressions"]["n"] == 1 and g["unseen expressions"]["ede_mm"] == pytest.approx(4.0)
    # one group per expression: smile's mean over a and b, neutral alone, the failed scan in none
    assert g["expression smile"]["chamfer_mm"] == pytest.approx(0.8) and g["expression smile"]["n"] == 2
    assert g["expression neutral"]["chamfer_mm"] == pytest.approx(0.4) and "expression bad" not in g
    md = t.to_markdown()
    assert "b/smile (held out, unseen)" in md and "**mean: held-out identities** (1)" in md


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory):
    """Two of the training person's scans (mouth_open marked unseen) and a held-out person (id02)."""
    from training.data.synthetic_faces import generate_scan_folder

    root = tmp_path_factory.mktemp("eval")
    held = generate_scan_folder(root / "held", n_identities=3, seed=3, expressions=["neutral", "mouth_open"])
    train = json.loads((tiny_model.scans / "manifest.json").read_text())
    held_m = json.loads((held / "manifest.json").read_text())
    scans = []
    for base, m, keep in ((tiny_model.scans, train, ("id00/neutral", "id00/mouth_open")),
                          (held, held_m, ("id02/neutral", "id02/mouth_open"))):
        for s in m["scans"]:
            if f"{s['identity']}/{s['expression']}" in keep:
                scans.append(dict(s, path=str(base / s["path"]), unseen=s["identity"] == "id00"
                                  and s["expression"] == "mouth_open"))
    (root / "manifest.json").write_text(json.dumps(dict(train, scans=scans)))
    return root


def test_evaluate_folder_reports_apart_and_measures_exactly(tiny_model, folder):
    from backend.evaluate import evaluate_folder
    from backend.fitting import FitSchedule
    from backend.model.io import load_model

    model, ck = load_model(tiny_model.path)
    table = evaluate_folder(model, folder, schedule=FitSchedule.scaled(FitSchedule.fast(), 0.25), resolution=64,
                            n_points=20_000, training_identities=ck.dataset["identities"])
    rows = {r.key: r for r in table.rows}
    assert not any(r.error for r in rows.values())
    for r in rows.values():
        # Same sampled points: the exact distance to a surface is never more than to its nearest sample.
        assert r.chamfer_exact_mm <= r.chamfer_mm + 1e-9, r
        assert 0.1 < r.chamfer_exact_mm < 3.0 and math.isfinite(r.tde_mm), r
        assert r.accuracy_exact_mm > 0 and r.completeness_exact_mm > 0
    from backend.fitting.loop import neutral_warp_off

    for k in ("id00/neutral", "id02/neutral"):      # no capture (nothing moves); EDE as the neutral policy says
        assert rows[k].neutral == neutral_warp_off(True) and math.isnan(rows[k].capture)
        # fitted with the warp off: no EDE (0 by eq. 12); with it on: E should be close to the identity
        assert math.isnan(rows[k].ede_mm) if rows[k].neutral else 0 < rows[k].ede_mm < 2.0, rows[k]
    for k in ("id00/mouth_open", "id02/mouth_open"):
        r = rows[k]
        assert 0 < r.ede_mm < 10 and r.capture_moving_mm > 0 and r.capture_static_mm > 0, r
        assert -1.0 < r.capture <= 1.0, r
        # motion is capture's scale: capture = 1 - moving / motion
        assert r.capture == pytest.approx(1.0 - r.capture_moving_mm / r.capture_motion_mm, abs=1e-9), r
    g = table.groups()
    with_ede = [r.ede_mm for r in rows.values() if not r.neutral]   # EDE: the scans fitted with the warp on
    assert g["all"]["ede_mm"] == pytest.approx(np.mean(with_ede)) and not any(np.isnan(with_ede))
    assert g["training identities"]["n"] == 2 and g["held-out identities"]["n"] == 2
    assert g["unseen expressions"]["n"] == 1 and g["seen expressions"]["n"] == 1   # (neutral scans are neither)
    assert rows["id02/mouth_open"].training_identity is False and rows["id00/mouth_open"].unseen
