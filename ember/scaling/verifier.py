"""A code verifier: run a completion's code against given tests in a sandboxed subprocess; pass or fail.

The sandbox is a fresh `python -I` (isolated: no user site, no PYTHON* variables, no script directory on the
path) in a temporary directory that is deleted afterwards, with limits set by a small bootstrap before the
program runs: address space (a memory hog gets MemoryError), CPU seconds, size of files it writes (its
stdout and stderr go to files too, so a flood of output cannot fill the parent's memory), no core dumps. A
wall-clock limit kills its whole process group. It is not a security boundary: the program runs as the
caller's user, with the network and the file system it can see; run untrusted code in a container.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from ember.errors import InvalidRequestError
from ember.outputs import CompletionOutput

_OUTPUT_TAIL = 2000  # characters of stderr kept in a result

# Runs in the sandboxed interpreter: limits first, then the program as __main__. Hard limits equal the soft
# ones (the program cannot raise them back unless it is root), except CPU time: one second more, so the
# kernel's SIGXCPU at the soft limit comes before its SIGKILL and the result can say why it stopped.
_BOOTSTRAP = """\
import resource, runpy, sys
for name, soft, hard in ((resource.RLIMIT_AS, {memory}, {memory}), (resource.RLIMIT_CPU, {cpu}, {cpu} + 1),
                         (resource.RLIMIT_FSIZE, {file}, {file}), (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(name, (soft, hard))
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    """Wall-clock time before the process group is killed."""
    cpu_seconds: int = 10
    """CPU time (RLIMIT_CPU): the kernel kills the process past it."""
    memory_bytes: int = 1 << 30
    """Address space (RLIMIT_AS): allocations past it raise MemoryError."""
    file_bytes: int = 16 << 20
    """Largest file the program may write, its captured stdout and stderr included (RLIMIT_FSIZE)."""

    def __post_init__(self) -> None:
        if not self.wall_seconds > 0:
            raise InvalidRequestError(f"sandbox wall_seconds must be > 0, got {self.wall_seconds!r}")
        for name in ("cpu_seconds", "memory_bytes", "file_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"sandbox {name} must be a positive integer, got {value!r}")


@dataclass
class SandboxResult:
    status: str
    """"passed" (exit 0), "failed" (an exception or non-zero exit), "timeout" (killed at the wall-clock
    limit), "memory" (MemoryError) or "cpu" (killed at the CPU-time limit)."""
    returncode: int | None
    """None when it was killed at the wall-clock limit."""
    seconds: float
    stderr: str
    """The end of what it wrote to stderr."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_sandboxed(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a Python program under `limits`."""
    bootstrap = _BOOTSTRAP.format(memory=limits.memory_bytes, cpu=limits.cpu_seconds, file=limits.file_bytes)
    with tempfile.TemporaryDirectory(prefix="ember-sandbox-") as workdir:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        stdout_path, stderr_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", bootstrap], cwd=workdir, stdin=subprocess.DEVNULL, stdout=stdout,
                stderr=stderr, env=_sandbox_env(workdir), start_new_session=True,
            )  # fmt: skip
            returncode = _wait(proc, limits.wall_seconds)
            seconds = time.perf_counter() - start
        with open(stderr_path, encoding="utf-8", errors="replace") as f:
            err = f.read()[-_OUTPUT_TAIL:]
    return SandboxResult(_status(returncode, err), returncode, seconds, err)


def _sandbox_env(workdir: str) -> dict[str, str]:
    """Only what an interpreter needs; one thread for any numeric library the tests import."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip


def _wait(proc: subprocess.Popen[bytes], wall_seconds: float) -> int | None:
    try:
        return proc.wait(timeout=wall_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its children too: the session is its own
        proc.wait()
        return None
    finally:
        try:  # anything it left running in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _status(returncode: int | None, stderr: str) -> str:
    if returncode is None:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == -signal.SIGXCPU:
        return "cpu"
    return "memory" if "MemoryError" in stderr else "failed"


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block of a chat model's reply (an unclosed one runs to the end), or the whole
    text when there is none."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


@dataclass(frozen=True)
class CodeVerifier:
    """A scorer: 1.0 when `program(prompt, completion)` exits cleanly, else 0.0. The default program is the
    completion's code (`extract_code`), then `tests` (asserts, or a check function and its call)."""

    tests: str
    limits: SandboxLimits = SandboxLimits()
    program: Callable[[str, CompletionOutput, str], str] | None = None
    """(prompt, completion, tests) -> the program to run, for tasks whose code must be assembled otherwise
    (HumanEval: its prompt, the completion, its check function)."""

    def __call__(self, prompt: str, completion: CompletionOutput) -> float:
        return 1.0 if self.verify(prompt, completion).passed else 0.0

    def verify(self, prompt: str, completion: CompletionOutput) -> SandboxResult:
        if self.program is not None:
            code = self.program(prompt, completion, self.tests)
        else:
            code = extract_code(completion.text) + "\n\n" + self.tests + "\n"
        return run_sandboxed(code, self.limits)
