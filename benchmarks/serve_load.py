"""Load test of a served rnnlab model: `mlflow models serve` under a bounded mix of good and malformed requests.

Starts ``mlflow models serve`` for a registered model URI (``models:/rnnlab-lm-ptb-lstm/1``,
``models:/rnnlab-translator@champion``, ``models:/rnnlab-captioner/1``) or a pyfunc model folder, on
127.0.0.1 only, a free port, ``--env-manager local`` (this venv) and ``--workers N`` when the MLflow
version has that option. Then ``--clients`` threads on 127.0.0.1 each send ``--requests`` requests
back to back (keep-alive connections), a fixed deterministic mix per cycle of 10:

    6 good (one record each)  -> expect 200 with one prediction
    1 not JSON                -> expect 400
    1 missing column          -> expect 400
    1 oversized text / image  -> expect 400 (rnnlab.serving.MAX_TEXT_CHARS / MAX_IMAGE_B64_CHARS + 1)
    1 MAX_ROWS + 1 records    -> expect 400

and prints one JSON object: throughput (all requests and good ones per second), p50/p95/p99 latency of
the good requests, the count of each HTTP status (overall and per kind of request), the peak RSS
(and PSS, which counts pages shared between forked workers once) of the server's process tree
sampled with psutil, and whether any good request failed or any malformed one was not refused with
a 4xx. The server is stopped in every case (its whole process group, then any survivor of its
tree), also on Ctrl-C or SIGTERM. Exit code 0 when every good request got its prediction and every
malformed one a 4xx, 1 otherwise, 2 when the server did not start.

    export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db      # or --tracking-uri
    python benchmarks/serve_load.py models:/rnnlab-lm-ptb-lstm/1                 # 8 clients x 200 requests
    python benchmarks/serve_load.py models:/rnnlab-translator@champion --clients 4 --requests 50 --workers 2
    python benchmarks/serve_load.py models:/rnnlab-captioner/1 --image img.jpg   # default: a Flickr8k image

The clients run on the same machine as the server: on a small machine they take CPU from it, so the
figures are a lower bound of what the server alone could do.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CYCLE = ("good", "not_json", "good", "oversized", "good", "missing_column", "good", "too_many_records", "good", "good")
SENTENCES = (
    "A man is riding a bike.",
    "Two dogs play in the snow.",
    "A little girl climbs the stairs.",
    "A woman sells fruit at a market.",
    "People are walking down a busy street.",
)


def limits() -> dict:
    with warnings.catch_warnings(record=True):  # MLflow warns that predict() has no type hints
        from rnnlab import serving
    return {
        "MAX_ROWS": serving.MAX_ROWS,
        "MAX_TEXT_CHARS": serving.MAX_TEXT_CHARS,
        "MAX_IMAGE_B64_CHARS": serving.MAX_IMAGE_B64_CHARS,
        "MAX_BEAM": serving.MAX_BEAM,
    }


def detect_task(model: str, tracking_uri: str) -> str:
    """lm / translation / captioning from the model's signature (its required input column)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        info = mlflow.models.get_model_info(model)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown models
        print(f"serve_load: {model}: cannot read the model's metadata ({type(exc).__name__}: {exc})", file=sys.stderr)
        raise SystemExit(2) from None
    names = set(info.signature.inputs.input_names()) if info.signature else set()
    for column, task in (("prompt", "lm"), ("text", "translation"), ("image", "captioning")):
        if column in names:
            return task
    raise SystemExit(f"{model}: not an rnnlab model (input columns {sorted(names)})")


def default_image() -> Path:
    mirror = Path(os.environ.get("RNNLAB_MIRROR", REPO.parent / "shared" / "corpora"))
    images = sorted((mirror / "flickr8k" / "images").glob("*.jpg"))
    if not images:
        raise SystemExit("captioner: pass --image FILE (no Flickr8k image found under the mirror)")
    return images[0]


def request_bodies(task: str, lim: dict, args) -> dict:
    """kind -> function(i) -> body bytes, for the fixed mix."""
    if task == "lm":
        column = "prompt"

        def good_record(i):
            return {"prompt": "the company said", "tokens": args.tokens, "seed": i % 1000}

        oversized = {"prompt": "the " * (lim["MAX_TEXT_CHARS"] // 4 + 1)}
    elif task == "translation":
        column = "text"

        def good_record(i):
            return {"text": SENTENCES[i % len(SENTENCES)], "beam": args.beam}

        oversized = {"text": "a dog runs . " * (lim["MAX_TEXT_CHARS"] // 13 + 1)}
    else:
        column = "image"
        image = base64.b64encode(Path(args.image or default_image()).read_bytes()).decode("ascii")

        def good_record(i):
            return {"image": image, "beam": args.beam}

        oversized = {"image": "A" * (lim["MAX_IMAGE_B64_CHARS"] + 4)}

    def body(records):
        return json.dumps({"inputs": records}).encode()

    fixed = {
        "not_json": b"this is not json {",
        "missing_column": body([{"wrong_" + column: "x"}]),
        "oversized": body([oversized]),
        "too_many_records": body([good_record(0)] * (lim["MAX_ROWS"] + 1)),
    }
    return {"good": lambda i: body([good_record(i)]), **{k: (lambda i, b=b: b) for k, b in fixed.items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_workers_option(mlflow_bin: Path, env: dict) -> bool:
    out = subprocess.run(
        [str(mlflow_bin), "models", "serve", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    return "--workers" in out.stdout


class Server:
    """``mlflow models serve`` in its own process group; ``stop()`` ends the group and every process
    of its tree ever seen by the sampler."""

    def __init__(self, model: str, env: dict, workers: int | None, log_path: Path):
        self.port = free_port()
        cmd = [
            str(VENV_BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            model,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]
        if workers:
            cmd += ["--workers", str(workers)]
        self.cmd, self.log_path = cmd, log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - open while the server runs, closed by stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tempfile.gettempdir()
        )
        self.seen: dict[int, psutil.Process] = {}
        self.peak_rss = self.peak_pss = 0
        self.rss_samples: list[tuple[float, int]] = []  # (monotonic time, tree RSS): is memory flat under load?
        self._stop_sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self.seen.setdefault(p.pid, p)
        return procs

    def _sample(self) -> None:
        last_pss = 0.0
        while not self._stop_sampling.is_set():
            procs, rss, pss = self.tree(), 0, 0
            full = time.monotonic() - last_pss > 1.0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    if full:
                        pss += getattr(p.memory_full_info(), "pss", 0)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.rss_samples.append((time.monotonic(), rss))
            if full:
                self.peak_pss, last_pss = max(self.peak_pss, pss), time.monotonic()
            self._stop_sampling.wait(0.2)

    def wait_ready(self, timeout: float) -> float:
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"the server did not answer /ping within {timeout:.0f} s:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/ping", timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.5)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.base + "/ping", timeout=10) as resp:
                return resp.status == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> list[int]:
        """Stop the server and its workers; returns the pids that were still alive afterwards (none)."""
        self.tree()
        self._stop_sampling.set()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        survivors = [p for p in self.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in survivors:  # a worker that left the process group
            p.kill()
        psutil.wait_procs(survivors, timeout=10)
        self.log.close()
        return [p.pid for p in self.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def client(
    port: int,
    kinds: list[str],
    bodies: dict,
    offset: int,
    timeout: float,
    deadline: float,
    results: list,
    start: threading.Barrier,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start.wait()
    for j, kind in enumerate(kinds):
        if time.monotonic() > deadline:
            break
        body = bodies[kind](offset + j)
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            status, data = f"error:{type(exc).__name__}", b""
        latency = time.perf_counter() - t0
        results.append((kind, status, latency, judge(kind, status, data)))
    conn.close()


def judge(kind: str, status, data: bytes) -> bool:
    """A good request: 200 with one prediction; a malformed one: a 4xx with a message and no traceback."""
    try:
        answer = json.loads(data)
    except ValueError:
        return False
    if kind == "good":
        return status == 200 and isinstance(answer.get("predictions"), list) and len(answer["predictions"]) == 1
    return (
        isinstance(status, int)
        and 400 <= status < 500
        and bool(answer.get("message"))
        and "Traceback" not in data.decode("utf-8", "replace")
    )


def rss_by_quarter(samples: list[tuple[float, int]], start: float, end: float) -> list[float | None]:
    quarters: list[list[int]] = [[], [], [], []]
    for t, rss in samples:
        if start <= t <= end:
            quarters[min(3, int(4 * (t - start) / max(end - start, 1e-9)))].append(rss)
    return [round(max(q) / 2**20, 1) if q else None for q in quarters]


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="registered model URI (models:/name/version) or a pyfunc model folder")
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests per client (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads per worker (default 1)")
    parser.add_argument("--tokens", type=int, default=10, help="LM: tokens generated per good request")
    parser.add_argument("--beam", type=int, default=1, help="translator/captioner: beam of the good requests")
    parser.add_argument("--image", default=None, help="captioner: the image of the good requests")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long (bounded load)")
    parser.add_argument("--log", default=None, help="server log file (default: a temp file, path in the output)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.workers < 1:
        parser.error("--clients, --requests and --workers must be >= 1")

    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": args.tracking_uri,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONWARNINGS": "ignore::UserWarning",
    }
    task = detect_task(model, args.tracking_uri)
    lim = limits()
    bodies = request_bodies(task, lim, args)
    workers = args.workers if has_workers_option(VENV_BIN / "mlflow", env) else None
    log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="serve_load-", suffix=".log")[1])

    server = None

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    report: dict = {
        "model": args.model,
        "task": task,
        "tracking_uri": args.tracking_uri,
        "mlflow_workers": workers or "unsupported (1)",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "cpu_count": os.cpu_count(),
        "server_log": str(log_path),
    }
    try:
        server = Server(model, env, workers, log_path)
        atexit.register(server.stop)
        report["startup_s"] = round(server.wait_ready(args.startup_timeout), 1)
        report["peak_rss_mb_before_load"] = round(server.peak_rss / 2**20, 1)
        results: list = []
        barrier = threading.Barrier(args.clients + 1)
        deadline = time.monotonic() + args.max_seconds
        threads = []
        for c in range(args.clients):
            kinds = [CYCLE[(c + j) % len(CYCLE)] for j in range(args.requests)]
            t = threading.Thread(
                target=client,
                args=(server.port, kinds, bodies, c * args.requests, args.request_timeout, deadline, results, barrier),
                daemon=True,
            )
            t.start()
            threads.append(t)
        barrier.wait()
        t0, m0 = time.perf_counter(), time.monotonic()
        for t in threads:
            t.join()
        wall, m1 = time.perf_counter() - t0, time.monotonic()
        alive = server.alive()

        good = [r for r in results if r[0] == "good"]
        good_ok = [r for r in good if r[3]]
        bad = [r for r in results if r[0] != "good"]
        latencies = [r[2] for r in good_ok]
        by_kind: dict = {}
        for kind, status, _, _ in results:
            by_kind.setdefault(kind, Counter())[str(status)] += 1
        report.update(
            {
                "requests_sent": len(results),
                "stopped_early": len(results) < args.clients * args.requests,
                "wall_s": round(wall, 2),
                "throughput_rps": round(len(results) / wall, 2),
                "good_throughput_rps": round(len(good_ok) / wall, 2),
                "latency_ms_good": {
                    "p50": percentile_ms(latencies, 50),
                    "p95": percentile_ms(latencies, 95),
                    "p99": percentile_ms(latencies, 99),
                    "mean": round(float(np.mean(latencies)) * 1000, 1) if latencies else None,
                    "max": round(max(latencies) * 1000, 1) if latencies else None,
                },
                "latency_ms_malformed_p50": percentile_ms([r[2] for r in bad], 50),
                "status_counts": dict(sorted(Counter(str(r[1]) for r in results).items())),
                "status_counts_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
                "peak_rss_mb": round(server.peak_rss / 2**20, 1),
                "peak_pss_mb": round(server.peak_pss / 2**20, 1) if server.peak_pss else None,
                # Peak RSS of each quarter of the load: flat memory = the last quarter no higher than the first
                # (the first includes each worker's lazy first-request allocations).
                "peak_rss_mb_by_quarter": rss_by_quarter(server.rss_samples, m0, m1),
                "server_processes": len(server.tree()),
                "good_requests": len(good),
                "good_failed": len(good) - len(good_ok),
                "any_good_failed": len(good_ok) < len(good),
                "malformed_requests": len(bad),
                "malformed_not_refused_4xx": sum(not r[3] for r in bad),
                "server_alive_after": alive,
            }
        )
    except RuntimeError as exc:  # the server did not start
        report["error"] = str(exc)
    except BaseException:  # Ctrl-C, SIGTERM: no figures, but the server goes down all the same
        print("serve_load: interrupted; stopping the server", file=sys.stderr)
        raise
    finally:
        if server is not None:
            report["left_running_after_stop"] = server.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if "error" in report:
        return 2
    return 0 if not report["any_good_failed"] and not report["malformed_not_refused_4xx"] and alive else 1


if __name__ == "__main__":
    sys.exit(main())
