#!/usr/bin/env bash
# Makes benchmarks/.venv-models: timm and transformers (architectures twicediff's tests did not
# write, built with random weights, no download) for benchmarks/real_models_check.py. They are
# installed without their dependencies into a folder of their own beside the project's venv, whose
# torch they use: pinned to versions that import with torch 2.14.1, and never twicediff's
# dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
TARGET=.venv-models
"$PY" -m pip install -q --target "$TARGET" --no-deps --upgrade \
  timm==1.0.29 transformers==4.57.6 "tokenizers==0.22.1" huggingface_hub==0.36.0 safetensors torchvision==0.29.1 \
  pyyaml regex requests urllib3 idna certifi charset_normalizer tqdm filelock fsspec packaging
PYTHONPATH="$TARGET" "$PY" -c 'import timm, transformers; print("timm", timm.__version__, "transformers", transformers.__version__)'
