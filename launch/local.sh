#!/usr/bin/env bash
# Runs a kdjax experiment on this machine (the README's quick start).
#
#   bash launch/local.sh                      # Fashion-MNIST pipeline -> runs/fashion_mnist/report.md
#   bash launch/local.sh --config=configs/digits.py --workdir=runs/digits
#
# Installs what the job needs (Debian's Fashion-MNIST package and jemalloc when
# apt is available, kdjax itself with pip), then runs `python -m kdjax.main`
# under jemalloc when it is installed: glibc malloc page-faults large
# temporaries back in every step (benchmarks/README.md, "Allocator"); without
# jemalloc the run is the same, only slower.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each package only when it is missing (a machine may have one and not the other).
PACKAGES=()
[ -d /usr/share/datasets/fashion-mnist ] || PACKAGES+=(dataset-fashion-mnist)
ls /usr/lib/*/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 >/dev/null 2>&1 \
  || PACKAGES+=(libjemalloc2)
if [ "${#PACKAGES[@]}" -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${PACKAGES[@]}" \
    || echo "apt-get failed: point --config.data.source_dir at the idx files" >&2
fi
python -m pip install -q -e .

JEMALLOC="$(ls /usr/lib/*/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 2>/dev/null | head -n1 || true)"
if [ -n "$JEMALLOC" ]; then
  export LD_PRELOAD="$JEMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
  export MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1"
fi
# The quick start's defaults, unless the caller names their own.
DEFAULTS=()
[[ " $* " == *" --config="* ]] || DEFAULTS+=(--config=configs/fashion_mnist.py)
[[ " $* " == *" --workdir="* ]] || DEFAULTS+=(--workdir=runs/fashion_mnist)
exec python -m kdjax.main "${DEFAULTS[@]}" "$@"
