#!/usr/bin/env bash
# NIXL for the lent GPU machines, which have no registry: `nixl-cu13` for their Python 3.12 without what the
# transfer API does not load (nixl_ep, the storage/NIC plugins other than UCX, UCX's perftest, headers and tools:
# 58.8 MB -> about a third), as .nixl/nixl_cu13.zip. Too large to travel beside .whl in one call (the copy is capped
# at 64 MiB), so a second call carries it while the machine is warm (.whl stays there) and unpacks it into the
# interpreter's own site-packages, where Triton's Python-backend stub finds it:
#   python3 -c "import site, zipfile; zipfile.ZipFile('.nixl/nixl_cu13.zip').extractall(site.getsitepackages()[0])"
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.5.1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d "$work" "nixl-cu13==$VERSION" 2>&1 | grep -v "is ignored" || true
mkdir -p .nixl
.venv/bin/python - "$work"/nixl_cu13-*.whl .nixl/nixl_cu13.zip <<'PY'
import re, sys, zipfile

DROP = re.compile(r"^(nixl_ep_cu13/|nixl_cu13-[^/]*\.data/|nixl_cu13\.scripts/|nixl_cu13\.libs/ucx/libucx_perftest"
                  r"|(nixl_cu13\.libs/nixl|\.nixl_cu13\.mesonpy\.libs/plugins)/libplugin_(?!UCX)[^/]*$)")
source, target = sys.argv[1:]
kept = dropped = 0
with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
    for info in wheel.infolist():
        if DROP.match(info.filename):
            dropped += info.compress_size
            continue
        kept += info.compress_size
        out.writestr(info, wheel.read(info))
print(f"{target}: kept {kept / 1e6:.1f} MB of the wheel, dropped {dropped / 1e6:.1f} MB")
PY
ls -la .nixl/nixl_cu13.zip
