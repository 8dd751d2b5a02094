#!/usr/bin/env bash
# Runs a command with the local stack up and its addresses exported.
# Starts the stack only if it is not already fully running, and then stops
# it again afterwards (whatever the command's outcome); a stack that was
# already up is left up.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
started=0
if ! "$here/stack.sh" status >/dev/null 2>&1; then
  "$here/stack.sh" up
  started=1
fi
cleanup() { [[ $started -eq 1 ]] && "$here/stack.sh" down || true; }
trap cleanup EXIT
eval "$("$here/stack.sh" env)"
"$@"
