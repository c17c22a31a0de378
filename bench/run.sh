#!/usr/bin/env bash
# Entry point of `make bench`: makes sure nginx (the reference relay) is installed, then runs the benchmark
# from the repo root, passing any arguments through (see `bench/README.md`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian installs nginx in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/usr/local/sbin"
if ! command -v nginx >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx
fi

exec .venv/bin/python -m bench "$@"
