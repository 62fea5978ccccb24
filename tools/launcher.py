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

SIGINT and SIGTERM are forwarded to the server, which shuts down gracefully; the launcher waits for it and
exits with its status. `TRITONSERVER` overrides the binary.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


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


def _python_backend_config(args: list[str], key: str) -> str | None:
    """Value of `--backend-config=python,<key>=<value>` if the user gave one."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--backend-config=") else None
        if arg == "--backend-config" and i + 1 < len(args):
            value = args[i + 1]
        if value and value.startswith(f"python,{key}="):
            return value.split("=", 1)[1]
    return None


def interpreter_library_dir() -> str | None:
    """Where this interpreter's shared libpython lives (None for a statically linked interpreter)."""
    return sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None


def server_environment(bundle: ServerBundle, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
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
    """SIGKILL what is left of the server's session: Python-backend stubs whose own exit hung past the server's."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    # The server lives in its own session (terminal signals reach only the launcher, which forwards them once);
    # if the launcher is killed outright, the kernel sends the server SIGTERM so it still shuts down gracefully.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run(args: list[str]) -> int:
    bundle = find_bundle()
    own_shm_prefix = None
    if _python_backend_config(args, "shm-region-prefix-name") is None:
        own_shm_prefix = f"mimo_triton_{uuid.uuid4().hex[:12]}_"
    with tempfile.TemporaryDirectory(prefix="mimo-triton-backends-") as scratch:
        backend_dir = None
        if not _has_flag(args, "--backend-directory"):
            env_dir = os.environ.get("TRITON_BACKEND_DIR")
            backend_dir = Path(env_dir) if env_dir else build_backend_dir(bundle, Path(scratch))
        server = subprocess.Popen(
            server_command(bundle, args, backend_dir, own_shm_prefix),
            env=server_environment(bundle),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        def forward(signum, _frame):
            server.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            returncode = server.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if server.poll() is None:
                server.kill()
                server.wait()
            kill_process_group(server.pid)
            if own_shm_prefix is not None:
                removed = remove_shm_regions(own_shm_prefix)
                if removed:
                    print(f"tritonserver launcher: removed {len(removed)} leftover shared-memory regions", file=sys.stderr)
    # a server stopped by a signal reports it like a shell would
    return 128 - returncode if returncode < 0 else returncode


def main() -> int:
    try:
        return run(sys.argv[1:])
    except FileNotFoundError as error:
        print(f"tritonserver: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
