"""Soak the app under load: a real server driven through gradio_client, valid and invalid requests mixed.

    python -m benchmarks.soak_app                           # 10 minutes, 8 clients, shipped checkpoints
    python -m benchmarks.soak_app --minutes 1 --concurrency 8

Starts `python app.py` (benchmarks.app_server), waits until it answers and its
GMACs warm-up has finished, loads it for `--warmup-seconds` more (not counted),
then runs `--concurrency` clients until the time is up. Every client opens a new
session now and then, and mixes:
- valid requests: the example images (docs/examples) x every method x keep
  ratios (slider stops and off-grid values);
- invalid requests: `benchmarks.cases.BAD`, the bad inputs tests/test_app.py sends
  too (non-image bytes, a truncated PNG, an empty file, a decompression bomb, empty,
  blank, over-long and emoji-only captions, an unknown method, keep ratios 0 and
  1.5), and no image, HTML as the method, keep ratios -0.5 and "abc";
- bursts: every `BURST_EVERY`-th request, all clients send the same valid request
  at the same moment. Identical outputs are the case that races in Gradio's
  content-hash file cache (GRADIO6.md): identical answers share one file, which
  is rewritten while it may be downloaded. The app writes a uniquely named file
  per answer instead; the soak downloads every overlay as the page would and
  fails if two answers ever came in the same file (with the overlay returned as a
  PIL image, i.e. through Gradio's cache, it does fail).

Expected: a valid request answered with the right method and keep ratio, in an
overlay file of its own (a PNG of the input's size), pixel-identical and with the
same tokens per stage as every other answer to the same request; an invalid
request refused with gradio_client's AppError whose message names the problem.
Unexpected: everything else (another exception, a valid request refused or
answered wrongly, an invalid one accepted, no answer within `REQUEST_TIMEOUT_S`)
and every traceback or LocalProtocolError in the server's log. PASS: 0
unexpected errors and server RSS growth <= 10% from the end of the warm-up to the
end. The exit status is 1 on FAIL.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageOps

from benchmarks.app_server import EXAMPLES, ROOT, Server, running_app, wait_for_output
from benchmarks.bench_app import pct, rss_mb
from benchmarks.cases import BAD, CAPTION  # the bad inputs, and the words their refusals must contain
from vlm_demo.pruning import names

RATIOS = [0.05, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0, 0.33, 0.777]  # slider stops, and two off the grid
BURST_EVERY = 5  # every 5th request of each client (the first included) is a burst
INVALID_SHARE = 0.25  # of the other requests
NEW_SESSION_EVERY = 25  # requests per gradio_client session
REQUEST_TIMEOUT_S = 180.0
RSS_TARGET = 0.10  # at most 10% growth
WARM_LOG_LINE = "GMACs cache warm"  # app.py logs it when its background warm-up ends


@dataclass(frozen=True)
class Case:
    """One /analyze request and what must come back."""

    name: str
    image: Path | None
    caption: str
    method: Any
    keep_ratio: Any
    reject: str | None = None  # invalid: a word the refusal must contain (lower case); None: valid

    @property
    def args(self) -> tuple[Any, ...]:
        return (handle_file(str(self.image)) if self.image else None, self.caption, self.method, self.keep_ratio)


def shown_size(image: Path) -> tuple[int, int]:
    """The picture's size once EXIF orientation is applied: the overlay's size."""
    with Image.open(image) as im:
        return ImageOps.exif_transpose(im).size


def valid_cases() -> list[Case]:
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    pairs = [(EXAMPLES / e["image"], e["caption"]) for e in examples]
    return [
        Case(f"{image.name} {method} {ratio}", image, caption, method, ratio)
        for (image, caption), method, ratio in itertools.product(pairs, names(), RATIOS)
    ]


def invalid_cases(folder: Path) -> list[Case]:
    """`benchmarks.cases.BAD` and a few more; the bad files go into `folder`."""
    scene = EXAMPLES / "scene_7000.png"
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, "PNG")  # 64 MP in a few KB: over the loader's 40 MP limit
    files = {
        "not_image": b"this is plain text, not a picture\n" * 20,
        "truncated": scene.read_bytes()[: scene.stat().st_size // 2],
        "empty": b"",
        "bomb": bomb.getvalue(),
    }
    for key, data in files.items():
        (folder / f"{key}.png").write_bytes(data)
    cases = [
        Case(name, folder / f"{key}.png" if key else scene, caption, method, ratio, words)
        for name, key, caption, method, ratio, words in BAD
        if key is None or key in files
    ]
    return cases + [
        Case("no-image", None, CAPTION, "learned", 0.5, "image"),
        Case("html-as-method", scene, CAPTION, "<img src=x onerror=alert(1)>", 0.5, "method"),
        Case("keep-ratio-negative", scene, CAPTION, "random", -0.5, "keep ratio"),
        Case("keep-ratio-text", scene, CAPTION, "tome", "abc", "keep ratio"),
    ]


@dataclass
class Tally:
    """What one load phase saw (shared by the client threads, under `lock`)."""

    valid: int = 0
    invalid: int = 0
    rejected: int = 0  # invalid requests refused as expected
    burst_requests: int = 0
    latencies: list[float] = field(default_factory=list)  # valid requests, seconds
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def served(self) -> int:
        return self.valid + self.invalid


class Load:
    """`concurrency` gradio_client clients sending a seeded mix of `valid` and `invalid` cases."""

    def __init__(self, url: str, valid: list[Case], invalid: list[Case], concurrency: int):
        self.url, self.valid, self.invalid, self.concurrency = url, valid, invalid, concurrency
        self.sizes = {image: shown_size(image) for image in {c.image for c in valid}}
        self.answers: dict[tuple[Any, ...], tuple[str, list[int]]] = {}  # request -> (overlay pixels, tokens)
        self.served_files: set[str] = set()  # the server's overlay files that answers came in
        self.lock = threading.Lock()

    def run(self, seconds: float, seed: int = 0) -> Tally:
        tally, stop_at = Tally(), time.monotonic() + seconds
        bursts: dict[int, threading.Barrier] = {}
        bursts_lock, done = threading.Lock(), threading.Event()

        def burst(k: int) -> Case | None:
            """Wait for every client at burst k; None when the phase is over."""
            with bursts_lock:
                if done.is_set():  # a client has stopped: it will not come
                    return None
                barrier = bursts.setdefault(k, threading.Barrier(self.concurrency))
            try:
                barrier.wait(timeout=max(1.0, stop_at - time.monotonic()) + REQUEST_TIMEOUT_S)
            except threading.BrokenBarrierError:
                return None
            return random.Random(seed * 100_003 + k).choice(self.valid)

        def client_thread(n: int) -> None:
            rng, client = random.Random(seed * 1_000 + n), None
            for i in itertools.count():
                if time.monotonic() >= stop_at:
                    break
                if i % BURST_EVERY == 0:
                    case = burst(i // BURST_EVERY)
                    if case is None:
                        break
                elif rng.random() < INVALID_SHARE:
                    case = rng.choice(self.invalid)
                else:
                    case = rng.choice(self.valid)
                if client is None or i % NEW_SESSION_EVERY == 0:
                    client = self.client(tally)
                if client is not None:
                    self.request(client, case, tally, in_burst=i % BURST_EVERY == 0)
            with bursts_lock:  # release the others from any burst this client will not reach
                done.set()
                for barrier in bursts.values():
                    barrier.abort()

        threads = [threading.Thread(target=client_thread, args=(n,), daemon=True) for n in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return tally

    def client(self, tally: Tally) -> Client | None:
        try:
            return Client(self.url, verbose=False, download_files=False)  # answers name the server's files
        except Exception as e:  # noqa: BLE001 - counted, not raised
            with tally.lock:
                tally.unexpected.append(f"new session: {type(e).__name__}: {e}")
            time.sleep(1.0)
            return None

    def request(self, client: Client, case: Case, tally: Tally, in_burst: bool) -> None:
        t0, elapsed, problem = time.perf_counter(), 0.0, None
        try:
            overlay, readout = client.submit(*case.args, api_name="/analyze").result(timeout=REQUEST_TIMEOUT_S)
            if case.reject:
                problem = "invalid input accepted"
            else:  # download the overlay as the page would, while other answers are being written
                png = httpx.get(overlay["url"], timeout=REQUEST_TIMEOUT_S).raise_for_status().content
                elapsed = time.perf_counter() - t0
                problem = self.check(case, overlay["path"], png, readout)
        except AppError as e:
            message = str(e).strip()
            if case.reject is None:
                problem = f"valid request refused: {message[:200]}"
            elif case.reject not in message.lower() or "upstream Gradio app" in message or "Traceback" in message:
                problem = f"unclear refusal (wanted {case.reject!r}): {message[:200]}"
        except Exception as e:  # noqa: BLE001 - counted, not raised: the soak reports every failure
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        with tally.lock:
            if case.reject:
                tally.invalid += 1
                tally.rejected += problem is None
            else:
                tally.valid += 1
                tally.burst_requests += in_burst
                if problem is None:
                    tally.latencies.append(elapsed)
            if problem:
                tally.unexpected.append(f"{case.name}: {problem}")

    def check(self, case: Case, server_path: str, png: bytes, readout: dict[str, Any]) -> str | None:
        """What is wrong with the answer to a valid request (None: nothing).

        The answer must be for this request, come in an overlay file that no
        other answer came in (a file shared by two answers is a file that can be
        rewritten while it is downloaded), and agree with every other answer to
        the same request: overlay pixels and tokens per stage (the model is
        deterministic, so any difference is a mixed-up or half-written answer).
        """
        with self.lock:
            shared = server_path in self.served_files
            self.served_files.add(server_path)
        if shared:
            return f"overlay file {server_path} was served for an earlier answer too"
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            fmt, size, pixels = im.format, im.size, hashlib.sha1(im.tobytes()).hexdigest()
        if fmt != "PNG" or size != self.sizes[case.image]:
            return f"overlay is {fmt} {size}, expected PNG {self.sizes[case.image]}"
        if readout["method"] != case.method or readout["keep_ratio"] != case.keep_ratio:
            return f"answer is for {readout['method']} @ {readout['keep_ratio']}"
        P, tokens = readout["baseline"]["tokens"], readout["pruned"]["tokens_per_stage"]
        if tokens[0] != P or sorted(tokens, reverse=True) != tokens or (case.method == "none" and tokens[-1] != P):
            return f"tokens per stage {tokens} (of {P} patches)"
        with self.lock:
            first = self.answers.setdefault((case.image, case.caption, case.method, case.keep_ratio), (pixels, tokens))
        return None if (pixels, tokens) == first else "answer differs from an earlier answer to the same request"


@dataclass
class Result:
    """A soak's figures; `report` prints them."""

    seconds: float
    concurrency: int
    tally: Tally
    rss_start_mb: float
    rss_end_mb: float
    rss_samples_mb: list[float]
    log_problems: list[str]

    @property
    def unexpected(self) -> list[str]:
        return self.tally.unexpected + self.log_problems

    @property
    def growth(self) -> float:
        return self.rss_end_mb / self.rss_start_mb - 1

    @property
    def passed(self) -> bool:
        return not self.unexpected and self.growth <= RSS_TARGET


def log_problems(server: Server) -> list[str]:
    """The server's own failures: its exit, every traceback and every truncated response it logged."""
    out = server.output()
    exited = [f"server exited with {server.proc.returncode}"] if server.proc.poll() is not None else []
    return exited + [f"server log: {n} x {w}" for w in ("Traceback", "LocalProtocolError") if (n := out.count(w))]


def rss_now(server: Server) -> float:
    """The server's resident set, MB (NaN once it has exited: the soak then fails)."""
    try:
        return rss_mb(server.proc.pid)[0]
    except OSError:
        return math.nan


def soak(server: Server, seconds: float, concurrency: int, warmup_s: float, seed: int = 0) -> Result:
    """Load `server` for `warmup_s` (not counted, bar its errors), then for `seconds`; RSS before and after."""
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        load = Load(server.url, valid_cases(), invalid_cases(Path(tmp)), concurrency)
        warm = load.run(warmup_s, seed=seed + 1) if warmup_s > 0 else Tally()
        samples = [rss_now(server)]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(5.0):
                samples.append(rss_now(server))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        tally = load.run(seconds, seed=seed)
        elapsed = time.perf_counter() - t0
        sampling.set()
        sampler.join()
        samples.append(rss_now(server))
    tally.unexpected[:0] = [f"warm-up: {e}" for e in warm.unexpected]
    return Result(elapsed, concurrency, tally, samples[0], samples[-1], samples, log_problems(server))


def spread(xs: list[float], n: int) -> list[float]:
    """At most `n` values of `xs`, evenly spaced, first and last included."""
    return xs if len(xs) <= n else [xs[round(i * (len(xs) - 1) / (n - 1))] for i in range(n)]


def report(r: Result, header: str) -> str:
    t, lat = r.tally, r.tally.latencies
    lines = [
        header,
        f"requests served      {t.served} in {r.seconds:.0f} s ({t.served / r.seconds:.1f}/s): {t.valid} valid "
        f"({t.burst_requests} of them in bursts of {r.concurrency} identical requests at once), {t.invalid} invalid",
        f"expected rejections  {t.rejected} of {t.invalid} invalid requests (AppError naming the problem)",
        f"unexpected errors    {len(r.unexpected)}",
        *[f"    {e}" for e in sorted(set(r.unexpected))[:10]],
        "latency, valid       " + (f"p50 {pct(lat, 50):.2f} s   p95 {pct(lat, 95):.2f} s   p99 {pct(lat, 99):.2f} s"
                                   if lat else "(none)") + f"   (upload to download, {r.concurrency} clients)",
        f"server RSS           start {r.rss_start_mb:.0f} MB (after warm-up)   end {r.rss_end_mb:.0f} MB   growth "
        f"{100 * r.growth:+.1f}% (target <= {100 * RSS_TARGET:.0f}%)   min/max {min(r.rss_samples_mb):.0f}/"
        f"{max(r.rss_samples_mb):.0f} MB",
        "server RSS over time " + " ".join(f"{mb:.0f}" for mb in spread(r.rss_samples_mb, 11)) + " MB (evenly spaced)",
        "PASS" if r.passed else "FAIL",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the measured load (default: 10)")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at once (default: 8)")
    p.add_argument("--warmup-seconds", type=float, default=30.0, help="load before RSS is taken (default: 30)")
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="soak-server-") as tmp:
        with running_app(Path(args.checkpoints), Path(tmp) / "app.log") as server:
            warm_s = wait_for_output(server, WARM_LOG_LINE, timeout=600)
            header = (
                f"# benchmarks.soak_app  {args.minutes:g} min  concurrency {args.concurrency}  checkpoints="
                f"{args.checkpoints}  gradio {version('gradio')}  gradio_client {version('gradio_client')}\n"
                f"# server answering after {server.start_s:.0f} s, GMACs warm-up done {warm_s:.0f} s later, "
                f"then {args.warmup_seconds:g} s of the same load before the measurement"
            )
            result = soak(server, args.minutes * 60, args.concurrency, args.warmup_seconds, args.seed)
    print(report(result, header))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
