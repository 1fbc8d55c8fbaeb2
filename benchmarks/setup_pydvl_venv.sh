#!/usr/bin/env bash
# Makes benchmarks/.venv-pydvl: pyDVL 0.7.1 (the peer the solver and influence benchmarks compare
# against) in its own venv, beside the same torch. pyDVL 0.7.1 still uses np.float_, which numpy 2
# removed: a .pth file in that venv restores the alias before anything imports pyDVL.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv-pydvl
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "pydvl[influence]==0.7.1"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# A .pth line, not a sitecustomize.py: a base Python with its own sitecustomize (Debian's
# /usr/lib/python3.11/sitecustomize.py) comes first on sys.path and would shadow the venv's.
echo 'import numpy; numpy.float_ = getattr(numpy, "float64")' > "$site/pydvl_numpy_float_alias.pth"
"$VENV/bin/python" -c 'import pydvl, pydvl.influence; print("pyDVL", pydvl.__version__)'
