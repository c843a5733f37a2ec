#!/usr/bin/env bash
# Wheels for the GPU machine, downloaded here into .whl/ (ignored through git's info/exclude, never committed), and
# the one command line that installs them there and runs bench/gpu_check.py.
#
# That machine has Python 3.12, torch 2.11 and transformers 5.17 but no network, and lacks:
#   tyro 1.0.17 (every minpo script imports it), with docstring-parser and typeguard;
#   trl 1.16.0 (bench/vs_trl.py), with datasets and datasets' dill and multiprocess. datasets 4.8.5 is the newest
#   that still accepts the pyarrow >= 21 trl asks for and huggingface-hub < 2 (the machine has 1.33); 5.x wants
#   pyarrow >= 24, which the machine may not have.
# Everything else these need (accelerate, pandas, pyarrow, huggingface-hub, fsspec, xxhash, typing-extensions, rich,
# requests, httpx, ...) is in the machine's image. Installed with --no-deps, so nothing there is replaced.
# vLLM does not fit: vllm 0.32.0 is a wheel of several hundred MB with its own torch pin, and all that travels to
# the machine is limited to 64 MiB; gpu_check.py's eval row then runs eval.py with --backend hf.
#
#     bash bench/gpu_wheels.sh     # in the checkout the device tool sends (its root gets .whl/)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
    trl==1.16.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
)
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -rf .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

ls -l .whl
echo "wheels: $(du -sh .whl | cut -f1); with the working tree that travels beside them (64 MiB at most):"
(git ls-files -co --exclude-standard -z; find .whl -type f -print0) | du -ch --files0-from=- | tail -1
cat <<'EOF'

The device tool's run, with carry [".whl"] and timeout_s 560 (gpu_check.py stops starting steps after 470 s):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --output $OUT/gpu_check.md
EOF
