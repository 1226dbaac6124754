"""Runs a worker script as two gloo ranks in subprocesses and returns what each rank wrote."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_two_ranks(worker: Path, tmp_path: Path, settings: dict, limit_s: float = 180) -> list[dict]:
    """Starts `python WORKER RANK 2 STORE_FILE RESULT_FILE SETTINGS_JSON` for ranks 0 and 1.

    Waits until both finish, or one fails (its peer would wait for it), or `limit_s` passes; then
    kills and reaps both and returns the ranks' JSON results.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # loopback: no hostname lookup
    store, results = tmp_path / "store", [tmp_path / f"rank{rank}.json" for rank in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), "2", str(store), str(results[rank]), json.dumps(settings)],
            env=env,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + limit_s
    try:
        while any(p.poll() is None for p in processes) and all(p.poll() in (None, 0) for p in processes):
            assert time.monotonic() < deadline, f"the two ranks did not finish within {limit_s} s"
            time.sleep(0.2)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert [process.returncode for process in processes] == [0, 0]
    return [json.loads(path.read_text()) for path in results]
