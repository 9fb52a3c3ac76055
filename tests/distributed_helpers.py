"""One command run as several JAX processes joined by ``jax.distributed`` on 127.0.0.1, as the
workers of a pod run it (the multi-host tests)."""

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_joined(cmd: list[str], processes: int, env: dict, cwd=None) -> list[subprocess.Popen]:
    """Starts ``cmd`` as ``processes`` processes (one plain process when 1), their stdout and
    stderr piped as text."""
    if processes > 1:
        env = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
                   JAX_NUM_PROCESSES=str(processes))
    return [subprocess.Popen(cmd, env=dict(env, JAX_PROCESS_ID=str(i)) if processes > 1 else env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
            for i in range(processes)]


def wait_joined(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Waits for every process (killing all that still run after ``timeout`` seconds, which
    then fails); returns each one's (stdout, stderr)."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def run_joined(cmd: list[str], processes: int, env: dict, timeout: float, cwd=None) -> list[str]:
    """Runs ``cmd`` as ``processes`` processes (one plain process when 1), waits for all, and
    asserts that each exited 0. Returns each process's stderr."""
    procs = start_joined(cmd, processes, env, cwd)
    outs = wait_joined(procs, timeout)
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} of {processes}:\n{err[-4000:]}"
    return [err for _, err in outs]
