#!/usr/bin/env bash
# The package as users install it: build the wheel from a clean copy of the tree, install it
# (not editable) into a fresh virtual environment, and run `cnnft-train debug=fast` and
# `cnnft-analyze` on a tiny checkpoint of that run from a directory outside the repository, so
# that only the installed package (its configs in cnnft/conf, the analyses plugins) is used.
#
# The fresh venv takes its dependencies (torch's CUDA build alone is 5.5 GB) from the repository's
# venv that `make setup` made, through a .pth line, instead of installing a second copy: pip still
# resolves the wheel's declared dependencies against them, and cnnft itself comes only from the
# wheel (the editable install's path hooks are not read from a directory a .pth line adds).
#
#   .ci/wheel_check.sh [WORKDIR]     (default: a new temporary directory, removed at the end)
#   DEPS_VENV=path                   the venv whose packages are shared (default: REPO/.venv)
#   FRESH_DEPS=1                     install torch and every dependency into the fresh venv instead
#                                    (by hand; needs about 6 GB of disk)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
if [ $# -ge 1 ]; then WORK=$1; else
    WORK=$(mktemp -d -t cnnft-wheel.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT   # a temporary directory of our own: leave no venv behind
fi
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
DEPS_VENV=${DEPS_VENV:-$REPO/.venv}
case "$WORK/" in "$REPO"/*) echo "wheel_check: WORKDIR $WORK must lie outside $REPO" >&2; exit 2 ;; esac
unset PYTHONPATH
began=$SECONDS
step() { echo "== wheel_check [$((SECONDS - began)) s] $*"; }

step "clean copy of the tree in $WORK"
rm -rf "$WORK/src" "$WORK/dist" "$WORK/run"
mkdir -p "$WORK/src" "$WORK/run"
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/cnnft" "$REPO/analyses" "$REPO/conf" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
BIN=$WORK/venv/bin
step "a fresh venv"
rm -rf "$WORK/venv"
"$PY" -m venv "$WORK/venv"
if [ "${FRESH_DEPS:-0}" = 1 ]; then
    "$BIN/pip" install -q --upgrade pip
    step "torch first, pinned as in the Makefile"
    "$BIN/pip" install -q torch==2.14.1 torchvision==0.29.1
else
    [ -x "$DEPS_VENV/bin/python" ] || { echo "wheel_check: no venv at DEPS_VENV=$DEPS_VENV (run make setup, or FRESH_DEPS=1)" >&2; exit 2; }
    deps=$("$DEPS_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    own=$("$BIN/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    step "dependencies shared from $deps"
    echo "$deps" > "$own/_cnnft_wheel_check_deps.pth"
fi
step "build the wheel and install it"
"$BIN/pip" wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
"$BIN/pip" install -q "$WORK"/dist/cnnft-*.whl
rm -rf "$WORK/src"   # nothing but the installed package from here on

cd "$WORK/run"
"$BIN/python" - <<'EOF'
import pathlib, sys, sysconfig, analyses, cnnft, cnnft.train
own = pathlib.Path(sysconfig.get_paths()["purelib"])
for mod in (cnnft, analyses):
    assert own in pathlib.Path(mod.__file__).parents, f"{mod.__name__} imported from {mod.__file__}, not the wheel in {own}"
conf = pathlib.Path(cnnft.train.CONF_DIR)
assert conf == pathlib.Path(cnnft.__file__).parent / "conf" and (conf / "stage" / "finetune.yaml").is_file(), conf
print("installed:", cnnft.__file__, "configs:", conf)
EOF
TINY=(paths.data_dir="$WORK/run/data" data.num_workers=0 logger=csv
      data.demo_spec.imagenet_classes=5 data.demo_spec.imagenet_train_per_class=8
      data.demo_spec.imagenet_val_per_class=2 data.demo_spec.voc_trainval=24 data.demo_spec.voc_test=24
      "data.demo_spec.imagenet_size=[80,80]" "data.demo_spec.voc_size_range=[[90,120],[80,100]]"
      model.width=0.125 model.input_size=67 model.resize=76 model.context_pad=5)
step "cnnft-train debug=fast"
"$BIN/cnnft-train" debug=fast "${TINY[@]}" hydra.run.dir=train
test -f train/checkpoints/last.ckpt
step "cnnft-analyze on its checkpoint"
"$BIN/cnnft-analyze" checkpoint=train/checkpoints/last.ckpt "analyses=[probe_cls]" "layers=[pool5]" \
    "probe.c_grid=[0.1,1.0]" probe.folds=2 batch_size=16 progress=false "${TINY[@]}" hydra.run.dir=analyze
test -f analyze/results/probe_cls.json
"$BIN/python" -c "import json; rows = json.load(open('analyze/results/probe_cls.json')); \
print('probe_cls rows:', len(rows) if isinstance(rows, list) else rows.keys())"
step "passed"
