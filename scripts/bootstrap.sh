#!/usr/bin/env bash
# Installs the system packages the Rust build needs when they are missing:
# cmake, a C/C++ compiler, pkg-config and libcurl headers for librdkafka
# (rdkafka's cmake-build), python3-venv for the tool venvs, iproute2's ss
# (the fault test drops broker connections with ss -K).
# Uses apt-get on Debian/Ubuntu; elsewhere it only says what is missing.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[[ -e /usr/include/x86_64-linux-gnu/curl/curl.h || -e /usr/include/curl/curl.h || -e /usr/include/aarch64-linux-gnu/curl/curl.h ]] \
  || missing+=(libcurl4-openssl-dev)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)

if ((${#missing[@]})); then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "bootstrap: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
    $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bootstrap: please install: ${missing[*]}" >&2
    exit 1
  fi
fi
# A cold build plus the test stack's data take a few GB; say so up front
# rather than let the linker fail with "No space left on device".
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
free_kb=$(df -Pk "$here" 2>/dev/null | awk 'NR == 2 { print $4 }')
if [[ -n ${free_kb:-} && $free_kb -lt $((6 * 1024 * 1024)) ]]; then
  echo "bootstrap: warning: only $((free_kb / 1024)) MB free under $here; a cold build and test run need about 6 GB" >&2
fi
command -v cargo >/dev/null 2>&1 || { echo "bootstrap: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

# Python tools for the repo's own checks (PyYAML for scripts/check_compose.py).
cache=${ADSTREAM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/adstream}
venv=$cache/venv-tools
if ! "$venv/bin/python" -c 'import yaml' >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q pyyaml
fi
echo "$venv/bin/python"
