"""SIGKILL fault injection: training resumes bit-exactly, dataset generation repairs itself.

    python -m benchmarks.fault_injection [--kills 5] [--seed 0] [--synthetic-kills 3] [--workdir DIR]

**Training.** ``python -m training.train --preset tiny --data DATA`` runs once uninterrupted into
OUT_ref, then into OUT_faulty, where it is SIGKILLed ``--kills`` times and restarted with
``--resume`` after each kill until it completes. The kills are spread over the data, baseline,
pruned, finetune and evaluate phases: each lands a seeded fraction of that phase's duration in the reference
run after the attempt enters the phase, or, for some, at the phase's next checkpoint or metrics
write, where atomicity is at stake. After every kill, everything visible in OUT_faulty must be
whole: each checkpoint folder loads with `load_checkpoint`, each JSON parses, each safetensors file
and PNG reads, each resume state loads into a model, and no other file stands under a final name.
At the end the baseline and pruned weights, training.json and metrics.json (every field but the
measured timings: latency, seconds) must equal OUT_ref's exactly.

**Dataset generation.** ``python -m training.synthetic`` is SIGKILLed after a seeded number of
images, a few times over the same folder, then rerun; ``python -m training.train`` without
``--data`` is SIGKILLed while it generates its cache, then rerun with ``--resume``. After each kill
the folder must not pass for a finished dataset. The last kill takes the main process alone (as the
OOM killer would: its pool workers live on and race the rerun), the others its whole process group
(as a job scheduler does, leaving images half-written). Both reruns must leave files byte-identical
(SHA-256) to an uninterrupted generation, DATA.

**Where a process is.** A ``sitecustomize.py`` on the children's PYTHONPATH installs a SIGUSR1
handler that writes the main thread's stack to stderr; the script samples it every few milliseconds
and reads the phase from the code being run rather than guessing it from the clock. The command
lines are the users' own; the handler computes nothing and interrupted system calls are retried.

tests/test_fault_injection.py runs a quick version through the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import platform
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from training import train
from training.synthetic import IMAGE_DIR, OBJECTS_FILE
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PRESET = "tiny"
INTERVAL_S = 0.005  # stack sampling period of the reference run and of long phases
FAST_INTERVAL_S = 0.002  # ... of phases shorter than `SHORT_PHASE_S`, so that a kill can land inside them
SHORT_PHASE_S = 0.25
TIMEOUT_S = 300.0  # longest any one process may run
TRAIN_PY = ROOT / "training" / "train.py"
SYNTHETIC_PY = ROOT / "training" / "synthetic.py"
TRAIN_PHASES = ("startup", "data", "baseline", "pruned", "finetune", "evaluate", "exit")
TRAIN_TARGETS = ("data", "baseline", "pruned", "finetune", "evaluate")
WRITERS = {  # the functions that write training outputs (`where` names)
    "train.save_state", "model.atomic_folder", "model.save_checkpoint",
    "evaluate.write_outputs", "evaluate._write_text", "evaluate.plot_tradeoff",
}  # fmt: skip
_TIMING = re.compile(r"latency|seconds")  # measured, not computed: left out of the comparison

_STACK = "@@fault-injection-stack@@"  # starts each stack line a probed child writes; "ready" once at start
_SITECUSTOMIZE = f'''\
"""Written by benchmarks/fault_injection.py: on SIGUSR1 the main thread writes its stack to stderr, then goes on."""
import atexit, json, os, signal


def _probe(signum, frame):
    # A Python handler runs in the main thread between bytecodes, where the frames are consistent (a
    # C-level faulthandler dump at an arbitrary instruction crashed the child now and then). os.write,
    # not sys.stderr: the handler may have interrupted a write to sys.stderr.
    try:
        stack = []
        while frame is not None:
            stack.append((frame.f_code.co_filename, frame.f_lineno or 0, frame.f_code.co_name))
            frame = frame.f_back
        data = ("\\n{_STACK}" + json.dumps(stack) + "\\n").encode()
        while data:
            data = data[os.write(2, data):]
    except BaseException:
        pass  # never disturb the program


signal.signal(signal.SIGUSR1, _probe)
# At exit Python would restore SIGUSR1's default action, which ends the process: ignore late probes instead.
atexit.register(signal.signal, signal.SIGUSR1, signal.SIG_IGN)
os.write(2, b"{_STACK}ready\\n")
'''


# ----------------------------------------------------------------------------- probed processes


@dataclasses.dataclass(frozen=True)
class Frame:
    file: str
    line: int
    func: str


class Probed:
    """A child process whose main-thread stack can be sampled on demand (see the module docstring)."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str]):
        self.cmd = list(cmd)
        self.start = time.monotonic()
        self.start_ns = time.time_ns()
        # Its own session, so that a kill can take its whole process group and nothing else.
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []  # stderr without the stack dumps
        self.orphans: list[int] = []  # children still alive after it was killed
        self._ready = threading.Event()
        self._stacks: queue.Queue[list[Frame]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            at = line.find(_STACK)
            if at < 0:
                if line.strip():
                    self.lines.append(line)
            elif line[at + len(_STACK) :].strip() == "ready":
                self._ready.set()
            else:
                try:
                    self._stacks.put([Frame(*f) for f in json.loads(line[at + len(_STACK) :])])
                except (ValueError, TypeError):  # cut by another thread's output: that probe goes unanswered
                    self.lines.append(line)
        self._ready.set()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def stack(self) -> list[Frame] | None:
        """The main thread's frames, innermost first, once it next runs Python code.

        Returns:
            The frames, or None once the process has ended.
        """
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                return None
        while not self._stacks.empty():  # a late answer to an earlier probe
            self._stacks.get_nowait()
        sent = -math.inf
        while self.elapsed() < TIMEOUT_S:
            if self.elapsed() - sent > 1.0:  # again, in case a garbled answer was dropped
                self.proc.send_signal(signal.SIGUSR1)  # a no-op once the process has exited
                sent = self.elapsed()
            try:
                return self._stacks.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None:  # exited, or exiting: late probes are ignored
                    return None
        self.kill(group=True)
        raise AssertionError(f"{self.describe()} ran past {TIMEOUT_S:.0f} s")

    def kill(self, group: bool = False) -> None:
        """SIGKILL the process alone (its children live on, as after the OOM killer) or its process group."""
        children = [int(pid) for task in Path(f"/proc/{self.proc.pid}/task").glob("*")
                    for pid in _read_or_empty(task / "children").split()]  # fmt: skip
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.orphans = [] if group else [pid for pid in children if Path(f"/proc/{pid}").exists()]

    def wait(self) -> int:
        """Let the process finish; its exit status."""
        try:
            code = self.proc.wait(timeout=max(1.0, TIMEOUT_S - self.elapsed()))
        except subprocess.TimeoutExpired:
            self.kill(group=True)
            raise AssertionError(f"{self.describe()} ran past {TIMEOUT_S:.0f} s") from None
        self._reader.join(timeout=5)
        return code

    def finish(self) -> None:
        """Wait for a successful exit; raise with the end of stderr otherwise."""
        if self.wait() != 0:
            raise AssertionError(
                f"{self.describe()} exited with {self.proc.returncode}:\n{''.join(self.lines)[-3000:]}"
            )

    def describe(self) -> str:
        return " ".join(["python", *self.cmd[1:]])

    def logged(self, text: str) -> list[str]:
        return [line.strip() for line in self.lines if text in line]


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def probe_env(work: Path) -> dict[str, str]:
    """The children's environment: one torch thread, and the stack probe on PYTHONPATH."""
    probe = work / ".probe"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(probe), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- phases


Classifier = Callable[[list[Frame]], str]


def _line_of(path: Path, text: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return number
    raise RuntimeError(f"{path} no longer contains {text!r}; update the phase markers in {Path(__file__).name}.")


def _is(frame: Frame, path: Path, func: str) -> bool:
    return frame.func == func and _resolved(frame.file) == path


@functools.cache
def _resolved(file: str) -> Path:
    return Path(file).resolve()


def train_phases() -> Classifier:
    """Classify a stack of ``training.train`` by the block of `main` it is in.

    The blocks' lines are read from the source now, so call it as the process to classify starts.
    """
    blocks = [(_line_of(TRAIN_PY, f'if "{name}" in phases'), name) for name in TRAIN_TARGETS[1:]]
    done = _line_of(TRAIN_PY, "remove_resume_state(out, [p for p")  # every phase ran: what follows them

    def classify(frames: list[Frame]) -> str:
        main = next((f for f in frames if _is(f, TRAIN_PY, "main")), None)
        if main is None:
            return "startup"  # or past main: `sample` tells the two apart
        if main.line >= done:  # removing the resume state, writing the build record: no phase's, not evaluate's
            return "exit"
        return next((name for line, name in reversed(blocks) if main.line >= line), "data")

    return classify


def synthetic_phases() -> Classifier:
    """Classify a stack by where dataset generation is: images, then the index files, then past it."""
    index = _line_of(SYNTHETIC_PY, "names = [name for name, _, _ in results]")
    callers = {
        SYNTHETIC_PY: _line_of(SYNTHETIC_PY, "root = generate("),
        TRAIN_PY: _line_of(TRAIN_PY, "root = resolve_data("),
    }

    def classify(frames: list[Frame]) -> str:
        gen = next((f for f in frames if _is(f, SYNTHETIC_PY, "generate")), None)
        if gen is not None:
            return "index" if gen.line >= index else "images"
        past = any(_is(f, path, "main") and f.line > line for f in frames for path, line in callers.items())
        return "exit" if past else "startup"

    return classify


def where(frames: list[Frame]) -> str:
    """The innermost project function, e.g. ``model.save_checkpoint``."""
    for f in frames:
        path = Path(f.file)
        if path.parent.name in ("training", "vlm_demo") and path.parent.parent == ROOT:
            return f"{path.stem}.{f.func}"
    return frames[0].func if frames else "-"


@dataclasses.dataclass
class Sample:
    seconds: float  # since the process started
    phase: str
    where: str


def sample(p: Probed, classify: Classifier, order: Sequence[str], interval: float) -> Iterator[Sample]:
    """Yield `p`'s phase every `interval` until it ends. Phases only move forward, so a step back to before the
    program (`order[0]`, its main function gone) is its exit; a step back to an earlier phase of the program is a
    late answer to an earlier probe, and is skipped."""
    last = order[0]
    while (frames := p.stack()) is not None:
        # Only a stack under runpy is the program's: not one from before it starts or from atexit handlers.
        if frames[-1:] and frames[-1].func == "_run_module_as_main":
            phase = classify(frames)
            if order.index(phase) >= order.index(last) or phase == order[0]:  # else a late answer: skipped
                phase = "exit" if order.index(phase) < order.index(last) else phase
                last = phase
                yield Sample(p.elapsed(), phase, where(frames))
        time.sleep(interval)


def run_sampled(cmd: Sequence[str], env: dict[str, str], classify: Classifier,
                order: Sequence[str]) -> tuple[Probed, list[Sample]]:  # fmt: skip
    """Run `cmd` to a successful end, sampling its phase."""
    p = Probed(cmd, env)
    samples = list(sample(p, classify, order, INTERVAL_S))
    p.finish()
    return p, samples


def phase_windows(samples: Sequence[Sample]) -> dict[str, tuple[float, float]]:
    """(first, last) time each phase was seen."""
    windows: dict[str, tuple[float, float]] = {}
    for s in samples:
        windows[s.phase] = (windows.get(s.phase, (s.seconds,))[0], s.seconds)
    return windows


@dataclasses.dataclass
class Kill:
    attempt: int
    aim: str  # where the plan aimed, e.g. "baseline +0.52 s" or "pruned, a write"
    signal: str  # "process" or "group"
    phase: str  # the phase the stack showed at the kill
    where: str  # the innermost project function then
    seconds: float  # since the attempt started
    after: str = ""  # what the kill left behind
    checks: int = 0  # integrity checks passed right after it


def kill_when(p: Probed, classify: Classifier, order: Sequence[str], target: str,
              ready: Callable[[Sample, float], bool], attempt: int, aim: str, group: bool = False,
              interval: float = INTERVAL_S) -> Kill | None:  # fmt: skip
    """SIGKILL `p` once it is in `target` and `ready(sample, seconds in it)`, or as soon as it is past it.

    Returns:
        The kill, or None if the process ended first.
    """
    entered: float | None = None
    for s in sample(p, classify, order, interval):
        if s.phase != "exit" and order.index(s.phase) >= order.index(target):
            entered = s.seconds if entered is None else entered
            if s.phase != target or ready(s, s.seconds - entered):
                p.kill(group)
                return Kill(attempt, aim, "group" if group else "process", s.phase, s.where, s.seconds)
    p.wait()
    return None


def plan_kills(lengths: dict[str, float], kills: int, rng: random.Random) -> list[tuple[str, float | None]]:
    """(phase, seconds into it, or None for "at its next file write") per kill, in phase order.

    Every phase the run has gets a kill while kills last, the rest go to random phases. About half the
    kills after the data phase, and at least one, aim at a checkpoint or metrics write, where atomicity
    is at stake; the others at a random fraction of the phase's reference duration, short of its end so
    that the kill lands inside even when an attempt runs faster than the reference.
    """
    last = max(TRAIN_PHASES.index(p) for p in lengths if p != "exit")
    phases = [p for p in TRAIN_TARGETS if TRAIN_PHASES.index(p) <= last]  # evaluate may be left out by --phases
    chosen = rng.sample(phases, kills) if kills < len(phases) else phases + rng.choices(phases, k=kills - len(phases))
    chosen.sort(key=phases.index)
    writes = [i for i, phase in enumerate(chosen) if phase != "data" and rng.random() < 0.5]
    if not writes and chosen[-1] != "data":
        writes = [len(chosen) - 1]
    return [(phase, None if i in writes else rng.uniform(0.05, 0.6) * lengths.get(phase, 0.0))
            for i, phase in enumerate(chosen)]  # fmt: skip


# ----------------------------------------------------------------------------- integrity checks


def _check_file(path: Path) -> None:
    if path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif path.suffix == ".safetensors":
        load_file(str(path))
    elif path.suffix == ".png":
        with Image.open(path) as im:
            im.load()
    elif path.suffix == ".md":
        if not path.read_text(encoding="utf-8"):
            raise ValueError("empty")
    else:
        raise ValueError("unexpected file (half-written, or a temporary under a final name?)")


def check_state(folder: Path) -> None:
    """A resume state (``OUT/.resume/PHASE``) loads: its JSON, and its weights into a fresh model."""
    meta = json.loads((folder / "state.json").read_text())
    if not meta["epoch_done"] == len(meta["losses"]) == len(meta["seconds_per_epoch"]):
        raise ValueError(f"inconsistent progress {meta}")
    tensors = load_file(str(folder / "state.safetensors"))
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    cfg = get_preset(PRESET).model
    vocab = weights.get("text.token_embed.weight")  # only the baseline's state holds the whole model
    if vocab is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab.shape[0]))
    model = DualEncoder(cfg)
    model.enable_query_predictors()  # as the pruned phase builds them
    train._trained_part(model, folder.name).load_state_dict(weights, strict=True)  # the part the phase saves
    if not any(k.startswith("optim.") for k in tensors):
        raise ValueError("no optimizer moments")


def check_outputs(out: Path) -> int:
    """Assert that everything visible in a training output folder is whole.

    Returns:
        The number of files, checkpoint folders and resume states checked.
    """
    checks = 0
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        try:
            if rel.parts[0] == ".resume" and len(rel.parts) == 2 and not rel.name.startswith("."):
                check_state(path)
            elif any(part.startswith(".") for part in rel.parts):
                continue  # temporaries, and the files of the resume states checked above
            elif path.is_dir():
                if len(rel.parts) > 1:
                    raise ValueError("unexpected folder")
                with contextlib.redirect_stdout(io.StringIO()):  # the Hub mixin prints "Loading weights ..."
                    load_checkpoint(path)
            else:
                _check_file(path)
        except Exception as e:  # any failure to read is the finding
            raise AssertionError(f"{out.name}/{rel}: {type(e).__name__}: {e}") from e
        checks += 1
    return checks


def leftovers(out: Path) -> list[str]:
    """Temporaries that killed writers left (hidden names), other than the resume folder itself."""
    found = [p for p in out.glob(".*") if p.name != ".resume"] + list((out / ".resume").glob(".*"))
    return sorted(str(p.relative_to(out)) for p in found)


def progress(out: Path, epochs: dict[str, int]) -> str:
    """What a killed run left: epochs in the resume states, finished outputs."""
    parts = []
    for phase, total in epochs.items():
        state = out / ".resume" / phase / "state.json"
        parts.append(f"{phase} {json.loads(state.read_text())['epoch_done'] if state.is_file() else 0}/{total} ep")
    saved = [name for name in ("baseline", "pruned", "metrics.json") if (out / name).exists()]
    return ", ".join(parts) + (", saved " + " ".join(saved) if saved else "")


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not _TIMING.search(k)}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _difference(a: Any, b: Any, at: str = "") -> str | None:
    """Where two JSON values first differ, e.g. ``rows[3].mean_r1: 12.5 != 6.25``."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return next((d for k in keys if (d := _difference(a.get(k), b.get(k), f"{at}.{k}" if at else k))), None)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _difference(x, y, f"{at}[{i}]"))), None)
    return None if a == b else f"{at}: {a!r} != {b!r}"


def compare_runs(ref: Path, faulty: Path) -> list[str]:
    """Assert that the faulty run's results equal the reference's; one line per comparison."""
    facts = []
    for name in ("baseline", "pruned"):
        if not (ref / name).is_dir():
            continue
        a, b = (load_file(str(d / name / "model.safetensors")) for d in (ref, faulty))
        differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
        assert not differ, f"{name}/model.safetensors differs in {differ[:5]}"
        for file in ("config.json", "vocab.json"):
            assert (ref / name / file).read_bytes() == (faulty / name / file).read_bytes(), f"{name}/{file} differs"
        ta, tb = (_untimed(json.loads((d / name / "training.json").read_text())) for d in (ref, faulty))
        assert ta == tb, f"{name}/training.json: {_difference(ta, tb)}"
        facts.append(f"{name}/: {len(a)} weight tensors bit-identical; config, vocab and losses identical")
    if (ref / "caption_bank.json").is_file():
        assert (ref / "caption_bank.json").read_bytes() == (faulty / "caption_bank.json").read_bytes()
        facts.append("caption_bank.json: identical")
    if (ref / "metrics.json").is_file():
        ma, mb = (_untimed(json.loads((d / "metrics.json").read_text())) for d in (ref, faulty))
        assert ma == mb, f"metrics.json: {_difference(ma, mb)}"
        fields = len(ma["rows"][0]) if ma["rows"] else 0
        facts.append(f"metrics.json: {len(ma['rows'])} rows x {fields} fields identical (latency, seconds left out)")
    return facts


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, hidden ones too (a leftover temporary is a difference)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def assert_same_files(ref: Path, other: Path) -> int:
    """Assert that `other` holds exactly `ref`'s files, byte for byte; the number of files."""
    a, b = file_hashes(ref), file_hashes(other)
    extra, missing = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    assert not (extra or missing or differ), f"{other}: extra {extra[:5]}, missing {missing[:5]}, differ {differ[:5]}"
    return len(a)


# ----------------------------------------------------------------------------- training


def train_cmd(out: Path, *extra: str, data: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "training.train", "--preset", PRESET, "--out", str(out), "--threads", "1", "--quiet"]
    return cmd + (["--data", str(data)] if data is not None else []) + list(extra)


@dataclasses.dataclass
class TrainingReport:
    seconds: float = 0.0  # the reference run, start to exit
    windows: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # its phases, s from start
    kills: list[Kill] = dataclasses.field(default_factory=list)
    resumes: int = 0  # runs with --resume, the final one included
    restored: int = 0  # of them, runs that picked up saved epochs ("resuming after epoch")
    early: int = 0  # of them, runs that completed before their kill and were started again
    checks: int = 0  # integrity checks passed after the kills and at the end
    facts: list[str] = dataclasses.field(default_factory=list)  # the final comparisons, all passed


def inject_training(data: Path, work: Path, kills: int, seed: int, extra: Sequence[str] = (),
                    report: TrainingReport | None = None) -> TrainingReport:  # fmt: skip
    """A reference run, then the same run killed `kills` times and resumed; asserts integrity and equality.

    Args:
        data: the dataset folder (``--data``).
        work: where OUT_ref and OUT_faulty go.
        kills: SIGKILLs to inject.
        seed: seed of the kill points.
        extra: more ``training.train`` arguments, e.g. ``--phases``.
        report: filled in as the runs go (so that a failure still shows what happened); a new one if None.

    Returns:
        The report; an AssertionError says what failed.
    """
    r = report if report is not None else TrainingReport()
    env = probe_env(work)
    ref, faulty = work / "OUT_ref", work / "OUT_faulty"
    p, samples = run_sampled(train_cmd(ref, *extra, data=data), env, train_phases(), TRAIN_PHASES)
    r.seconds, r.windows = p.elapsed(), phase_windows(samples)
    lengths = {phase: last - first + INTERVAL_S for phase, (first, last) in r.windows.items()}
    epochs = {n: json.loads((ref / n / "training.json").read_text())["epochs"] for n in ("baseline", "pruned")
              if (ref / n).is_dir()}  # fmt: skip
    if "pruned" in epochs and json.loads((ref / "pruned" / "training.json").read_text()).get("finetune"):
        epochs["finetune"] = 1  # the finetune phase is one (short) epoch

    plan = plan_kills(lengths, kills, random.Random(seed))
    attempt = 0
    while plan:
        target, delay = plan[0]
        attempt += 1
        classify = train_phases()  # read as the process reads it: the source may be edited between runs
        p = Probed(train_cmd(faulty, *extra, *(["--resume"] if attempt > 1 else []), data=data), env)
        if delay is None:
            ready, aim, interval = (lambda s, into: s.where in WRITERS), f"{target}, a write", FAST_INTERVAL_S
        else:
            ready, aim = (lambda s, into: into >= delay), f"{target} +{delay:.3f} s"  # noqa: B023 - used at once
            interval = FAST_INTERVAL_S if lengths.get(target, 0.0) < SHORT_PHASE_S else INTERVAL_S
        kill = kill_when(p, classify, TRAIN_PHASES, target, ready, attempt, aim, interval=interval)
        r.resumes += attempt > 1
        r.restored += bool(p.logged("resuming after epoch"))
        if kill is None:
            # Its last phase ran faster than the reference's. Evaluation is not resumable, so the next
            # attempt goes through it again: aim earlier.
            p.finish()
            r.early += 1
            assert r.early <= 3, f"attempts kept finishing before their kill in {target}"
            plan[0] = (target, None if delay is None else delay / 2)
            continue
        plan.pop(0)
        r.kills.append(kill)
        kill.after = progress(faulty, epochs)
        kill.checks = check_outputs(faulty)
        r.checks += kill.checks

    p = Probed(train_cmd(faulty, *extra, "--resume", data=data), env)
    p.finish()
    r.resumes += 1
    r.restored += bool(p.logged("resuming after epoch"))
    r.checks += check_outputs(faulty)
    r.facts += compare_runs(ref, faulty)
    stale = leftovers(faulty)
    assert not stale, f"temporaries of killed writers are still in {faulty.name} after it completed: {stale}"
    r.facts.append("no temporaries of killed writers left in OUT")
    return r


# ----------------------------------------------------------------------------- dataset generation


def synthetic_cmd(out: Path) -> list[str]:
    """``training.synthetic`` at the tiny preset's size; seed 0, as ``training.train`` uses by default."""
    preset = get_preset(PRESET)
    return [sys.executable, "-m", "training.synthetic", "--out", str(out), "--num-images",
            str(preset.train.num_images), "--size", str(preset.model.vision.image_size)]  # fmt: skip


def make_dataset(work: Path) -> tuple[Path, float]:
    """The reference dataset, DATA, generated uninterrupted with the CLI; (folder, seconds)."""
    start = time.monotonic()
    subprocess.run(synthetic_cmd(work / "DATA"), cwd=ROOT, check=True, capture_output=True, timeout=TIMEOUT_S)
    return work / "DATA", time.monotonic() - start


@dataclasses.dataclass
class GenerationReport:
    command: str = ""  # what was killed and rerun
    kills: list[Kill] = dataclasses.field(default_factory=list)
    orphans: int = 0  # pool workers the last kill orphaned, still writing as the rerun started
    regenerated: bool = False  # the rerun logged that it generated the dataset again
    files: int = 0  # files found byte-identical to DATA after the rerun


def _images_since(folder: Path | None, start_ns: int) -> int:
    images = [] if folder is None else (folder / IMAGE_DIR).glob("*.png")
    return sum(1 for p in images if _mtime_ns(p) >= start_ns)


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def kill_after_images(p: Probed, folder: Callable[[], Path | None], count: int, attempt: int,
                      group: bool) -> Kill | None:  # fmt: skip
    """SIGKILL `p` once it has written `count` images (polled, not sampled: they come fast); None if it ended first."""
    while p.proc.poll() is None:
        if _images_since(folder(), p.start_ns) >= count:
            frames = p.stack()  # where it is, a moment before the kill
            if frames is None:
                break
            p.kill(group)
            aim = f"{count} of {get_preset(PRESET).train.num_images} images"
            return Kill(attempt, aim, "group" if group else "process", synthetic_phases()(frames), where(frames),
                        p.elapsed())  # fmt: skip
        time.sleep(0.001)
    p.wait()
    return None


def _after_generation_kill(folder: Path, ref: Path) -> str:
    """A killed generation must not look complete (objects.json is written last) unless it is complete."""
    if (folder / OBJECTS_FILE).is_file():
        assert_same_files(ref, folder)
        return "complete and identical to DATA"
    images = list((folder / IMAGE_DIR).glob("*.png"))
    broken = 0
    for path in images:
        try:
            _check_file(path)
        except Exception:  # noqa: BLE001 - a half-written image is allowed until objects.json exists
            broken += 1
    return f"{len(images)} images ({broken} unreadable), no {OBJECTS_FILE}"


def _wait_gone(pids: Sequence[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_and_rerun(r: GenerationReport, cmd: Sequence[str], rerun: Sequence[str], env: dict[str, str], ref: Path,
                    folder: Callable[[], Path | None], kills: int, rng: random.Random) -> Path:  # fmt: skip
    """Start `cmd` `kills` times, each killed after a seeded number of images, then `rerun`; the folder.

    After each kill the folder must not pass for a finished dataset. The last kill takes the main
    process alone, and the rerun starts at once, racing the orphaned pool workers; the others take
    the whole process group, which leaves images half-written.
    """
    total = get_preset(PRESET).train.num_images
    rounds = early = 0
    while len(r.kills) < kills:
        rounds += 1
        p = Probed(cmd, env)
        last = len(r.kills) + 1 == kills
        kill = kill_after_images(p, folder, rng.randint(1, total - 1) >> early, rounds, group=not last)
        if kill is None:  # the images came faster than the polls: again from nothing, aiming earlier
            p.finish()
            early += 1
            assert early <= 3, f"{p.describe()} kept finishing before its kill"
            if (done := folder()) is not None:
                shutil.rmtree(done)  # the training run's cache check would take it as it is
            continue
        found = folder()
        assert found is not None, f"{p.describe()} was killed before it created its folder"
        kill.after = _after_generation_kill(found, ref)
        kill.checks = 1
        r.kills.append(kill)
    orphans = p.orphans
    r.orphans = len(orphans)
    p = Probed(rerun, env)
    p.finish()
    r.regenerated = bool(p.logged("generating the synthetic dataset")) or rerun[2] == "training.synthetic"
    _wait_gone(orphans)
    found = folder()
    assert found is not None and r.regenerated, f"the rerun trained on the half-generated {found} as it was"
    r.files = assert_same_files(ref, found)
    return found


def inject_generation(
    data: Path, work: Path, kills: int, seed: int, report: GenerationReport | None = None
) -> GenerationReport:
    """Kill ``python -m training.synthetic`` `kills` times in one folder, rerun it: its files must equal DATA's."""
    folder = work / "DATA_faulty"
    cmd = synthetic_cmd(folder)
    r = report if report is not None else GenerationReport()
    r.command = _shown(cmd, {folder: "D"})
    _kill_and_rerun(r, cmd, cmd, probe_env(work), data, lambda: folder if folder.is_dir() else None, kills,
                    random.Random(seed + 1))  # fmt: skip
    return r


def inject_cache(data: Path, work: Path, seed: int, report: GenerationReport | None = None) -> GenerationReport:
    """Kill ``python -m training.train`` (no --data) while it generates its cache; the rerun must regenerate it."""
    cache = work / "cache"
    # One baseline epoch shows that the rerun trains; what matters here is the cache.
    cmd = train_cmd(work / "OUT_cache", "--cache-dir", str(cache), "--phases", "baseline", "--baseline-epochs", "1")
    r = report if report is not None else GenerationReport()
    r.command = _shown([*cmd, "[--resume]"], {work / "OUT_cache": "OUT", cache: "CACHE"})

    def folder() -> Path | None:
        found = [d for d in cache.iterdir() if d.is_dir()] if cache.is_dir() else []
        return found[0] if found else None

    _kill_and_rerun(r, cmd, [*cmd, "--resume"], probe_env(work), data, folder, 1, random.Random(seed + 2))
    return r


# ----------------------------------------------------------------------------- report


def _shown(cmd: Sequence[str], names: dict[Path, str]) -> str:
    """`cmd` as a reader should see it: ``python`` and short names for the work folders."""
    return " ".join(["python", *(names.get(Path(a), a) for a in cmd[1:])])


def _kill_table(kills: Sequence[Kill], unit: str) -> list[str]:
    lines = [f"  kill {unit:>7}  aimed at            signal   landed in  at (s)  where                     left behind"]
    for i, k in enumerate(kills, 1):
        lines.append(f"  {i:>4} {k.attempt:>7}  {k.aim:<19} {k.signal:<8} {k.phase:<9} {k.seconds:>7.2f}  "
                     f"{k.where:<25} {k.after}")  # fmt: skip
    return lines


def render(args: argparse.Namespace, data_seconds: float | None, training: TrainingReport,
           generation: Sequence[GenerationReport], failure: str | None) -> str:  # fmt: skip
    """The summary, ready to paste into the README."""
    preset = get_preset(PRESET)
    t = training
    phases = ", ".join(f"{k} {a:.2f}-{b:.2f}" for k, (a, b) in t.windows.items() if k != "exit")
    landed = ", ".join(dict.fromkeys(k.phase for k in t.kills))
    lines = [
        f"$ python -m benchmarks.fault_injection --kills {args.kills} --seed {args.seed} "
        f"--synthetic-kills {args.synthetic_kills}",
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
        f"{platform.python_version()}. DATA: {preset.train.num_images} synthetic images at "
        f"{preset.model.vision.image_size} px (the {PRESET} preset's)"
        + (f", generated in {data_seconds:.1f} s." if data_seconds is not None else "."),
        "",
        f"training: python -m training.train --preset {PRESET} --data DATA --out OUT [--resume]",
        f"  reference run, uninterrupted: {t.seconds:.1f} s (phases, s from start: {phases})",
        *_kill_table(t.kills, "attempt"),
        f"  {len(t.kills)} kills ({landed}); {t.resumes} runs with --resume, {t.restored} of them picking up saved "
        "epochs" + (f", {t.early} completing before the kill meant for them" if t.early else ""),
        (f"  after every kill and at the end: checkpoints load, JSON parses, resume states load, nothing "
         f"half-written under a final name ({t.checks} checks)"),
        *(f"  at the end: {fact}" for fact in t.facts),
    ]  # fmt: skip
    checks = t.checks + len(t.facts)
    for g in generation:
        lines += [
            "",
            f"dataset generation: {g.command}",
            *_kill_table(g.kills, "run"),
            f"  after every kill: no {OBJECTS_FILE}, so the folder does not pass for a finished dataset",
        ]
        if g.files:
            lines.append(f"  rerun at once{f', racing {g.orphans} orphaned pool workers' if g.orphans else ''}"
                         f"{', generating the data again' if g.regenerated else ''}: {g.files} files "
                         "byte-identical (SHA-256) to the uninterrupted generation")  # fmt: skip
        checks += len(g.kills) + g.files
    lines += ["", f"checks passed: {checks}", f"FAIL: {failure}" if failure else "PASS"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs injected into training (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points (default 0)")
    p.add_argument("--synthetic-kills", type=int, default=3, help="SIGKILLs injected into dataset generation")
    p.add_argument("--workdir", default=None, help="keep every run here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.kills < 1 or args.synthetic_kills < 1:
        p.error("--kills and --synthetic-kills must be at least 1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault-injection-")).resolve()
    seconds, training, generation, failure = None, TrainingReport(), [], None
    try:
        data, seconds = make_dataset(work)
        inject_training(data, work, args.kills, args.seed, report=training)
        generation.append(GenerationReport())
        inject_generation(data, work, args.synthetic_kills, args.seed, report=generation[-1])
        generation.append(GenerationReport())
        inject_cache(data, work, args.seed, report=generation[-1])
    except AssertionError as e:
        failure = str(e)
    print(render(args, seconds, training, generation, failure))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
