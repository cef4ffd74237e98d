"""Jobs: fit and extract in worker processes, training in a child process, all off the request loop.

* `WorkerHandle`: one `python -m backend.server.worker` process (niced, own torch thread budget),
  started ahead of need and kept warm (the model stays loaded between jobs). A reader thread turns
  its stdout frames into mailbox events. Cancel: the worker is asked first (a fit stops at its next
  step); a worker that has not stopped within `cancel_grace_s` (an extraction has no cancel point) is
  killed and replaced.
* `TrainRunner`: a thread that runs the training pipeline as child processes, one after the other:
  `python -m backend.cli make-default` (only for the default data), `python -m backend.cli preprocess`
  (skipped when the folder already holds samples), then `python -m training.train ... [--resume]`.
  It tails `metrics.jsonl` for progress and training metrics and forwards the children's output as
  log lines. Cancel and server shutdown send SIGTERM: the trainer finishes its step, writes a
  checkpoint and exits; `train` with `resume: true` (the default) continues from that checkpoint.
* `JobManager` (request loop only): the job table, the queue, limits, and what goes to whom.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from addon.link import protocol as P

from . import pipe
from .engine import Mailbox

log = logging.getLogger("imface.server.jobs")

REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(threads: int) -> dict[str, str]:
    """Environment of the server's children: our code first on the path, a fixed thread budget."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["IMFACE_SERVER_PID"] = str(os.getpid())
    return env


def niced(argv: list[str], nice: int) -> list[str]:
    """`python -m MODULE ...` -> `python -m backend.server.launch NICE MODULE ...` (lower priority)."""
    assert argv[1] == "-m"
    return [argv[0], "-m", "backend.server.launch", str(int(nice)), *argv[2:]]


# Children get their own session (a Ctrl-C in the server's terminal reaches the server only, which then
# stops them in order: SIGTERM to the trainer lets it write its checkpoint).
_NEW_SESSION = {"start_new_session": True} if os.name == "posix" else {}


# ------------------------------------------------------------------------------------------ jobs


@dataclass
class Job:
    id: str
    kind: str                       # fit | extract | train
    route: bytes                    # the requesting client's routing id
    session: str
    request_id: str
    params: dict[str, Any]
    state: str = "queued"
    progress: float = 0.0
    message: str = "queued"
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: float | None = None
    worker: "WorkerHandle | None" = None
    runner: "TrainRunner | None" = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def body(self, with_result: bool) -> dict[str, Any]:
        b: dict[str, Any] = {"job": self.id, "kind": self.kind, "state": self.state, "progress": float(self.progress),
                             "message": self.message, "metrics": dict(self.metrics)}
        if self.error is not None:
            b["error"] = self.error
        if with_result and self.result is not None:
            b["result"] = self.result
        return b


# ------------------------------------------------------------------------------------------ workers


class WorkerHandle:
    """One worker process and the thread reading its output."""

    def __init__(self, index: int, mailbox: Mailbox, *, threads: int, nice: int, device: str,
                 roots: list[str]) -> None:
        self.index = index
        self.mailbox = mailbox
        self.job: Job | None = None
        self.ready = False
        cmd = [sys.executable, "-m", "backend.server.worker", "--threads", str(threads), "--nice", str(nice),
               "--device", device, "--roots", *roots]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=child_env(threads), cwd=str(REPO_ROOT), **_NEW_SESSION)
        # (the worker nices itself: it has to come up before lowering its priority slows its start-up)
        # Writes go through a queue and a thread: a worker still importing torch (or busy) does not read
        # its stdin, and a blocking pipe write must never stall the request loop.
        self._outbox: "queue.SimpleQueue[dict[str, Any] | None]" = queue.SimpleQueue()
        threading.Thread(target=self._write, name=f"imface-worker{index}-in", daemon=True).start()
        threading.Thread(target=self._read, name=f"imface-worker{index}-out", daemon=True).start()
        threading.Thread(target=self._read_stderr, name=f"imface-worker{index}-err", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, obj: dict[str, Any]) -> bool:
        """Queue a message for the worker (never blocks); False when the worker is gone."""
        if not self.alive():
            return False
        self._outbox.put(obj)
        return True

    def _write(self) -> None:
        assert self.proc.stdin is not None
        while True:
            obj = self._outbox.get()
            if obj is None:
                return
            try:
                pipe.write_frame(self.proc.stdin, obj)
            except (OSError, ValueError):
                return  # the worker is gone; its reader reports the exit

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            try:
                msg = pipe.read_frame(self.proc.stdout)
            except Exception as exc:
                log.error("worker %d: unreadable output (%s)", self.index, exc)
                msg = None
            if msg is None:
                self.mailbox.post(("worker_exit", self, self.proc.wait()))
                return
            self.mailbox.post(("worker", self, msg))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        wlog = logging.getLogger(f"imface.worker{self.index}")
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                wlog.info("%s", line)

    def stop(self, timeout: float = 2.0) -> None:
        if self.alive():
            self.send({"op": "exit"})
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._outbox.put(None)

    def kill(self) -> None:
        self._outbox.put(None)
        if self.alive():
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


# ------------------------------------------------------------------------------------------ training


@dataclass
class TrainPlan:
    run_dir: Path                   # <out>/train
    steps: list[tuple[str, list[str]]]  # (phase, argv) run one after the other
    total_steps: int | None
    resume_from: int | None         # the checkpoint step a resume starts from
    model_path: Path                # <run_dir>/model.safetensors
    log_path: Path
    check: Callable[[], None] | None = None  # run first, on the runner thread (may raise ProtocolError)
    resume: bool = True             # continue from <run_dir>/checkpoints/last.safetensors when there is one
    checkpoint_step: Callable[[Path], int | None] | None = None  # reads a checkpoint's step

    def train_argv(self, argv: list[str]) -> list[str]:
        """The trainer's command line, with --resume / --overwrite decided now (at launch)."""
        last = self.run_dir / "checkpoints" / "last.safetensors"
        if not last.is_file():
            self.resume_from = None
            return argv
        if self.resume:
            self.resume_from = self.checkpoint_step(last) if self.checkpoint_step else None
            return argv + ["--resume"]
        self.resume_from = None
        return argv + ["--overwrite"]


class TrainRunner(threading.Thread):
    def __init__(self, job: Job, plan: TrainPlan, mailbox: Mailbox, *, threads: int, nice: int) -> None:
        super().__init__(name=f"imface-train-{job.id[:8]}", daemon=True)
        self.job = job
        self.plan = plan
        self.mailbox = mailbox
        self.threads = threads
        self.nice = nice
        self.proc: subprocess.Popen[bytes] | None = None
        self.cancelled = False
        self.announced = False          # the job was already reported cancelled
        self.checkpointed = False       # the checkpoint written after the cancel is on disk
        self._ckpt_before: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def _ckpt_stamp(self) -> tuple[int, int] | None:
        try:
            st = (self.plan.run_dir / "checkpoints" / "last.safetensors").stat()
            return (st.st_ino, st.st_mtime_ns)
        except OSError:
            return None

    @property
    def child_pid(self) -> int | None:
        p = self.proc
        return p.pid if p is not None and p.poll() is None else None

    def cancel(self) -> None:
        """SIGTERM the running child (the trainer checkpoints and exits); no later phase starts."""
        with self._lock:
            if not self.cancelled:
                self._ckpt_before = self._ckpt_stamp()
            self.cancelled = True
            p = self.proc
        if p is not None and p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass

    def kill(self) -> None:
        with self._lock:
            self.cancelled = True
            p = self.proc
        if p is not None and p.poll() is None:
            p.kill()

    def _post(self, **kw: Any) -> None:
        self.mailbox.post(("train", self.job, kw))

    def _announce(self, message: str) -> bool:
        """Report the job cancelled once (from either thread); False if it already was."""
        with self._lock:
            if self.announced:
                return False
            self.announced = True
        self._post(state="cancelled", message=message)
        return True

    def run(self) -> None:
        plan = self.plan
        plan.log_path.parent.mkdir(parents=True, exist_ok=True)
        n = len(plan.steps)
        try:
            if plan.check is not None:
                self._post(state="running", progress=0.0, message="checking the scan folder")
                try:
                    plan.check()
                except P.ProtocolError as exc:
                    self._post(state="failed", error=exc.to_body())
                    return
            with open(plan.log_path, "ab", buffering=0) as logf:  # unbuffered: readable while it runs
                for k, (phase, argv) in enumerate(plan.steps):
                    if phase == "train":
                        argv = plan.train_argv(argv)
                    with self._lock:
                        if self.cancelled:
                            self._post(state="cancelled", message=f"cancelled before {phase}")
                            return
                        logf.write(f"\n== {phase}: {' '.join(argv)}\n".encode())
                        logf.flush()
                        self.proc = subprocess.Popen(niced(argv, self.nice), stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                     env=child_env(self.threads), cwd=str(REPO_ROOT),
                                                     **_NEW_SESSION)
                    self._post(state="running", progress=0.0 if phase != "train" else None,
                               message=f"{phase} (step {k + 1}/{n})", metrics={"pid": self.proc.pid, "phase": phase})
                    out = threading.Thread(target=self._pump_output, args=(self.proc, logf, phase), daemon=True)
                    out.start()
                    rc = self._watch(self.proc, phase)
                    out.join(5)
                    if self.cancelled:
                        done = "; checkpoint written" if (phase == "train" and rc == 0) else ""
                        if not self._announce(f"cancelled during {phase}{done}") and done and not self.checkpointed:
                            self._post(state="note", message=f"cancelled during {phase}{done}")
                        return
                    if rc != 0:
                        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
                        hint = " (run train again with resume: true to continue from the last checkpoint)" \
                            if phase == "train" else ""
                        self._post(state="failed", error=P.error_body(P.E_INTERNAL, f"{phase} {how}{hint}; see {plan.log_path}",
                                                                     {"phase": phase, "returncode": rc}))
                        return
            if not plan.model_path.is_file():
                self._post(state="failed", error=P.error_body(P.E_INTERNAL, f"training stopped without writing "
                                                             f"{plan.model_path}; see {plan.log_path}"))
                return
            self._post(state="done", progress=1.0, message="trained",
                       result={"model": str(plan.model_path), "run": str(plan.run_dir),
                               "resumed_from_step": plan.resume_from, "log": str(plan.log_path)})
        except Exception as exc:  # never silently: the job fails with the reason
            log.exception("training job failed")
            self._post(state="failed", error=P.error_body(P.E_INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            self.mailbox.post(("train_exit", self.job))

    def _pump_output(self, proc: subprocess.Popen[bytes], logf: Any, phase: str) -> None:
        assert proc.stdout is not None
        last = 0.0
        for raw in proc.stdout:
            logf.write(raw)
            line = raw.decode("utf-8", "replace").rstrip()
            if phase == "train" and self.cancelled and line.startswith(("SIGTERM", "SIGINT")):
                self._announce("cancelled: the trainer finishes its current step, writes a checkpoint and exits")
            now = time.monotonic()
            if line and now - last > 0.05:  # forwarded as log lines, at most 20 per second
                last = now
                self.mailbox.post(("train_log", self.job, phase, line[:2000]))
        logf.flush()

    def _watch(self, proc: subprocess.Popen[bytes], phase: str) -> int:
        """Wait for the child; during training tail metrics.jsonl (progress + metrics, 4 per second)."""
        metrics_path = self.plan.run_dir / "metrics.jsonl"
        offset = 0
        last_step = None
        # The file a previous run left is not this run's progress: the trainer replaces it (resume:
        # without the lines past its checkpoint) or deletes it (fresh start) when it starts; until then
        # (imports, data loading) the old file's inode is still there and is ignored.
        old = _stamp(metrics_path)
        inode = None
        last_post = 0.0
        while True:
            rc = proc.poll()
            if phase == "train":
                now = _stamp(metrics_path)
                if old is not None and now != old:
                    old = None  # written (or replaced, or deleted) since the launch: this run's file
                now_inode = now[0] if now is not None else None
                size = now[2] if (now is not None and old is None) else -1
                if now_inode != inode:
                    inode, offset = now_inode, 0
                if 0 <= size < offset:
                    offset = 0  # rewritten
                if size > offset and time.monotonic() - last_post >= 0.25:
                    with open(metrics_path, "rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read(size - offset)
                    cut = chunk.rfind(b"\n") + 1
                    offset += cut
                    rec = None
                    for line in chunk[:cut].splitlines():
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            continue
                    if rec is not None and rec.get("step") != last_step:
                        last_post = time.monotonic()
                        last_step = rec.get("step")
                        total = self.plan.total_steps
                        prog = (int(last_step) + 1) / total if (total and isinstance(last_step, int)) else None
                        m = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                        m["pid"] = proc.pid
                        m["phase"] = "train"
                        self._post(state="running", progress=prog, message=f"training step {last_step}",
                                   metrics=m)
            if rc is not None:
                return rc
            if phase == "train" and self.cancelled and not self.checkpointed:
                # The trainer acknowledges the signal (its log line: the job is reported cancelled then),
                # finishes its step, writes the checkpoint, then plots and exits (~1 s more): say when the
                # checkpoint is on disk; the training slot is freed at the exit.
                stamp = self._ckpt_stamp()
                if stamp is not None and stamp != self._ckpt_before:
                    self.checkpointed = True
                    msg = "cancelled; checkpoint written (resume with train, resume: true)"
                    if not self._announce(msg):
                        self._post(state="note", message=msg)
            time.sleep(0.05 if phase == "train" and not self.cancelled else 0.01 if phase == "train" else 0.2)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# ------------------------------------------------------------------------------------------ manager


class JobManager:
    """The job table (request loop only). `emit(job, event_body_for_owner)` is called on every change."""

    def __init__(self, mailbox: Mailbox, emit: Callable[[Job], None], *, workers: int = 1, worker_threads: int = 1,
                 nice: int = 10, device: str = "auto", roots: list[str] | None = None,
                 max_active: int = 16, keep_finished: int = 64, cancel_grace_s: float = 1.0) -> None:
        self.mailbox = mailbox
        self.emit = emit
        self.n_workers = max(0, int(workers))
        self.worker_threads = worker_threads
        self.nice = nice
        self.device = device
        self.roots = list(roots or [])
        self.max_active = max_active
        self.keep_finished = keep_finished
        self.cancel_grace_s = cancel_grace_s
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: deque[Job] = deque()
        self.train_queue: deque[Job] = deque()
        self.workers: list[WorkerHandle] = []
        self.training: Job | None = None
        self._next_worker = 0
        self.on_trained: Callable[[Path], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start_workers(self) -> None:
        while len(self.workers) < self.n_workers:
            self._spawn()

    def _spawn(self) -> WorkerHandle:
        w = WorkerHandle(self._next_worker, self.mailbox, threads=self.worker_threads, nice=self.nice,
                         device=self.device, roots=self.roots)
        self._next_worker += 1
        self.workers.append(w)
        log.info("worker process %d started (pid %d)", w.index, w.pid)
        return w

    def active(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.active]

    @property
    def busy(self) -> bool:
        return any(j.state == "running" for j in self.jobs.values())

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    # ------------------------------------------------------------------ submit / cancel
    def submit(self, job: Job) -> None:
        if len(self.active()) >= self.max_active:
            raise P.ProtocolError(P.E_BUSY, f"{self.max_active} jobs are already queued or running; try later",
                                  {"limit": self.max_active})
        self.jobs[job.id] = job
        (self.train_queue if job.kind == "train" else self.queue).append(job)
        self._forget_old()
        self.emit(job)
        self.schedule()

    def schedule(self) -> None:
        while self.queue:
            idle = [w for w in self.workers if w.job is None and w.alive()]
            if not idle:
                if len([w for w in self.workers if w.alive()]) < max(1, self.n_workers):
                    self.workers = [w for w in self.workers if w.alive()]
                    idle = [self._spawn()]
                else:
                    break
            job = self.queue.popleft()
            w = idle[0]
            job.worker = w
            w.job = job
            job.state, job.started, job.message = "running", time.time(), "starting"
            msg = {"op": "run", "job": job.id, "kind": job.kind, **job.params["worker"]}
            if not w.send(msg):
                self._finish(job, "failed", error=P.error_body(P.E_INTERNAL, "the worker process is gone"))
                w.job = None
                continue
            self.emit(job)
        if self.training is None and self.train_queue:
            job = self.train_queue.popleft()
            self.training = job
            job.state, job.started, job.message = "running", time.time(), "starting"
            runner = TrainRunner(job, job.params["plan"], self.mailbox, threads=job.params["threads"], nice=self.nice)
            job.runner = runner
            runner.start()
            self.emit(job)

    def cancel(self, job: Job) -> None:
        if not job.active:
            return
        job.cancel_requested = time.monotonic()
        if job.state == "queued":
            for q in (self.queue, self.train_queue):
                if job in q:
                    q.remove(job)
            self._finish(job, "cancelled", message="cancelled before it started")
            return
        job.message = "cancelling"
        if job.kind == "train" and job.runner is not None:
            job.runner.cancel()
        elif job.worker is not None:
            job.worker.send({"op": "cancel", "job": job.id})
        self.emit(job)

    def tick(self) -> None:
        """Called by the loop: enforce the cancel grace period of worker jobs."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if (job.active and job.cancel_requested is not None and job.kind != "train"
                    and now - job.cancel_requested > self.cancel_grace_s and job.worker is not None):
                w = job.worker
                log.info("worker %d did not stop job %s within %.1f s: killing it", w.index, job.id[:8],
                         self.cancel_grace_s)
                w.kill()
                w.job = None
                self._finish(job, "cancelled", message="cancelled (worker stopped)")
                self.workers = [x for x in self.workers if x is not w]
                self.start_workers()
                self.schedule()

    # ------------------------------------------------------------------ events from threads
    def on_worker(self, w: WorkerHandle, msg: dict[str, Any]) -> None:
        ev = msg.get("event")
        if ev == "ready":
            w.ready = True
            return
        job = self.jobs.get(msg.get("job", ""))
        if job is None or job.worker is not w or not job.active:
            return
        if ev == "progress":
            job.progress = float(msg.get("progress", job.progress))
            job.message = str(msg.get("message", job.message))
            job.metrics.update(msg.get("metrics") or {})
            self.emit(job)
            return
        w.job = None
        if ev == "done":
            self._finish(job, "done", result=msg.get("result"), message="done")
        elif ev == "cancelled":
            self._finish(job, "cancelled", message="cancelled")
        else:
            self._finish(job, "failed", error=msg.get("error") or P.error_body(P.E_INTERNAL, "worker failed"))
        self.schedule()

    def on_worker_exit(self, w: WorkerHandle, rc: int) -> None:
        if w in self.workers:
            self.workers.remove(w)
        job = w.job
        w.job = None
        if job is not None and job.active:
            if job.cancel_requested is not None:
                self._finish(job, "cancelled", message="cancelled (worker stopped)")
            else:
                self._finish(job, "failed", error=P.error_body(P.E_INTERNAL, f"the worker process exited ({rc})"))
        if not getattr(self, "_stopping", False):
            self.start_workers()
            self.schedule()

    def on_train(self, job: Job, kw: dict[str, Any]) -> None:
        if kw.get("state") == "note":  # news about a cancelled job (its checkpoint is written)
            if job.state == "cancelled":
                job.message = str(kw.get("message", job.message))
                self.emit(job)
            return
        if not job.active:
            return
        state = kw.get("state", "running")
        if kw.get("progress") is not None:
            job.progress = float(kw["progress"])
        if kw.get("message"):
            job.message = str(kw["message"])
        if kw.get("metrics"):
            job.metrics = dict(kw["metrics"])
        if state == "running":
            self.emit(job)
            return
        if state == "done" and self.on_trained is not None:
            try:
                self.on_trained(Path(kw["result"]["model"]))
            except Exception:
                log.exception("registering the trained model failed")
        self._finish(job, state, result=kw.get("result"), error=kw.get("error"), message=kw.get("message"))

    def on_train_exit(self, job: Job) -> None:
        """The runner thread ended (its child has exited): the training slot is free."""
        if job.active:  # (cannot happen: the runner always reports an end state first)
            self._finish(job, "failed", error=P.error_body(P.E_INTERNAL, "the training runner stopped"))
        if self.training is job:
            self.training = None
        self.schedule()

    # ------------------------------------------------------------------ helpers
    def _finish(self, job: Job, state: str, *, result: dict[str, Any] | None = None,
                error: dict[str, Any] | None = None, message: str | None = None) -> None:
        job.state = state
        job.finished = time.time()
        if state == "done":
            job.progress = 1.0
        job.result = result
        job.error = error
        if message:
            job.message = message
        elif error:
            job.message = str(error.get("message", state))
        self.emit(job)

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if not j.active]
        for j in finished[:max(0, len(finished) - self.keep_finished)]:
            self.jobs.pop(j.id, None)

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Jobs told (cancelled events), training checkpointed (SIGTERM, then wait), workers stopped."""
        self._stopping = True
        for job in list(self.queue) + list(self.train_queue):
            self._finish(job, "cancelled", message="the server is shutting down")
        self.queue.clear()
        self.train_queue.clear()
        runner = self.training.runner if self.training is not None else None
        if runner is not None:
            runner.cancel()
        for w in self.workers:
            if w.job is not None:
                w.send({"op": "cancel", "job": w.job.id})
        deadline = time.monotonic() + grace_s
        if runner is not None:
            runner.join(max(0.0, deadline - time.monotonic()))
            if runner.is_alive():
                log.warning("the training process did not stop within %.0f s: killing it", grace_s)
                runner.kill()
                runner.join(5)
        for w in self.workers:
            w.stop(timeout=2.0)
        for job in self.jobs.values():
            if job.active:
                self._finish(job, "cancelled", message="the server is shutting down")
