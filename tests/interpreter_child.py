"""Run Triton kernel test cases under the CPU interpreter in a child process (shared by the kernel tests).

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is imported, so the
interpreter must run in a fresh process: a test file re-runs itself as a script with ``--worker``,
the child computes every case and prints one ``RESULTS {json}`` line, and each pytest case checks its
own entry. The pytest process and the other test files stay untouched.

    # in a test file
    def _worker():
        run_cases([("prefill", PREFILL_CASES, lambda case, seed: run_prefill_case(case, "cpu", seed))])

    @pytest.fixture(scope="module")
    def interpreter_results():
        return child_results(__file__)

    if __name__ == "__main__" and "--worker" in sys.argv:
        _worker()
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, Iterable, Sequence, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Case = Dict
CaseFn = Callable[[Case, int], Dict]


def fresh_seed() -> int:
    """A new random seed for every case (printed with the results, so a failure can be replayed)."""
    return int.from_bytes(os.urandom(4), "little") ^ (time.time_ns() & 0xFFFFFFFF)


def interpreter_compat() -> None:
    """Triton 3.6's interpreter keeps scalars as 1-element arrays and converts loop bounds with
    int(array), which numpy >= 2.3 refuses ("only 0-dimensional arrays can be converted"); triton 3.9
    squeezes first. Apply 3.9's fix in the interpreter child only."""
    from triton.runtime import interpreter as ti
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_sw_compat", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    patched._sw_compat = True
    ti._patch_lang_tensor = patched


def run_cases(kinds: Iterable[Tuple[str, Sequence[Case], CaseFn]]) -> None:
    """Child side: run ``fn(case, seed)`` for every case of every kind; print ``RESULTS {kind/name: result}``.

    An exception becomes ``{"error": ..., "seed": ...}`` for that case alone (its test fails, the others run).
    """
    assert os.environ.get("TRITON_INTERPRET") == "1"
    interpreter_compat()
    warnings.filterwarnings("ignore", category=RuntimeWarning)      # log(0) of masked lanes under numpy
    results: Dict[str, Dict] = {}
    for kind, cases, fn in kinds:
        for case in cases:
            seed = fresh_seed()
            try:
                res = fn(case, seed)
            except Exception as e:  # reported per case by the parent
                res = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}", "seed": seed}
            results[f"{kind}/{case['name']}"] = res
    print("RESULTS " + json.dumps(results))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def child_results(test_file: str, timeout: int = 900) -> Dict[str, Dict]:
    """Parent side: run ``test_file --worker`` with TRITON_INTERPRET=1 on the CPU and return its results."""
    if not triton_available():
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("SKETCH_WALK_ATTN_BACKEND", None)
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--worker"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"interpreter child failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULTS "):])
