#!/usr/bin/env bash
# Entry point of `make bench`: makes sure what a run needs is installed, then runs it from the repo root,
# passing any further arguments through (see `bench/README.md`).
#
#   bash bench/run.sh [options]          the benchmark: python -m bench (needs nginx)
#   bash bench/run.sh sweep [options]    the saturation sweep: python -m bench.sweep (nginx, matplotlib)
#   bash bench/run.sh soak [options]     the gateway soak: python -m bench.soak (matplotlib)
set -euo pipefail
cd "$(dirname "$0")/.."

module=bench
case "${1:-}" in
    sweep | soak)
        module="bench.$1"
        shift
        ;;
esac

# nginx is the reference relay; the soak runs the gateway alone.
# Debian installs nginx in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/usr/local/sbin"
if [ "$module" != bench.soak ] && ! command -v nginx >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx
fi

# The sweep and the soak draw charts; matplotlib stays out of the runtime and test requirements.
if [ "$module" != bench ] && ! .venv/bin/python -c "import matplotlib" >/dev/null 2>&1; then
    .venv/bin/pip install --quiet -r requirements-bench.txt
fi

exec .venv/bin/python -m "$module" "$@"
