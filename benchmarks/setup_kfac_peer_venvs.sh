#!/usr/bin/env bash
# Makes the two peer venvs of kfac_peers_cpu.py, each beside the same torch as the project's:
# benchmarks/.venv-kronfluence (Kronfluence 1.0.1) and benchmarks/.venv-pydvl010 (pyDVL 0.10.0's
# EkfacInfluence). Neither package is a dependency of twicediff; the runners
# (kronfluence_runner.py, pydvl010_ekfac_runner.py) import no twicediff.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH="torch==${TORCH_VERSION:-2.14.1}"
[ -x .venv-kronfluence/bin/python ] || "$PY" -m venv .venv-kronfluence
.venv-kronfluence/bin/python -m pip install -q "$TORCH" "kronfluence==1.0.1"
.venv-kronfluence/bin/python -c 'import kronfluence; print("kronfluence", kronfluence.__version__)'
[ -x .venv-pydvl010/bin/python ] || "$PY" -m venv .venv-pydvl010
.venv-pydvl010/bin/python -m pip install -q "$TORCH" "pydvl[influence]==0.10.0"
.venv-pydvl010/bin/python -c 'import pydvl; from pydvl.influence.torch import EkfacInfluence; print("pyDVL", pydvl.__version__)'
