"""The backend server against the same work done in-process, side by side in one run.

A real server subprocess (`python -m backend.server serve`, CURVE on, loopback) and clients from
`addon.link.client`; the in-process figures use the same decoder settings (`backend.server.model_service`).

* decode latency of a ~20k-vertex frame: in-process warm decode vs a `decode` request (the same frames
  of a timeline, each warm-started from the previous one); the overhead is the round trip minus the
  server's own decode time (`decode_s` in the reply), per request;
* first-pass `stream` frames per second vs one-by-one `decode` requests (the same timeline, uncached:
  the gain of pipelining and of decoding back to back);
* cached frames per second to one consumer (the stream again, from the server's frame cache, to a
  client whose own cache is empty);
* slider latency (one decode per edit) while a fit job runs in the worker process vs idle;
* p99 of `AsyncClient.pump()` while a stream arrives (Blender calls it from a timer: it must not wait).

    python benchmarks/bench_server.py                     # trains a small model first (~30 s)
    python benchmarks/bench_server.py --model runs/default/train/model.safetensors --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from addon.link import protocol as P  # noqa: E402
from addon.link.client import AsyncClient, Client  # noqa: E402


def ms(x: float) -> str:
    return f"{1e3 * x:7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained model.safetensors (default: train a small one first)")
    ap.add_argument("--vertices", type=int, default=20_000, help="aimed template size")
    ap.add_argument("--frames", type=int, default=24, help="frames per timeline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for decodes (server and in-process)")
    ap.add_argument("--fit-steps", type=int, default=1500, help="steps of the background fit (plain schedule)")
    ap.add_argument("--scans", help="scan folder with landmark_vertex_indices, for the background fit (default: "
                                    "the small model's own scans)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from model_fixture import model_for_benchmark
    from server_fixture import start_server

    import backend.server.model_service as svc
    args.model, scans, tmp = model_for_benchmark(args.model, args.threads, "server")
    scans = args.scans or scans
    lm = svc.load(args.model, template_resolution=None)
    probe = svc.build_template(lm.model, 96)
    res = int(round(96 * np.sqrt(args.vertices / max(1, len(probe.vertices)))))
    lm.template = svc.build_template(lm.model, res)
    lm.template_resolution = res
    nv = len(lm.template.vertices)

    # Timelines: an expression morph of one sampled person (each frame a new set of codes).
    s = svc.codes_sample(lm, 4, seed=5, scale=0.6)

    def timeline(a: int, b: int, shift: float = 0.0) -> list[dict[str, np.ndarray]]:
        out = []
        for t in np.linspace(0.0, 1.0, args.frames):
            c = {"identity": s["identity"][a:a + 1], "detail": s["detail"][a:a + 1],
                 "expression": ((1 - t) * s["expression"][a] + t * s["expression"][b])[None] + np.float32(shift)}
            out.append({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in c.items()})
        return out

    line = timeline(0, 1)
    line_stream = timeline(0, 1, shift=3e-5)    # the same work as `line`, other cache keys
    line_requests = timeline(0, 1, shift=1e-5)
    line_pump = timeline(2, 3)
    line_idle, line_busy = timeline(1, 2), timeline(1, 2, shift=2e-5)

    # ---------------------------------------------------------------- the server
    work = Path(tempfile.mkdtemp(prefix="bench_server_"))
    roots = [Path(args.model).resolve().parent] + ([Path(scans)] if scans else [])
    server = start_server(work / "home", model=args.model, roots=roots,
                          extra=["--template-resolution", res, "--threads", args.threads, "--workers", 1,
                                 "--worker-threads", 1])
    med = statistics.median
    try:
        c = Client(server.connection_file, timeout=60, retries=0)
        c.connect(timeout=60)
        # Decode latency, paired: frame i in-process, then frame i through the server (the same load on
        # a shared machine for both), each a warm chain along the same timeline.
        dec = svc.new_decoder(lm.model, lm.template)
        svc.decode(dec, line[0], False)
        c.request("decode", {"face": "bench", "codes": line[0], "with_topology": True})
        inproc, rt = [], []
        frames_in, frames_srv = [], []
        for x in line[1:]:
            t0 = time.perf_counter()
            frames_in.append(svc.decode(dec, x, False)[0])
            inproc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = c.request("decode", {"face": "bench", "codes": x})
            rt.append(time.perf_counter() - t0)
            frames_srv.append(r["vertices"])
        # The transport overhead from a pass of server requests alone (nothing else in between).
        c.request("decode", {"face": "bench-overhead", "codes": line[0]})
        rt2, srv, inside = [], [], []
        for x in timeline(0, 1, shift=6e-5)[1:]:
            t0 = time.perf_counter()
            r = c.request("decode", {"face": "bench-overhead", "codes": x})
            rt2.append(time.perf_counter() - t0)
            srv.append(float(r["decode_s"]))
            inside.append(float(r["server_s"]))
        overhead = [a - b for a, b in zip(rt2, srv)]
        same = max(float(np.abs(a - b).max()) for a, b in zip(frames_in, frames_srv))
        worst = max(float(np.abs(frames_in[i] - svc.decode(svc.new_decoder(lm.model, lm.template), line[i + 1],
                                                            False)[0]).max()) for i in (0, len(line) // 2, len(line) - 2))
        hits = []
        for x in line[1:]:
            t0 = time.perf_counter()
            r = c.request("decode", {"face": "bench", "codes": x})
            hits.append(time.perf_counter() - t0)
            assert r["cached"]
        pings = []
        for _ in range(50):
            t0 = time.perf_counter()
            c.request("ping")
            pings.append(time.perf_counter() - t0)

        # First pass: one-by-one warm decode requests, the stream, one-by-one again (averaged: the same
        # load around the stream); and the straightforward way: a cold decode per frame (a new face).
        def one_by_one(frames: list, face: str) -> float:
            t0 = time.perf_counter()
            for x in frames:
                c.request("decode", {"face": face, "codes": x})
            return len(frames) / (time.perf_counter() - t0)

        stacked = {p: np.concatenate([x[p] for x in line_stream]) for p in P.CODE_PARTS}
        fps_one = [one_by_one(line_requests, "one-by-one")]
        c2 = Client(server.connection_file, timeout=60, retries=0)
        c2.connect(timeout=60)
        t0 = time.perf_counter()
        n = sum(1 for _ in c2.stream("stream-face", list(range(len(line_stream))), stacked, timeout=120))
        fps_stream = n / (time.perf_counter() - t0)
        c2.close()
        fps_one.append(one_by_one(timeline(0, 1, shift=4e-5), "one-by-one-2"))
        n_cold = max(4, args.frames // 4)
        t0 = time.perf_counter()
        for k, x in enumerate(timeline(0, 1, shift=5e-5)[:n_cold]):
            c.request("decode", {"face": f"cold-{k}", "codes": x})
        fps_cold = n_cold / (time.perf_counter() - t0)
        # cached: the same stream again, to a client with an empty cache
        c3 = Client(server.connection_file, timeout=60, retries=0)
        c3.connect(timeout=60)
        t0 = time.perf_counter()
        n3 = sum(1 for _ in c3.stream("stream-face", list(range(len(line_stream))), stacked, timeout=120))
        cached_s = time.perf_counter() - t0
        c3.close()

        # Slider latency while a fit job runs in the worker process vs idle, paired: the worker is
        # paused (SIGSTOP) for the idle samples and resumed (SIGCONT) for the busy ones, alternately.
        idle, busy = [], []
        fit_state = "no scan"
        if scans:
            import json
            import os
            import signal

            from backend.scans.landmarks import LANDMARK_NAMES

            scan = sorted(Path(scans).glob("*/*.ply"))[0]
            idx = json.loads((Path(scans) / "manifest.json").read_text())["landmark_vertex_indices"]
            job = c.request("fit", {"path": str(scan), "options": {
                "landmark_indices": [int(idx[k]) for k in LANDMARK_NAMES], "schedule": "plain",
                "steps": args.fit_steps, "resolution": 64, "registered": False}})["job"]
            worker = c.request("info")["workers"][0]["pid"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                st = c.request("job.status", {"job": job})
                if st["state"] == "running" and st["progress"] > 0:
                    break
                time.sleep(0.1)
            try:
                for i, (a, b) in enumerate(zip(line_idle, line_busy)):
                    for paused, x, into in ((True, a, idle), (False, b, busy)) if i % 2 else \
                            ((False, b, busy), (True, a, idle)):
                        os.kill(worker, signal.SIGSTOP if paused else signal.SIGCONT)
                        time.sleep(0.05)
                        t0 = time.perf_counter()
                        c.request("decode", {"face": "slider-idle" if paused else "slider-busy", "codes": x})
                        into.append(time.perf_counter() - t0)
            finally:
                os.kill(worker, signal.SIGCONT)
            fit_state = c.request("job.status", {"job": job})["state"]
            c.request("job.cancel", {"job": job})

        # p99 of pump() while a stream arrives
        ac = AsyncClient(server.connection_file, timeout=60)
        ac.start()
        while ac.state != "ready":
            ac.pump()
            time.sleep(0.005)
        stacked_p = {p: np.concatenate([x[p] for x in line_pump]) for p in P.CODE_PARTS}
        h = ac.stream("pump-face", list(range(len(line_pump))), stacked_p)
        pumps = []
        while not h.complete:
            t0 = time.perf_counter()
            ac.pump()
            pumps.append(time.perf_counter() - t0)
            time.sleep(0.001)  # a timer tick
        ac.close()
        c.close()
    finally:
        code = server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmodel {args.model}; threads {args.threads}; template {res}^3: {nv:,} vertices; {args.frames}-frame "
          f"timelines; server exit code {code}")
    print(f"warm vs cold decode (in-process, 3 frames): max {worst / 100:.1e} model units "
          f"({worst * 1e3:.2f} µm); server frames vs in-process frames: max {same:.1e} mm")
    print("\n| figure | in-process / idle | through the server / busy | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| decode latency, {nv:,}-vertex warm frame (median; in-process and server frames alternate) | "
          f"{ms(med(inproc))} | {ms(med(rt))} | "
          f"x{med(rt) / med(inproc):.2f} |")
    print(f"| transport overhead per decode (round trip - server decode time; a pass of requests alone; "
          f"median, p90) | - | "
          f"{ms(med(overhead))}, {ms(float(np.percentile(overhead, 90)))} | - |")
    print(f"| of which: in the server around the decode (thread hand-offs) / on the wire and in the client "
          f"(median) | - | {ms(med([a - b for a, b in zip(inside, srv)]))} / "
          f"{ms(med([a - b for a, b in zip(rt2, inside)]))} | - |")
    print(f"| cached decode round trip, {nv:,} vertices (median) | - | {ms(med(hits))} | - |")
    print(f"| ping round trip (median) | - | {ms(med(pings))} | - |")
    print(f"| first pass: stream vs one-by-one warm decode requests (frames/s) | {med(fps_one):7.1f} | "
          f"{fps_stream:7.1f} | x{fps_stream / med(fps_one):.2f} |")
    print(f"| first pass: stream vs one-by-one cold decodes, a fresh decoder per frame (frames/s) | "
          f"{fps_cold:7.1f} | {fps_stream:7.1f} | x{fps_stream / fps_cold:.2f} |")
    print(f"| cached stream to one consumer (frames/s) | - | {n3 / cached_s:7.1f} | - |")
    if busy:
        print(f"| slider decode latency, worker paused vs a fit job running (median of {len(busy)} pairs; fit "
              f"{fit_state}) | {ms(med(idle))} | "
              f"{ms(med(busy))} | x{med(busy) / med(idle):.2f} |")
    print(f"| AsyncClient.pump() during a stream: p99 / max ({len(pumps)} calls) | - | "
          f"{ms(float(np.percentile(pumps, 99)))} / {ms(max(pumps))} | - |")
    print("\ncommand: python benchmarks/bench_server.py " + " ".join(sys.argv[1:]))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
