"""adstream peer job written with Quix Streams.

Reads `<prefix>ad-impressions` and `<prefix>ad-clicks` (Confluent-framed Avro),
joins every click to its impression by impression_id when
imp.event_time <= click.event_time <= imp.event_time + 30 min (event time),
and writes 1-minute tumbling windows per campaign_id (impressions, matched
clicks, CTR) as JSON to `<prefix>peer-campaign-ctr`.

Pipeline (one Quix Application, two stages):

  stage 1  impressions ─┐
                        ├─ concat ─ stateful apply (state keyed by impression_id:
  stage 1  clicks ──────┘           join + duplicate drop) ─ set_timestamp(event_time)
                                    ─ group_by(campaign_id)  [Quix repartition topic]
  stage 2  tumbling_window(60 s, grace 5 s).agg(Sum imp, Sum clk).final()
           ─ apply(ctr) ─ to_topic(<prefix>peer-campaign-ctr, JSON)

`run.py` drives it for the benchmark; `python job.py --prefix P` runs it
forever (Ctrl+C to stop), like a Quix user would deploy it.
"""

from __future__ import annotations

import warnings

# confluent-kafka's schema-registry extra imports authlib, which warns on
# import; irrelevant here (this job talks to the registry with urllib).
warnings.filterwarnings("ignore", message="The httpx module is deprecated")

import argparse
import ipaddress
import json
import os
import struct
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Optional

import fastavro
import quixstreams
import quixstreams.dataframe.windows.aggregations as agg
from quixstreams import Application
from quixstreams.models.serializers import Deserializer, JSONSerializer
from quixstreams.models.topics import TopicAdmin, TopicManager

CLICK_WINDOW_MS = 30 * 60 * 1000
WINDOW_MS = 60 * 1000
DEVICE_TYPES = frozenset(("desktop", "mobile", "tablet", "ctv", "other"))


# --------------------------------------------------------------------------
# Confluent-framed Avro: magic 0, 4-byte big-endian schema id, Avro body.
# The writer schema is fetched from the registry by id once and cached.
# --------------------------------------------------------------------------
class RegistrySchemas:
    def __init__(self, url: str):
        self._url = url.rstrip("/")
        self._cache: dict[int, Optional[tuple[str, Any]]] = {}

    def get(self, schema_id: int) -> Optional[tuple[str, Any]]:
        """(record full name, parsed schema), or None when the id is unknown."""
        try:
            return self._cache[schema_id]
        except KeyError:
            pass
        entry = None
        try:
            with urllib.request.urlopen(
                f"{self._url}/schemas/ids/{schema_id}", timeout=10
            ) as resp:
                body = json.load(resp)
            schema = json.loads(body["schema"])
            # Decode timestamp-millis as plain epoch-ms longs (no datetime
            # objects): the job only compares and buckets them.
            parsed = fastavro.parse_schema(_strip_logical_types(schema))
            name = schema.get("name", "")
            ns = schema.get("namespace")
            full = name if "." in name or not ns else f"{ns}.{name}"
            entry = (full, parsed)
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        except (ValueError, KeyError):
            entry = None
        self._cache[schema_id] = entry
        return entry


def _strip_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {
            k: _strip_logical_types(v) for k, v in schema.items() if k != "logicalType"
        }
    if isinstance(schema, list):
        return [_strip_logical_types(v) for v in schema]
    return schema


class ConfluentAvroDeserializer(Deserializer):
    """Decodes and validates one input topic's records.

    Never raises for bad input: an undecodable or invalid record becomes
    {"_invalid": "<reason>"} so that it is still seen (and counted) downstream,
    the way adstream routes such records to a dead-letter topic instead of
    stopping.
    """

    def __init__(self, schemas: RegistrySchemas, record_name: str, kind: str):
        super().__init__()
        self._schemas = schemas
        self._record_name = record_name
        self._kind = kind
        self._validate: Callable[[dict], Optional[str]] = (
            _validate_impression if kind == "imp" else _validate_click
        )

    def __call__(self, value: bytes, ctx) -> Any:
        if value is None or len(value) < 5 or value[0] != 0:
            return {"_invalid": "framing"}
        (schema_id,) = struct.unpack_from(">I", value, 1)
        entry = self._schemas.get(schema_id)
        if entry is None:
            return {"_invalid": "unknown schema id"}
        name, parsed = entry
        if name != self._record_name:
            return {"_invalid": f"wrong record {name}"}
        try:
            rec = fastavro.schemaless_reader(_Reader(value), parsed)
        except Exception as e:  # truncated / garbage body
            return {"_invalid": f"avro: {type(e).__name__}"}
        reason = self._validate(rec)
        if reason is not None:
            return {"_invalid": reason}
        rec["_k"] = self._kind
        return rec


class _Reader:
    """Minimal file-like view of value[5:] without copying it."""

    __slots__ = ("_mv", "_pos")

    def __init__(self, value: bytes):
        self._mv = memoryview(value)
        self._pos = 5

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        if n < 0:
            self._pos = len(self._mv)
        else:
            self._pos = min(len(self._mv), start + n)
        return self._mv[start : self._pos].tobytes()


def _valid_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _validate_impression(r: dict) -> Optional[str]:
    if not r["impression_id"] or not r["campaign_id"]:
        return "empty id"
    if r["cost_micros"] < 0:
        return "negative cost"
    if r["device_type"] not in DEVICE_TYPES:
        return "device_type"
    if not _valid_ip(r["user_ip"]):
        return "user_ip"
    return None


def _validate_click(r: dict) -> Optional[str]:
    if not r["click_id"] or not r["impression_id"]:
        return "empty id"
    if r["cost_micros"] < 0:
        return "negative cost"
    if not _valid_ip(r["user_ip"]):
        return "user_ip"
    return None


def _event_time_extractor(value, headers, timestamp, timestamp_type) -> int:
    # Event time drives Quix's windows and state; invalid records keep the
    # Kafka timestamp (they are dropped right after).
    if isinstance(value, dict) and "event_time" in value:
        return value["event_time"]
    return timestamp


# --------------------------------------------------------------------------
# The join, as a stateful function (state is scoped to the message key,
# i.e. impression_id, within its partition).
#
# state "imp"    -> [event_time, campaign_id]   (first copy wins; later = dup)
# state "clicks" -> {click_id: [event_time, matched]}  (seen click ids; clicks
#                   waiting for their impression have matched = False)
# --------------------------------------------------------------------------
class Stats:
    """Counters shared with run.py (single-threaded processing loop)."""

    def __init__(self) -> None:
        self.input = 0  # every record that reached stage 1 (incl. invalid)
        self.invalid = 0
        self.dup = 0
        self.impressions = 0
        self.clicks_matched = 0
        self.clicks_pending = 0  # stored waiting for an impression
        self.stage1_out = 0  # events handed to group_by
        self.stage2_in = 0  # events read back from the repartition topic
        self.late_in_window = 0  # dropped by the window as late
        self.windows_out = 0


def make_join(stats: Stats, on_input: Optional[Callable[[], None]] = None):
    def join(value: dict, state) -> list:
        stats.input += 1
        if on_input is not None:
            on_input()
        if not isinstance(value, dict) or "_invalid" in value:
            stats.invalid += 1
            return []
        if value["_k"] == "imp":
            if state.get("imp") is not None:
                stats.dup += 1
                return []
            t = value["event_time"]
            cmp = value["campaign_id"]
            state.set("imp", [t, cmp])
            stats.impressions += 1
            out = [{"campaign_id": cmp, "ts": t, "imp": 1, "clk": 0}]
            clicks = state.get("clicks")
            if clicks:
                changed = False
                for cid, c in clicks.items():
                    if not c[1] and t <= c[0] <= t + CLICK_WINDOW_MS:
                        c[1] = True
                        changed = True
                        stats.clicks_pending -= 1
                        stats.clicks_matched += 1
                        out.append({"campaign_id": cmp, "ts": c[0], "imp": 0, "clk": 1})
                if changed:
                    state.set("clicks", clicks)
            stats.stage1_out += len(out)
            return out
        # click
        clicks = state.get("clicks") or {}
        cid = value["click_id"]
        if cid in clicks:
            stats.dup += 1
            return []
        t = value["event_time"]
        imp = state.get("imp")
        if imp is not None and imp[0] <= t <= imp[0] + CLICK_WINDOW_MS:
            clicks[cid] = [t, True]
            state.set("clicks", clicks)
            stats.clicks_matched += 1
            stats.stage1_out += 1
            return [{"campaign_id": imp[1], "ts": t, "imp": 0, "clk": 1}]
        # Impression not (yet) seen, or outside the window: keep the click
        # (either side may arrive first). It may never match.
        clicks[cid] = [t, imp is not None]  # outside window: never matches
        if imp is None:
            stats.clicks_pending += 1
        state.set("clicks", clicks)
        return []

    return join


class TansuTopicManager(TopicManager):
    """tansu answers DescribeConfigs with no entries; Quix needs retention.ms
    (and reads retention.bytes) of the source topics to derive the configs of
    its changelog and repartition topics. Fill in Kafka's "unlimited" (-1)
    where the broker gives nothing; everything else is Quix's own logic."""

    def _configure_topic(self, topic, broker_topic):
        topic = super()._configure_topic(topic, broker_topic)
        cfg = topic.broker_config
        cfg.extra_config.setdefault("retention.ms", "-1")
        cfg.extra_config.setdefault("retention.bytes", "-1")
        topic.broker_config = cfg
        return topic


def build(
    prefix: str,
    bootstrap: str,
    registry_url: str,
    consumer_group: str,
    state_dir: str,
    grace_ms: int = 5000,
    closing_strategy: str = "key",
    use_changelog_topics: bool = True,
    stats: Optional[Stats] = None,
    on_input: Optional[Callable[[], None]] = None,
    on_stage2: Optional[Callable[[], None]] = None,
    loglevel: str = "WARNING",
    consumer_config: Optional[dict] = None,
):
    """Returns (app, stats, input topic names)."""
    stats = stats or Stats()
    producer_extra = {"partitioner": "murmur2_random"}
    topic_manager = TansuTopicManager(
        topic_admin=TopicAdmin(broker_address=bootstrap, extra_config=producer_extra),
        consumer_group=consumer_group,
    )
    app = Application(
        topic_manager=topic_manager,
        broker_address=bootstrap,
        consumer_group=consumer_group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        use_changelog_topics=use_changelog_topics,
        processing_guarantee="at-least-once",
        loglevel=loglevel,
        consumer_extra_config={
            # tansu: without this, group joins are slow.
            "session.timeout.ms": 6000,
            **(consumer_config or {}),
        },
        producer_extra_config=producer_extra,
    )
    schemas = RegistrySchemas(registry_url)
    t_imp = app.topic(
        f"{prefix}ad-impressions",
        key_deserializer="str",
        value_deserializer=ConfluentAvroDeserializer(
            schemas, "adstream.events.Impression", "imp"
        ),
        timestamp_extractor=_event_time_extractor,
    )
    t_clk = app.topic(
        f"{prefix}ad-clicks",
        key_deserializer="str",
        value_deserializer=ConfluentAvroDeserializer(
            schemas, "adstream.events.Click", "clk"
        ),
        timestamp_extractor=_event_time_extractor,
    )
    t_out = app.topic(
        f"{prefix}peer-campaign-ctr",
        key_serializer="str",
        value_serializer=JSONSerializer(),
    )

    imps = app.dataframe(t_imp)
    clks = app.dataframe(t_clk)
    sdf = imps.concat(clks)
    sdf = sdf.apply(make_join(stats, on_input), stateful=True, expand=True)
    sdf = sdf.set_timestamp(lambda value, key, ts, headers: value["ts"])
    sdf = sdf.group_by("campaign_id", name="campaign")

    def count_stage2(value):
        stats.stage2_in += 1
        if on_stage2 is not None:
            on_stage2()

    sdf = sdf.update(count_stage2)

    def on_late(value, key, timestamp_ms, late_by_ms, start, end, store_name, topic, partition, offset):
        stats.late_in_window += 1
        return False  # do not log every late record

    win = sdf.tumbling_window(
        duration_ms=WINDOW_MS, grace_ms=grace_ms, name="ctr", on_late=on_late
    ).agg(impressions=agg.Sum("imp"), clicks=agg.Sum("clk"))
    sdf = win.final(closing_strategy=closing_strategy)

    def to_ctr(w: dict, key, ts, headers) -> dict:
        stats.windows_out += 1
        imps_n = w["impressions"]
        return {
            "campaign_id": key,
            "window_start": w["start"],
            "window_end": w["end"],
            "impressions": imps_n,
            "clicks": w["clicks"],
            "ctr": (w["clicks"] / imps_n) if imps_n else None,
        }

    sdf = sdf.apply(to_ctr, metadata=True)
    sdf.to_topic(t_out)
    return app, stats, [t_imp.name, t_clk.name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default=os.environ.get("ADSTREAM_TOPIC_PREFIX", ""))
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--registry", default=os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081"))
    ap.add_argument("--group", default=None, help="consumer group (default: peer-quix-<prefix>)")
    ap.add_argument("--state-dir", default=os.path.expanduser("~/.cache/adstream/quix-state"))
    ap.add_argument("--grace-ms", type=int, default=5000)
    ap.add_argument("--closing-strategy", choices=["key", "partition"], default="key")
    ap.add_argument("--no-changelog", action="store_true")
    a = ap.parse_args()
    group = a.group or f"peer-quix-{a.prefix}{int(time.time())}"
    app, _, _ = build(
        a.prefix, a.bootstrap, a.registry, group, a.state_dir,
        grace_ms=a.grace_ms, closing_strategy=a.closing_strategy,
        use_changelog_topics=not a.no_changelog, loglevel="INFO",
    )
    app.run()


if __name__ == "__main__":
    main()
