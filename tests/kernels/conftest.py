"""Shared fixtures for the kernel tests, and the interpreter subprocess.

On CPU the Triton kernels run in triton's interpreter, which must be on (TRITON_INTERPRET=1) before
triton is imported: triton builds its own library (tl.sum, ...) for one mode at import. A suite run in
one process (`pytest tests/`) has imported triton long before this file. So, in a process without the
interpreter, the tests that request the `interpret` fixture are run together, once, in a subprocess
started with TRITON_INTERPRET=1, and each reports its own outcome from there. Started with
TRITON_INTERPRET=1, pytest runs them in process.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from adaflex.kernels._dispatch import interpreting, triton

TOL = {  # (atol, rtol) of a Triton result against its torch reference
    torch.float32: (2e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
_REPORT = "ADAFLEX_KERNELS_TEST_REPORT"  # set in the subprocess: where to write the outcomes


@pytest.fixture
def interpret(monkeypatch):
    """Triton kernels on CPU tensors, through the interpreter."""
    if triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("ADAFLEX_KERNELS", raising=False)


@pytest.fixture
def cuda(monkeypatch):
    """Compiled Triton kernels on the GPU; skipped without one."""
    if not torch.cuda.is_available() or interpreting():
        pytest.skip("needs a CUDA device (and compiled, not interpreted, Triton)")
    monkeypatch.delenv("ADAFLEX_KERNELS", raising=False)
    return torch.device("cuda")


@pytest.fixture
def close():
    """assert_close with the tolerance of the expected tensor's dtype."""

    def check(actual, expected):
        atol, rtol = TOL[expected.dtype]
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)

    return check


# --- interpreter subprocess -------------------------------------------------------------------------

def _needs_subprocess(item) -> bool:
    return "interpret" in getattr(item, "fixturenames", ()) and triton is not None and not interpreting()


def _run_interpreter_subprocess(session) -> dict:
    ids = [it.nodeid for it in session.items if _needs_subprocess(it)]
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        env = {**os.environ, "TRITON_INTERPRET": "1", _REPORT: report}
        env.pop("ADAFLEX_KERNELS", None)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids],
                              cwd=session.config.rootpath, env=env, capture_output=True, text=True, timeout=900,
                              check=False)
        if not os.path.exists(report):
            return {"error": f"interpreter subprocess failed (rc {proc.returncode}):\n"
                             + (proc.stdout + proc.stderr)[-4000:]}
        with open(report) as f:
            return json.load(f)


def pytest_pyfunc_call(pyfuncitem):
    if not _needs_subprocess(pyfuncitem):
        return None
    session = pyfuncitem.session
    if not hasattr(session, "_adaflex_interpreter_results"):
        session._adaflex_interpreter_results = _run_interpreter_subprocess(session)
    results = session._adaflex_interpreter_results
    if "error" in results:
        pytest.fail(results["error"], pytrace=False)
    outcome, text = results.get(pyfuncitem.nodeid, ("missing", "not reported by the interpreter subprocess"))
    if outcome == "skipped":
        pytest.skip(f"(interpreter subprocess) {text}")
    if outcome != "passed":
        pytest.fail(f"in the TRITON_INTERPRET=1 subprocess:\n{text}", pytrace=False)
    return True  # the test body ran, and passed, in the subprocess


def pytest_runtest_logreport(report):
    path = os.environ.get(_REPORT)
    if not path or not interpreting():
        return
    if report.when == "call" or report.outcome != "passed":  # a failed or skipped setup counts too
        text = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longreprtext
        results = {}
        if os.path.exists(path):
            with open(path) as f:
                results = json.load(f)
        results.setdefault(report.nodeid, (report.outcome, text))  # first failure wins (setup before call)
        with open(path, "w") as f:
            json.dump(results, f)
