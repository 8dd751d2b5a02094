"""Benchmark runner for the Quix Streams peer job (job.py).

Reads the end offsets of `<prefix>ad-impressions` and `<prefix>ad-clicks`
at start, runs the job from the beginning of the topics with a fresh consumer
group and a fresh local state directory, and stops once

  * every input partition has been consumed up to the end offset it had at
    start, and
  * every event the join handed to the repartition topic (group_by
    campaign_id) has been read back by the window stage,

or, as a fallback, after --idle-s seconds without progress. Then it prints ONE
JSON line to stdout; details go to stderr.

Timing: the clock and the CPU counters start when the first input record
reaches the job (so venv/imports, Application set-up, topic creation, the
consumer-group join and partition assignment are excluded) and stop when the
stop condition above is met (so the final checkpoint commit and shutdown are
excluded). Periodic checkpoints/commits during the run are included. CPU is
resource.getrusage(RUSAGE_SELF) + getrusage(RUSAGE_CHILDREN), user + system,
which covers librdkafka's and RocksDB's threads. `startup_s` and
`cpu_s_total` (whole process incl. start-up and shutdown) are given too.
"""

from __future__ import annotations

import warnings

# confluent-kafka's schema-registry extra imports authlib, which warns on
# import; irrelevant here (this job talks to the registry with urllib).
warnings.filterwarnings("ignore", message="The httpx module is deprecated")

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quixstreams  # noqa: E402
from confluent_kafka import Consumer, KafkaError, TopicPartition  # noqa: E402
from quixstreams import message_context  # noqa: E402

import job  # noqa: E402


def cpu_now() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], tuple[int, int]]:
    """(low, end) per partition, where end = last offset present + 1.

    tansu's ListOffsets(latest) ("high watermark") was observed BELOW the real
    end of the log (e.g. 62236 while records up to offset 63769 were
    readable), so the reported value is only a starting point: each partition
    is read forward from it until the broker returns nothing more.
    """
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"peer-offsets-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        md = c.list_topics(timeout=30)
        out = {}
        tps = []
        for t in topics:
            tmd = md.topics.get(t)
            if tmd is None or tmd.error is not None or not tmd.partitions:
                raise SystemExit(f"topic {t} not found (create and fill it first)")
            for p in sorted(tmd.partitions):
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=30)
                out[(t, p)] = (lo, hi)
                tps.append(TopicPartition(t, p, max(lo, hi - 1) if hi > lo else lo))
        c.assign(tps)
        open_tps = {(tp.topic, tp.partition) for tp in tps}
        deadline = time.time() + 60
        idle = 0
        while open_tps and time.time() < deadline and idle < 3:
            msgs = c.consume(10000, timeout=1.0)
            if not msgs:
                idle += 1
                continue
            idle = 0
            for m in msgs:
                k = (m.topic(), m.partition())
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        open_tps.discard(k)
                    continue
                lo, end = out[k]
                if m.offset() + 1 > end:
                    out[k] = (lo, m.offset() + 1)
        return out
    finally:
        c.close()


def count_output(bootstrap: str, topic: str, timeout_s: float = 20.0) -> int:
    """Counts the records in the output topic (for the stderr summary)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"peer-verify-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    try:
        md = c.list_topics(topic, timeout=30).topics.get(topic)
        if md is None or not md.partitions:
            return 0
        n = 0
        for p in md.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            n += hi - lo
        return n
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="Quix Streams peer benchmark run")
    ap.add_argument("--prefix", default=os.environ.get("ADSTREAM_TOPIC_PREFIX", ""))
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--registry", default=os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081"))
    ap.add_argument("--idle-s", type=float, default=20.0, help="stop after this long without progress")
    ap.add_argument("--grace-ms", type=int, default=5000, help="window grace (adstream: 5 s out-of-orderness)")
    ap.add_argument("--closing-strategy", choices=["key", "partition"], default="key")
    ap.add_argument("--no-changelog", action="store_true", help="disable Quix changelog topics (no fault tolerance)")
    ap.add_argument("-X", dest="consumer_config", action="append", default=[], metavar="KEY=VALUE",
                    help="extra librdkafka consumer setting for the job (repeatable)")
    ap.add_argument("--keep-state", action="store_true", help="keep the temporary state dir")
    a = ap.parse_args()

    t_proc0 = time.perf_counter()
    topics = [f"{a.prefix}ad-impressions", f"{a.prefix}ad-clicks"]
    offsets = end_offsets(a.bootstrap, topics)
    expected = sum(hi - lo for lo, hi in offsets.values())
    # Partitions still to finish: end offset > low watermark.
    pending = {tp: hi for tp, (lo, hi) in offsets.items() if hi > lo}
    state_dir = tempfile.mkdtemp(prefix="quix-state-")
    group = f"peer-quix-{uuid.uuid4().hex[:12]}"

    stats = job.Stats()
    mark = {
        "t0": None, "cpu0": None, "t_end": None, "cpu_end": None, "reason": None,
        "input_done": not pending, "t_input_done": None,
        "t_last": None, "cpu_last": None,
    }
    lock = threading.Lock()
    app_ref = {}

    def finish(reason: str, t: float, cpu: float) -> None:
        with lock:
            if mark["t_end"] is not None:
                return
            mark.update(t_end=t, cpu_end=cpu, reason=reason)
        app_ref["app"].stop()

    def on_input() -> None:
        if mark["t0"] is None:
            mark["t0"] = time.perf_counter()
            mark["cpu0"] = cpu_now()
        ctx = message_context()
        tp = (ctx.topic, ctx.partition)
        end = pending.get(tp)
        if end is not None and ctx.offset + 1 >= end:
            del pending[tp]
            if not pending:
                mark["input_done"] = True
                mark["t_input_done"] = time.perf_counter()

    def on_stage2() -> None:
        if mark["input_done"] and stats.stage2_in >= stats.stage1_out:
            finish("drained", time.perf_counter(), cpu_now())

    app, _, _ = job.build(
        a.prefix, a.bootstrap, a.registry, group, state_dir,
        grace_ms=a.grace_ms, closing_strategy=a.closing_strategy,
        use_changelog_topics=not a.no_changelog, stats=stats,
        on_input=on_input, on_stage2=on_stage2,
        consumer_config=dict(kv.split("=", 1) for kv in a.consumer_config),
    )
    app_ref["app"] = app

    # Watchdog: covers "the last input record produced nothing for stage 2"
    # and the idle fallback.
    stop_watch = threading.Event()

    def watchdog() -> None:
        last_progress = (-1, -1)
        last_change = time.perf_counter()
        while not stop_watch.wait(0.05):
            prog = (stats.input, stats.stage2_in)
            now = time.perf_counter()
            if prog != last_progress:
                last_progress, last_change = prog, now
                mark["t_last"], mark["cpu_last"] = now, cpu_now()
            if mark["t_end"] is not None:
                continue
            if mark["input_done"] and stats.stage2_in >= stats.stage1_out:
                finish("drained", now, cpu_now())
            elif mark["t0"] is not None and now - last_change > a.idle_s:
                # Measure up to the last progress, not the idle wait.
                finish("idle", mark["t_last"], mark["cpu_last"])
            elif mark["t0"] is None and now - t_proc0 > 120:
                finish("no input within 120 s", now, cpu_now())

    wd = threading.Thread(target=watchdog, daemon=True)
    wd.start()
    try:
        app.run()
    finally:
        stop_watch.set()
        wd.join()
        if not a.keep_state:
            shutil.rmtree(state_dir, ignore_errors=True)

    t0, cpu0 = mark["t0"], mark["cpu0"]
    if t0 is None:
        print(json.dumps({"peer": "quixstreams", "error": mark["reason"] or "no input"}))
        sys.exit(1)
    wall = mark["t_end"] - t0
    cpu = mark["cpu_end"] - cpu0
    out_records = count_output(a.bootstrap, f"{a.prefix}peer-campaign-ctr")
    detail = {
        "stop_reason": mark["reason"],
        "expected_input_records": expected,
        "input_records": stats.input,
        "invalid": stats.invalid,
        "duplicates_dropped": stats.dup,
        "impressions_counted_by_join": stats.impressions,
        "clicks_matched": stats.clicks_matched,
        "clicks_never_matched": stats.input - stats.invalid - stats.dup - stats.impressions - stats.clicks_matched,
        "events_to_repartition": stats.stage1_out,
        "events_read_back": stats.stage2_in,
        "late_dropped_by_window": stats.late_in_window,
        "windows_emitted": stats.windows_out,
        "output_topic_records": out_records,
        "input_done_after_s": (mark["t_input_done"] - t0) if mark["t_input_done"] else None,
        "state_dir": state_dir if a.keep_state else None,
        "consumer_group": group,
        "grace_ms": a.grace_ms,
        "closing_strategy": a.closing_strategy,
        "changelog_topics": not a.no_changelog,
        "consumer_config": a.consumer_config,
    }
    print(json.dumps(detail), file=sys.stderr)
    line = {
        "peer": "quixstreams",
        "version": quixstreams.__version__,
        "events": stats.input,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "events_per_s": round(stats.input / wall, 1) if wall > 0 else None,
        "events_per_cpu_s": round(stats.input / cpu, 1) if cpu > 0 else None,
        "startup_s": round(t0 - t_proc0, 3),
        "cpu_s_total": round(cpu_now(), 3),
        "stop_reason": mark["reason"],
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
