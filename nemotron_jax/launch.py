"""Multi-process runs: `jax.distributed` set-up for a process, and a launcher for N local processes.

    python -m nemotron_jax.launch --processes 2 --cpu-devices 4 -- \\
        experiments/train.py --config configs/tiny.py --workdir runs/tiny-2p --config.mesh.data=8

The launcher starts N copies of the command (a `.py` file or `-m module` runs under this Python) with

    JAX_COORDINATOR_ADDRESS  127.0.0.1:<free port>  (process 0 hosts the coordinator; jax reads this itself)
    NEMOTRON_NUM_PROCESSES   N
    NEMOTRON_PROCESS_ID      0 .. N-1
    XLA_FLAGS                --xla_force_host_platform_device_count=<cpu-devices>   (with --cpu-devices)

prefixes each line a process prints with `[pI]`, and watches them: when one exits with a non-zero code (a
crash, an out-of-memory kill, `kill -9`), it prints which process died and how, stops the others (SIGTERM,
then SIGKILL after `--grace` seconds) and exits with that code, so a dead peer never leaves the rest hanging
in a collective. It exits 0 when every process has.

In each process, `initialize_distributed()` (which `experiments/train.py` calls when `--multihost` is given or
the variables above are set) selects gloo for CPU collectives and calls `jax.distributed.initialize` with the
coordinator address, process count and index from its arguments or the environment. Left unset, jax detects
them itself on SLURM (`srun`), Open MPI, Kubernetes and Cloud TPU, so on a cluster the same trainer runs under
the cluster's own launcher: `srun --ntasks=N python experiments/train.py ... --multihost`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Sequence

ENV_NUM_PROCESSES = "NEMOTRON_NUM_PROCESSES"
ENV_PROCESS_ID = "NEMOTRON_PROCESS_ID"
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself


def launched() -> bool:
    """Whether this process was started by the launcher (or anything else that sets its variables)."""
    return ENV_PROCESS_ID in os.environ


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, heartbeat_timeout_seconds: int | None = None,
                           initialization_timeout: int | None = None) -> None:
    """`jax.distributed.initialize` with gloo CPU collectives; unset arguments come from the environment
    (the launcher's variables, then jax's own cluster detection: SLURM, Open MPI, Kubernetes, Cloud TPU).
    Call it before anything else touches jax's devices.

    `heartbeat_timeout_seconds` (default: $NEMOTRON_HEARTBEAT_TIMEOUT or jax's 100 s) bounds how long the
    survivors of a dead process wait before jax's coordination service stops them."""
    import jax  # noqa: PLC0415

    env = os.environ
    if num_processes is None and ENV_NUM_PROCESSES in env:
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and ENV_PROCESS_ID in env:
        process_id = int(env[ENV_PROCESS_ID])
    kw = {}
    hb = heartbeat_timeout_seconds or env.get("NEMOTRON_HEARTBEAT_TIMEOUT")
    if hb:
        kw["heartbeat_timeout_seconds"] = int(hb)
    if initialization_timeout is not None:
        kw["initialization_timeout"] = int(initialization_timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kw)


@contextlib.contextmanager
def fail_fast():
    """In a multi-process job, a process whose code raises (or calls sys.exit with a non-zero code) prints the
    error and leaves at once with `os._exit`. Otherwise it would wait at jax's shutdown barrier for peers that
    are blocked in a collective with it (up to jax's `shutdown_timeout_seconds`, 300 s) before exiting; exiting
    at once lets the launcher (or the cluster's, or jax's heartbeat) stop the rest right away. A single process
    raises as usual."""
    try:
        yield
    except BaseException as e:
        jax = sys.modules.get("jax")
        if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
            raise
        if isinstance(e, SystemExit):
            if e.code in (None, 0):
                raise
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        else:
            traceback.print_exc()
            code = 1
        print(f"process {jax.process_index()} failed; exiting now with code {code}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _pump(stream, out, prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            out.buffer.write(prefix.encode() + line)
            out.flush()
    stream.close()


def _command(cmd: Sequence[str]) -> list[str]:
    cmd = list(cmd)
    if cmd and (cmd[0].endswith(".py") or cmd[0] == "-m"):
        return [sys.executable, *cmd]
    return cmd


def launch(cmd: Sequence[str], processes: int, *, cpu_devices: int | None = None, port: int | None = None,
           grace: float = 10.0, poll: float = 0.1, out=None) -> int:
    """Runs `cmd` as `processes` local processes of one jax.distributed job (see the module doc); returns the
    job's exit code: 0 when every process exited 0, else the first failure's (128 + signal for a signal)."""
    out = out or sys.stdout
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if not cmd:
        raise ValueError("nothing to launch: give the command after --")
    address = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()

    def say(msg: str) -> None:
        with lock:
            out.write(f"launch: {msg}\n")
            out.flush()

    procs, pumps = [], []
    for i in range(processes):
        env = dict(os.environ, **{ENV_COORDINATOR: address, ENV_NUM_PROCESSES: str(processes),
                                  ENV_PROCESS_ID: str(i), "PYTHONUNBUFFERED": "1"})
        if cpu_devices is not None:
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
        # its own session, so stopping it also stops anything it started (grain workers)
        p = subprocess.Popen(_command(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        procs.append(p)
        for stream, dest in ((p.stdout, out), (p.stderr, sys.stderr if out is sys.stdout else out)):
            t = threading.Thread(target=_pump, args=(stream, dest, f"[p{i}] ", lock), daemon=True)
            t.start()
            pumps.append(t)
    say(f"{processes} processes, coordinator {address}, pids " + " ".join(f"p{i}={p.pid}" for i, p in enumerate(procs)))

    def stop(survivors, sig):
        for p in survivors:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    interrupted = []
    def on_signal(signum, _frame):
        interrupted.append(signum)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if interrupted or failed:
                survivors = [p for p, c in zip(procs, codes) if c is None]
                if failed:
                    # all failures seen at once; a death by signal first (a peer of a dead process may fail too)
                    failed.sort(key=lambda ic: (ic[1] > 0, ic[0]))
                    code = 128 - failed[0][1] if failed[0][1] < 0 else failed[0][1]
                    for i, c in failed:
                        say(f"process {i} (pid {procs[i].pid}) {_describe(c)}")
                    if survivors:
                        say(f"stopping the other {len(survivors)} process(es): "
                            + " ".join(f"p{i}" for i, c in enumerate(codes) if c is None))
                else:
                    code = 128 + interrupted[0]
                    say(f"got {signal.Signals(interrupted[0]).name}; stopping {len(survivors)} process(es)")
                stop([procs[i] for i, _ in failed], signal.SIGKILL)  # what a dead process left behind (workers)
                stop(survivors, signal.SIGTERM)
                deadline = time.monotonic() + grace
                while any(p.poll() is None for p in survivors) and time.monotonic() < deadline:
                    time.sleep(poll)
                left = [p for p in survivors if p.poll() is None]
                if left:
                    say(f"{len(left)} process(es) still running after {grace:g} s; killing them")
                    stop(left, signal.SIGKILL)
                for p in procs:
                    p.wait()
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(poll)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
    if code == 0:
        say(f"all {processes} processes exited 0")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = []
    if "--" in argv:
        k = argv.index("--")
        argv, cmd = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(prog="python -m nemotron_jax.launch", description=__doc__.split("\n\n")[0],
                                 usage="%(prog)s --processes N [--cpu-devices D] [--port P] -- command ...")
    ap.add_argument("--processes", type=int, required=True, help="number of local processes")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="CPU devices per process (sets XLA_FLAGS=--xla_force_host_platform_device_count)")
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    ap.add_argument("--grace", type=float, default=10.0,
                    help="seconds between SIGTERM and SIGKILL when stopping the survivors of a failure")
    args = ap.parse_args(argv)
    if not cmd:
        ap.error("give the command to run after --, e.g. -- experiments/train.py --config configs/tiny.py ...")
    try:
        return launch(cmd, args.processes, cpu_devices=args.cpu_devices, port=args.port, grace=args.grace)
    except ValueError as e:
        ap.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
