#!/usr/bin/env bash
# Makes benchmarks/.venv-pydvl: pyDVL 0.7.1 (the peer the solver and influence benchmarks compare
# against) in its own venv, beside the same torch. pyDVL 0.7.1 still uses np.float_, which numpy 2
# removed: a sitecustomize in that venv restores the alias before anything imports pyDVL.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv-pydvl
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "pydvl[influence]==0.7.1"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat > "$site/sitecustomize.py" <<'PYEOF'
# pyDVL 0.7.1 uses np.float_, removed in numpy 2.
import numpy as np
if not hasattr(np, "float_"):
    np.float_ = np.float64
PYEOF
"$VENV/bin/python" -c 'import pydvl, pydvl.influence; print("pyDVL", pydvl.__version__)'
