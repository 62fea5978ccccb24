#!/usr/bin/env bash
# NIXL for the lent GPU machines, which have no registry: `nixl-cu13` for their Python 3.12, reduced to what the
# transfer API loads, as .nixl/nixl_cu13.txz (about 8 MB: small enough to travel beside .whl in one call, whose copy
# is capped at 64 MiB). Kept: the Python package, the UCX plugin and UCX's transports, and every shared object
# they need (their ELF NEEDED closure); dropped: nixl_ep, the storage / object-store plugins and the libraries only
# they need, telemetry exporters, headers, tools; shared objects stripped. On the GPU machine, unpack it into the
# interpreter's own site-packages, where Triton's Python-backend stub finds it (benchmarks/device_cycle.sh nixl):
#   tar xJf .nixl/nixl_cu13.txz -C "$(python3 -c 'import site; print(site.getsitepackages()[0])')"
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.5.1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d "$work" "nixl-cu13==$VERSION" 2>&1 | grep -v "is ignored" || true
mkdir -p "$work/x" .nixl
(cd "$work/x" && unzip -q "$work"/nixl_cu13-*.whl && rm -rf nixl_ep_cu13 nixl_cu13-*.data nixl_cu13.scripts)
.venv/bin/python - "$work/x" <<'PY'
import os, subprocess, sys

os.chdir(sys.argv[1])
objects = [os.path.join(d, f)[2:] for d, _, files in os.walk(".") for f in files if ".so" in f]
needed = {path: [line.split("[")[1].rstrip("]") for line in subprocess.run(
    ["readelf", "-d", path], capture_output=True, text=True, check=True).stdout.splitlines() if "(NEEDED)" in line]
    for path in objects}  # fmt: skip
by_name = {os.path.basename(path): path for path in objects}
roots = [p for p in objects if p.startswith("nixl_cu13/") or "/ucx/" in p or p.endswith("/libplugin_UCX.so")]
kept, todo = set(), roots
while todo:
    path = todo.pop()
    if path not in kept:
        kept.add(path)
        todo += [by_name[name] for name in needed[path] if name in by_name]
dropped = sorted(set(objects) - kept)
print(f"kept {len(kept)} shared objects, dropped {len(dropped)} ({sum(map(os.path.getsize, dropped)) / 1e6:.1f} MB)")
for path in dropped:
    os.remove(path)
PY
find "$work/x" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
tar cf - -C "$work/x" . | xz -T0 -9 > .nixl/nixl_cu13.txz
rm -f .nixl/nixl_cu13.zip
ls -la .nixl/nixl_cu13.txz
