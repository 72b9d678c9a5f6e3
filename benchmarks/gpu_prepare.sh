#!/usr/bin/env bash
# Gather what benchmarks/bench_gpu.py needs on a GPU machine that has PyTorch and
# transformers but no network: lenskit's other import-time dependencies as wheels, and
# the embedded model's config and tokenizer (its shape; bench_gpu.py draws the weights).
#
# Usage: benchmarks/gpu_prepare.sh [DIR] [PYTHON_VERSION]   (default: .gpu 3.12)
# Then, on the GPU machine, in a copy of this repository with DIR beside it:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_gpu.py --shape-of DIR/shape --out gpu.json
set -euo pipefail
dir=${1:-.gpu}
py=${2:-3.12}
mkdir -p "$dir/whl" "$dir/shape"

# The versions installed here, so the GPU machine runs what the tests ran.
pins=$(python - <<'EOF'
from importlib.metadata import version
names = ["transformer-lens", "datasets", "dill", "multiprocess", "beartype", "fancy-einsum", "typeguard"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir/whl" $pins

python - "$dir/shape" <<'EOF'
import shutil, sys
from pathlib import Path

import lenskit
from lenskit.models import embedded_model_dir

src = embedded_model_dir()
if not (src / "config.json").is_file():
    lenskit.load_model()  # converts the embedded model once
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy2(src / name, Path(sys.argv[1]) / name)
EOF
du -sh "$dir"
