#!/usr/bin/env bash
# Creates every topic of CONTRACT.md plus the processor's internal topics,
# idempotently, against any Kafka-protocol broker ($KAFKA_BOOTSTRAP_SERVERS).
#
#   ./topics.sh [PARTITIONS] [REPLICATION_FACTOR]      default 6 1
#   ./topics.sh --partitions 6 --replication-factor 3  (flags go to adstream-admin)
#
# Needs no Java: it runs adstream-admin (librdkafka's AdminClient), taken from
# PATH, else from target/release or target/debug, else built with cargo.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

args=()
if [[ $# -ge 1 && $1 =~ ^[0-9]+$ ]]; then
  args+=(--partitions "$1"); shift
  if [[ $# -ge 1 && $1 =~ ^[0-9]+$ ]]; then args+=(--replication-factor "$1"); shift; fi
fi
args+=("$@")

if command -v adstream-admin >/dev/null 2>&1; then
  admin=adstream-admin
elif [[ -x $here/target/release/adstream-admin ]]; then
  admin=$here/target/release/adstream-admin
elif [[ -x $here/target/debug/adstream-admin ]]; then
  admin=$here/target/debug/adstream-admin
else
  (cd "$here" && cargo build --release -q -p adstream-admin)
  admin=$here/target/release/adstream-admin
fi
exec "$admin" create-topics "${args[@]}"
