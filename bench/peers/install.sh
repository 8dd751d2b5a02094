#!/usr/bin/env bash
# Creates (or updates) the venv of the Python peer benchmarks and installs the
# pinned packages of requirements.txt from PyPI. Idempotent: a second run only
# checks that the pins are satisfied.
#
#   bash bench/peers/install.sh            # venv at ~/.cache/adstream/venv-bench
#   VENV=/some/dir bash bench/peers/install.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${VENV:-$HOME/.cache/adstream/venv-bench}"
python="${PYTHON:-python3}"

if [[ ! -x $venv/bin/python ]]; then
  echo "creating venv $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi

stamp="$venv/.adstream-bench-requirements"
if [[ -f $stamp ]] && cmp -s "$stamp" "$here/requirements.txt" \
  && "$venv/bin/python" -c 'import quixstreams, confluent_kafka, fastavro' 2>/dev/null; then
  echo "venv $venv is up to date" >&2
  exit 0
fi

"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
"$venv/bin/python" -c 'import quixstreams, confluent_kafka, fastavro; print("quixstreams", quixstreams.__version__, "confluent-kafka", confluent_kafka.__version__, "fastavro", fastavro.__version__)' >&2
cp "$here/requirements.txt" "$stamp"
