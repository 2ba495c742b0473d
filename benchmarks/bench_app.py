"""Benchmark the app as users meet it: a real server driven through gradio_client.

    python -m benchmarks.bench_app                      # shipped checkpoints
    python -m benchmarks.bench_app --checkpoints DIR --requests 40

Prints, for this machine:
- cold start: process start -> first successful /analyze answer;
- in-process `Session.analyze` p50/p95 (both live latency measurements included),
  measured before any server runs, over the slider's keep ratios, GMACs cache warm;
- warm /analyze end to end p50/p95, interleaved with a no-op Gradio handler that
  takes the same image upload (the floor any Gradio app pays);
- load: 8 concurrent clients x 20 requests, errors counted;
- memory: the server's resident set (now and peak).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.app_server import EXAMPLES, ROOT, free_port, running_app

CAPTION = "a large red circle at the top left"
NOOP_APP = textwrap.dedent(
    """
    import sys
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as demo:
        image = gr.Image(type="filepath")
        out = gr.Textbox()
        gr.Button().click(lambda path: "ok", image, out, api_name="noop")
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=int(sys.argv[1]))
    """
)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of a process, MB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kb = lambda key: float(fields[key].split()[0])  # noqa: E731
    return kb("VmRSS") / 1024, kb("VmHWM") / 1024


def example_image() -> Path:
    scenes = sorted(EXAMPLES.glob("scene_*.png"))
    if not scenes:
        raise SystemExit(f"no example scenes in {EXAMPLES}")
    return scenes[0]


def in_process(checkpoints: str, n: int) -> tuple[list[float], str]:
    """Seconds per `Session.analyze`, sweeping the slider's keep ratios and the methods the model runs;
    and the method the server part times (learned where the model has predictors)."""
    from vlm_demo import api

    session = api.load(checkpoints)
    ratios = list(api.SWEEP_STOPS)
    methods = list(session.methods(prunes_only=True))
    session.warm_gmacs(ratios)
    image = example_image()
    session.analyze(image, CAPTION, method=methods[0])  # first call: allocator and thread-pool warm-up
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        session.analyze(image, CAPTION, method=methods[i % len(methods)], keep_ratio=ratios[(7 * i) % len(ratios)])
        times.append(time.perf_counter() - t0)
    return times, methods[0]


@contextlib.contextmanager
def noop_server(log: Path):
    port = free_port()
    script = log.with_suffix(".py")
    script.write_text(NOOP_APP)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        from gradio_client import Client

        deadline = time.monotonic() + 90
        while True:
            try:
                client = Client(url, verbose=False)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(log.read_text()[-2000:]) from None
                time.sleep(0.5)
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--requests", type=int, default=40, help="warm /analyze requests (and as many no-op ones)")
    p.add_argument("--in-process", type=int, default=40, help="in-process Session.analyze calls")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=20)
    args = p.parse_args(argv)

    from gradio_client import Client, handle_file

    image = example_image()
    print(f"# benchmarks.bench_app  checkpoints={args.checkpoints}  image={image.name}")

    t, method = in_process(args.checkpoints, args.in_process)
    print(f"in-process Session.analyze   n={len(t):<4} p50 {pct(t, 50) * 1e3:7.1f} ms   p95 {pct(t, 95) * 1e3:7.1f} ms"
          "   (target p50 <= 250 ms)")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        with running_app(Path(args.checkpoints), tmp / "app.log") as server:
            client = Client(server.url, verbose=False)
            client.predict(handle_file(str(image)), CAPTION, method, 0.52, api_name="/analyze")
            cold = time.perf_counter() - t0
            print(f"cold start to first /analyze {cold:7.1f} s        (page answering after {server.start_s:.1f} s;"
                  " target <= 20 s)")  # fmt: skip

            warm, floor = [], []
            with noop_server(tmp / "noop.log") as noop:
                for i in range(args.requests):
                    a = time.perf_counter()
                    noop.predict(handle_file(str(image)), api_name="/noop")
                    floor.append(time.perf_counter() - a)
                    a = time.perf_counter()
                    client.predict(handle_file(str(image)), CAPTION, method, [0.32, 0.52, 0.72][i % 3], api_name="/analyze")
                    warm.append(time.perf_counter() - a)
            print(f"warm /analyze end to end     n={len(warm):<4} p50 {pct(warm, 50):7.3f} s     p95 {pct(warm, 95):7.3f} s"
                  "     (target p50 <= 1.0 s, p95 <= 2 s)")  # fmt: skip
            print(f"no-op Gradio upload floor    n={len(floor):<4} p50 {pct(floor, 50):7.3f} s     p95 {pct(floor, 95):7.3f} s"
                  "     (same run, interleaved)")  # fmt: skip

            errors: list[str] = []
            latencies: list[float] = []
            lock = threading.Lock()

            def worker(k: int) -> None:
                c = Client(server.url, verbose=False)
                for j in range(args.per_client):
                    a = time.perf_counter()
                    try:
                        c.predict(handle_file(str(image)), CAPTION, method, 0.52, api_name="/analyze")
                        with lock:
                            latencies.append(time.perf_counter() - a)
                    except Exception as e:  # counted, not raised: the load test reports every failure
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")

            a = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - a
            total = args.clients * args.per_client
            print(f"load {args.clients} clients x {args.per_client}      {total} requests, {len(errors)} errors, "
                  f"{wall:.1f} s wall, {total / wall:.1f} req/s, p50 {statistics.median(latencies):.2f} s under load")
            for e in sorted(set(errors))[:5]:
                print(f"   error: {e}")
            now, peak = rss_mb(server.proc.pid)
            print(f"server memory                RSS {now:7.0f} MB      peak {peak:7.0f} MB  (target <= 1.5 GB)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
