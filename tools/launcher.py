"""`tritonserver` for the project environment: runs the binary bundled in nvidia-pytriton as in an NGC container.

Every argument is passed through unchanged. The launcher only supplies what the NGC image has on disk:

* a backend directory holding the Python backend plus the stub built for this interpreter (unless
  `--backend-directory` is given or `TRITON_BACKEND_DIR` is set);
* the bundle's shared libraries on `LD_LIBRARY_PATH`, then this interpreter's `libpython` directory: the stub
  links `libpython3.X.so`, and must load the build whose extension modules it will import, not the system's;
* this interpreter's `bin` first on `PATH`, because the stub embeds the `python3` it finds there (and ignores
  `PYTHONPATH`), so models import the packages installed next to this interpreter;
* a per-launch Python-backend shared-memory prefix, so the regions of a server that died without cleaning up
  can be removed afterwards without touching any other server's regions.

Shutdown (docs/ARCHITECTURE.md, "Lifecycle"): on SIGINT or SIGTERM the launcher creates the drain file it gave the
server as `MIMO_DRAIN_FILE`; the models end their streams with a final SHUTTING_DOWN error and refuse new requests.
Once the server holds no request (its metrics) or the drain deadline passes, the signal goes on to the server,
which gets a short grace to exit; past it (Triton 2.51 waits for every idle client gRPC stream) the launcher ends
the server's process group itself. A second signal stops everything at once. If the launcher dies outright, a
reaper process it forked ends the server's process group and removes what the launcher owned. `TRITONSERVER`
overrides the binary.
"""

from __future__ import annotations

import ctypes
import http.client
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mimo.serving.lifecycle import IN_FLIGHT_METRIC, SELF_GRPC_URL_ENV, SHM_PREFIX_ENV

_PR_SET_PDEATHSIG = 1
DRAIN_DEADLINE_S = 5.0  # longest the models get to end their streams before the server is signalled
UNCHECKED_DRAIN_S = 1.0  # with metrics off the drain cannot be watched: the models get this long to see the file
SERVER_EXIT_GRACE_S = 5.0  # after the signal: a drained server exits in 1-4 s (CPU) unless client streams hold it
POLL_S = 0.05
_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class ServerBundle:
    binary: Path
    library_dir: Path | None  # None when the binary comes from elsewhere and brings its own libraries
    python_backend_dir: Path | None  # the bundle's `backends/python`
    stub: Path | None  # triton_python_backend_stub built for this interpreter's Python version


def find_bundle() -> ServerBundle:
    """Locate tritonserver, its libraries and the Python backend; `TRITONSERVER` overrides the binary."""
    spec = importlib.util.find_spec("pytriton")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" if spec else None
    override = os.environ.get("TRITONSERVER")
    binary = Path(override) if override else (root / "bin" / "tritonserver" if root else None)
    if binary is None or not binary.is_file():
        raise FileNotFoundError(
            f"tritonserver binary not found ({'TRITONSERVER=' + override if override else 'nvidia-pytriton is not installed'})"
        )
    library_dir = _wheel_library_dir(binary)
    if root is None:
        return ServerBundle(binary, library_dir, None, None)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    return ServerBundle(binary, library_dir, root / "backends" / "python", stub if stub.is_file() else None)


def _wheel_library_dir(binary: Path) -> Path | None:
    """`<site-packages>/nvidia_pytriton.libs` for a binary at `<site-packages>/pytriton/tritonserver/bin/`."""
    parents = binary.resolve().parents
    if len(parents) > 3 and (parents[3] / "nvidia_pytriton.libs").is_dir():
        return parents[3] / "nvidia_pytriton.libs"
    return None


def build_backend_dir(bundle: ServerBundle, dest: Path) -> Path:
    """Assemble `<dest>/python` = the bundle's Python backend + the stub matching this interpreter."""
    if bundle.python_backend_dir is None or bundle.stub is None:
        raise FileNotFoundError(
            f"no Python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor} in the "
            "nvidia-pytriton bundle; set TRITON_BACKEND_DIR to a backend directory built for this interpreter"
        )
    python_dir = dest / "python"
    python_dir.mkdir(parents=True)
    for item in bundle.python_backend_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, python_dir / item.name)
    shutil.copy2(bundle.stub, python_dir / bundle.stub.name)
    return dest


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_values(args: list[str], flag: str) -> list[str]:
    """Every value given to `flag`, as `--flag=value` or `--flag value`, in order."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def _python_backend_config(args: list[str], key: str) -> str | None:
    """Value of `--backend-config=python,<key>=<value>` if the user gave one."""
    for value in _flag_values(args, "--backend-config"):
        if value.startswith(f"python,{key}="):
            return value.split("=", 1)[1]
    return None


def _local_endpoint(args: list[str], service: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) where this server's `service` (metrics, grpc) can be reached from here; None when
    `--allow-<service>` is off. A wildcard address is reached through loopback."""
    allow = _flag_values(args, f"--allow-{service}")
    if allow and allow[-1].lower() in ("false", "off", "0"):
        return None
    address = (_flag_values(args, f"--{service}-address") or ["0.0.0.0"])[-1]
    port = (_flag_values(args, f"--{service}-port") or [str(default_port)])[-1]
    if not port.isdigit():
        raise ValueError(f"--{service}-port must be a port number, got {port!r}")
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address), int(port)


def metrics_endpoint(args: list[str]) -> tuple[str, int] | None:
    """(host, port) of this server's metrics; None when `--allow-metrics` is off."""
    return _local_endpoint(args, "metrics", 8002)


def grpc_endpoint(args: list[str]) -> str | None:
    """host:port of this server's gRPC service (the entry model streams mimo_llm through it, mimo.serving.loopback);
    None when `--allow-grpc` is off."""
    endpoint = _local_endpoint(args, "grpc", 8001)
    if endpoint is None:
        return None
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def in_flight(endpoint: tuple[str, int]) -> int | None:
    """Requests the server still holds: Triton's pending requests plus every model's `IN_FLIGHT_METRIC` gauge.

    None while the metrics cannot be read. Triton's own counters miss requests a decoupled model is executing.
    """
    connection = http.client.HTTPConnection(*endpoint, timeout=1)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    total = 0.0
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] in ("nv_inference_pending_request_count", IN_FLIGHT_METRIC):
            total += float(line.rsplit(" ", 1)[1])
    return round(total)


def interpreter_library_dir() -> str | None:
    """Where this interpreter's shared libpython lives (None for a statically linked interpreter)."""
    return sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None


def server_environment(bundle: ServerBundle, drain_file: Path, base: dict | None = None,
                       shm_prefix: str | None = None, grpc_url: str | None = None) -> dict[str, str]:  # fmt: skip
    env = dict(os.environ if base is None else base)
    env["MIMO_DRAIN_FILE"] = str(drain_file)
    if shm_prefix:
        env[SHM_PREFIX_ENV] = shm_prefix  # regions the models create under it go with the server's
    if grpc_url is not None:
        env[SELF_GRPC_URL_ENV] = grpc_url
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    library_path = [str(bundle.library_dir) if bundle.library_dir else None, interpreter_library_dir(),
                    env.get("LD_LIBRARY_PATH")]  # fmt: skip
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in library_path if p)
    return env


def server_command(bundle: ServerBundle, args: list[str], backend_dir: Path | None, shm_prefix: str | None) -> list[str]:
    command = [str(bundle.binary), *args]
    if backend_dir is not None:
        command.append(f"--backend-directory={backend_dir}")
    if shm_prefix is not None:
        command.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
    return command


def remove_shm_regions(prefix: str, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    removed = []
    for region in shm_dir.glob(prefix + "*"):
        region.unlink(missing_ok=True)
        removed.append(region.name)
    return removed


def kill_process_group(pgid: int) -> None:
    """SIGKILL the server's session: the server if it still runs, and stubs (or their workers) that outlive it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def client_connections(pid: int) -> int:
    """Established TCP connections the process `pid` holds (the clients still connected to a server)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    established = 0
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        established += sum(1 for row in rows if row.split()[3] == "01" and row.split()[9] in inodes)
    return established


def _die_with_parent() -> None:
    # The server lives in its own session (terminal signals reach only the launcher, which drains first); if the
    # launcher is killed outright, the kernel kills the server at once (a SIGTERM would wait for open streams) and
    # the reaper ends the stubs.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def remove_owned(shm_prefix: str | None, scratch: Path) -> list[str]:
    """Removes the launcher's shared-memory regions and scratch directory; returns the regions removed."""
    shutil.rmtree(scratch, ignore_errors=True)
    return remove_shm_regions(shm_prefix) if shm_prefix is not None else []


def start_reaper(shm_prefix: str | None, scratch: Path) -> tuple[int, int]:
    """Forks the process that cleans up after a launcher killed outright; returns (its pid, its pipe's write end).

    The reaper sits in a session of its own, reading the pipe: the launcher writes the server's pid, then "done"
    once it has cleaned up itself. End of file without "done" means the launcher died: the reaper kills the
    server's process group (server, stubs and what they started) and removes the regions and the scratch directory.
    """
    read_end, write_end = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(write_end)
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _reap_when_orphaned(read_end, shm_prefix, scratch)
        finally:
            os._exit(0)
    os.close(read_end)
    return pid, write_end


def _reap_when_orphaned(read_end: int, shm_prefix: str | None, scratch: Path) -> None:
    received = b""
    while chunk := os.read(read_end, 64):
        received += chunk
    words = received.split()
    if b"done" in words:
        return
    if words:
        kill_process_group(int(words[0]))
    removed = remove_owned(shm_prefix, scratch)
    print(f"tritonserver launcher died: its reaper killed the server's process group and removed {len(removed)} "
          "shared-memory regions", file=sys.stderr, flush=True)  # fmt: skip


class ShutdownSignals:
    """Records SIGINT / SIGTERM in arrival order while installed; the launcher acts on them between polls."""

    def __init__(self):
        self.received: list[int] = []
        self._previous = {}

    def __enter__(self) -> ShutdownSignals:
        self._previous = {signum: signal.signal(signum, self._record) for signum in _SHUTDOWN_SIGNALS}
        return self

    def _record(self, signum: int, _frame) -> None:
        self.received.append(signum)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def forced(self) -> bool:
        return len(self.received) > 1


def _wait(server: subprocess.Popen, timeout_s: float) -> int | None:
    try:
        return server.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _log(message: str) -> None:
    print(f"tritonserver launcher: {message}", file=sys.stderr, flush=True)


def supervise(server: subprocess.Popen, signals: ShutdownSignals, drain_file: Path,
              metrics: tuple[str, int] | None) -> int:
    """Waits for the server; on a first signal drains and stops it. Returns its status, shell style for signals."""
    while not signals.received:
        if (returncode := _wait(server, POLL_S)) is not None:
            return _status(returncode)
    drain_file.touch()
    start = time.monotonic()
    left = _drain(server, signals, metrics)
    held = "nothing" if left == 0 else "an unknown number of requests" if left is None else f"{left} requests"
    _log(f"drain: {held} in flight after {time.monotonic() - start:.1f} s")
    if not signals.forced and server.poll() is None:
        server.send_signal(signals.received[0])
        grace_end = time.monotonic() + SERVER_EXIT_GRACE_S
        while not signals.forced and time.monotonic() < grace_end and _wait(server, POLL_S) is None:
            pass
    if signals.forced:
        _log(f"second signal ({signal.Signals(signals.received[1]).name}): stopped the server at once")
        return 128 + signals.received[1]
    if (returncode := server.poll()) is not None:
        return _status(returncode)
    # Triton 2.51 keeps a model loaded while a client's gRPC stream stays open, even after its final response, and
    # then blocks in the gRPC server's shutdown until that client disconnects (docs/ARCHITECTURE.md, "Lifecycle")
    connections = client_connections(server.pid)
    _log(f"tritonserver still running {SERVER_EXIT_GRACE_S:.0f} s after the signal, {connections} client "
         f"connection{'' if connections == 1 else 's'} open: ending its process group")  # fmt: skip
    return 0 if left == 0 else 1


def _status(returncode: int) -> int:
    """A server stopped by a signal reports it like a shell would."""
    return 128 - returncode if returncode < 0 else returncode


def _drain(server: subprocess.Popen, signals: ShutdownSignals, metrics: tuple[str, int] | None) -> int | None:
    """Polls until the server holds no request or the drain deadline; returns what it still holds (None: unknown)."""
    deadline = time.monotonic() + (DRAIN_DEADLINE_S if metrics else UNCHECKED_DRAIN_S)
    while True:
        left = in_flight(metrics) if metrics else None
        if left == 0 or signals.forced or server.poll() is not None or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_S)


def run(args: list[str]) -> int:
    bundle = find_bundle()
    metrics = metrics_endpoint(args)
    own_shm_prefix = None
    if _python_backend_config(args, "shm-region-prefix-name") is None:
        own_shm_prefix = f"mimo_triton_{uuid.uuid4().hex[:12]}_"
    scratch = Path(tempfile.mkdtemp(prefix="mimo-triton-"))
    reaper, reaper_pipe = start_reaper(own_shm_prefix, scratch)
    server = None
    try:
        backend_dir = None
        if not _has_flag(args, "--backend-directory"):
            env_dir = os.environ.get("TRITON_BACKEND_DIR")
            backend_dir = Path(env_dir) if env_dir else build_backend_dir(bundle, scratch / "backends")
        drain_file = scratch / "draining"
        with ShutdownSignals() as signals:
            server = subprocess.Popen(
                server_command(bundle, args, backend_dir, own_shm_prefix),
                env=server_environment(bundle, drain_file, grpc_url=grpc_endpoint(args), shm_prefix=own_shm_prefix
                                       or _python_backend_config(args, "shm-region-prefix-name")),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            os.write(reaper_pipe, f"{server.pid}\n".encode())
            return supervise(server, signals, drain_file, metrics)
    finally:
        if server is not None:
            kill_process_group(server.pid)
            server.wait()
        removed = remove_owned(own_shm_prefix, scratch)
        if removed:
            _log(f"removed {len(removed)} leftover shared-memory regions")
        os.write(reaper_pipe, b"done\n")
        os.close(reaper_pipe)
        os.waitpid(reaper, 0)


def main() -> int:
    try:
        return run(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        print(f"tritonserver: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
