#!/usr/bin/env python3
"""Independent correctness oracle for adstream.

Recomputes, from a producer recording (``adstream-producer --record FILE``,
JSON lines in send order), what the stream processor must output according to
/work/shared/CONTRACT.md: validation, per-partition watermarks, lateness,
duplicates, the impression->click->conversion join, unmatched/pending records
and the tumbling-window aggregates at the two grains (ad_metrics and
campaign_ctr).

Python 3.11 standard library only.  Written without looking at the engine.
See oracle/README.md for the exact rules.

Usage:
    python3 oracle/oracle.py RECORDING --out OUT.json [--max-out-of-orderness MS]
        [--allowed-lateness MS] [--click-window MS] [--conversion-window MS]
        [--window MS] [--emit-all]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import dataclass, asdict
from typing import Iterable, Iterator

TOPIC_IMP = "ad-impressions"
TOPIC_CLICK = "ad-clicks"
TOPIC_CONV = "ad-conversions"
TOPICS = (TOPIC_IMP, TOPIC_CLICK, TOPIC_CONV)
TYPE_FOR_TOPIC = {TOPIC_IMP: "impression", TOPIC_CLICK: "click", TOPIC_CONV: "conversion"}
DEVICE_TYPES = frozenset({"desktop", "mobile", "tablet", "ctv", "other"})

CATEGORIES = ("counted", "late", "duplicate", "unmatched", "pending", "dead_letter")

AD_GRAIN = ("campaign_id", "ad_id", "search_keyword", "state", "ip_range", "device_type")

# Positions (topic, partition, offset) are packed into one int to save memory:
# topic index in bits 56.., partition in bits 36..55, offset in bits 0..35.
_OFF_BITS = 36
_PART_BITS = 20


@dataclass(frozen=True)
class Params:
    max_out_of_orderness: int = 5000
    allowed_lateness: int = 0
    click_window: int = 1_800_000
    conversion_window: int = 86_400_000
    window: int = 60_000


class OracleError(Exception):
    """Malformed recording (not a JSON object line, missing topic/partition...)."""


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------

_ip_cache: dict[str, str | None] = {}
_IP_CACHE_MAX = 1_000_000


def ip_range_of(ip) -> str | None:
    """Return the /24 (IPv4) or /48 (IPv6) network text of ``ip``, or None if
    ``ip`` is not a valid IP address string (scoped '%' addresses rejected)."""
    if not isinstance(ip, str):
        return None
    r = _ip_cache.get(ip, 0)
    if r != 0:
        return r  # type: ignore[return-value]
    r = None
    if "%" not in ip:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            addr = None
        if addr is not None:
            n = 24 if addr.version == 4 else 48
            r = str(ipaddress.ip_network(f"{ip}/{n}", strict=False))
    if len(_ip_cache) >= _IP_CACHE_MAX:
        _ip_cache.clear()
    _ip_cache[ip] = r
    return r


def _nonempty_str(v) -> bool:
    return isinstance(v, str) and v != ""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(rec: dict) -> tuple[str | None, dict | None]:
    """Return (reason, value): reason is None for a valid record."""
    topic = rec.get("topic")
    typ = rec.get("type")
    if typ == "raw":
        return "undecodable", None
    if typ not in ("impression", "click", "conversion"):
        return f"unknown type {typ!r}", None
    if TYPE_FOR_TOPIC.get(topic) != typ:
        return f"type {typ} on topic {topic}", None
    v = rec.get("value")
    if not isinstance(v, dict):
        return "missing value", None
    et = v.get("event_time")
    if not _int(et) or et <= 0:
        return "event_time", None
    if typ == "impression":
        for f in ("impression_id", "campaign_id", "ad_id"):
            if not _nonempty_str(v.get(f)):
                return f"empty {f}", None
        for f in ("search_keyword", "state"):
            if not isinstance(v.get(f), str):
                return f"missing {f}", None
        c = v.get("cost_micros")
        if not _int(c) or c < 0:
            return "cost_micros", None
        if ip_range_of(v.get("user_ip")) is None:
            return "user_ip", None
        if v.get("device_type") not in DEVICE_TYPES:
            return "device_type", None
    elif typ == "click":
        for f in ("click_id", "impression_id"):
            if not _nonempty_str(v.get(f)):
                return f"empty {f}", None
        c = v.get("cost_micros")
        if not _int(c) or c < 0:
            return "cost_micros", None
        if ip_range_of(v.get("user_ip")) is None:
            return "user_ip", None
    else:
        for f in ("conversion_id", "click_id", "impression_id"):
            if not _nonempty_str(v.get(f)):
                return f"empty {f}", None
        r = v.get("revenue_micros")
        if not _int(r) or r < 0:
            return "revenue_micros", None
    if rec.get("key") != v["impression_id"]:
        return "key != impression_id", None
    return None, v


# --------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------

def read_lines(path: str) -> Iterator[dict]:
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise OracleError(f"line {n}: not JSON: {e}") from None
            if not isinstance(rec, dict):
                raise OracleError(f"line {n}: not a JSON object")
            yield rec


class LazyRows:
    """Rows of one grain, produced on demand in grain order (so that a large
    result can be written without materialising every row as a dict)."""

    def __init__(self, acc: dict, keys_of: tuple, W, params: Params, emitted: bool,
                 key_of=None):
        self.acc, self.keys_of, self.W, self.params = acc, keys_of, W, params
        self.emitted = emitted
        self.key_of = key_of or (lambda k: k)  # accumulator key -> (ws, *dims)

    def _is_emitted(self, ws: int) -> bool:
        W = self.W
        return W is not None and ws + self.params.window + self.params.allowed_lateness <= W

    def __len__(self) -> int:
        key_of, want = self.key_of, self.emitted
        return sum(1 for k in self.acc if self._is_emitted(key_of(k)[0]) == want)

    def __iter__(self) -> Iterator[dict]:
        size = self.params.window
        keys_of = self.keys_of
        for key in sorted(self.acc):
            flat = self.key_of(key)
            ws = flat[0]
            we = ws + size
            if self._is_emitted(ws) != self.emitted:
                continue
            i, c, v, cost, rev = self.acc[key]
            row = {"window_start": ws, "window_end": we}
            row.update(zip(keys_of, flat[1:]))
            row.update(
                impressions=i,
                clicks=c,
                conversions=v,
                cost_micros=cost,
                revenue_micros=rev,
                ctr=(c / i) if i else None,
                conversion_rate=(v / c) if c else None,
            )
            yield row


def materialise(obj):
    """Replace every LazyRows inside ``obj`` (dicts) by a list."""
    if isinstance(obj, LazyRows):
        return list(obj)
    if isinstance(obj, dict):
        return {k: materialise(v) for k, v in obj.items()}
    return obj


def write_json(obj, f) -> None:
    """json.dump that streams LazyRows element by element."""
    if isinstance(obj, LazyRows):
        f.write("[")
        first = True
        for row in obj:
            if not first:
                f.write(",")
            first = False
            f.write(json.dumps(row, separators=(",", ":")))
        f.write("]")
    elif isinstance(obj, dict) and any(isinstance(v, (LazyRows, dict)) for v in obj.values()):
        f.write("{")
        for i, (k, v) in enumerate(obj.items()):
            if i:
                f.write(",")
            f.write(json.dumps(k) + ":")
            write_json(v, f)
        f.write("}")
    else:
        f.write(json.dumps(obj, separators=(",", ":")))


def run(records: Iterable[dict], params: Params = Params(), emit_all: bool = False,
        lazy: bool = False) -> dict:
    """Compute the oracle result for an iterable of recording lines (dicts).

    With ``lazy`` the row lists are LazyRows objects (write them with
    write_json); otherwise plain lists."""
    MOOO = params.max_out_of_orderness
    L = params.allowed_lateness
    CW = params.click_window
    VW = params.conversion_window
    WIN = params.window

    topic_names: list[str] = list(TOPICS)
    topic_idx: dict[str, int] = {t: i for i, t in enumerate(topic_names)}

    next_offset: dict[tuple[str, int], int] = {}
    pmax: dict[tuple[str, int], int] = {}  # max valid event_time per partition

    n_input: dict[str, int] = {}
    dead: list[int] = []
    dead_reasons: dict[str, int] = {}
    late: list[int] = []
    dups: list[int] = []
    cross_partition_dups = 0

    # kept records
    imps: dict[str, tuple] = {}    # impression_id -> (event_time, dims, partition)
    clicks: dict[str, tuple] = {}  # click_id -> (impression_id, event_time, cost, pos)
    convs: dict[str, tuple] = {}   # conversion_id -> (click_id, impression_id, event_time, revenue, pos)

    # window accumulators: (window_start, dims) -> [imps, clicks, convs, cost, rev]
    acc: dict[tuple, list] = {}

    intern = sys.intern

    for rec in records:
        topic = rec.get("topic")
        partition = rec.get("partition")
        if not isinstance(topic, str) or not _int(partition) or partition < 0:
            raise OracleError(f"record without topic/partition: {rec!r:.200}")
        tp = (topic, partition)
        off = next_offset.get(tp, 0)
        next_offset[tp] = off + 1
        n_input[topic] = n_input.get(topic, 0) + 1
        ti = topic_idx.get(topic)
        if ti is None:
            ti = topic_idx[topic] = len(topic_names)
            topic_names.append(topic)
        if partition >= (1 << _PART_BITS) or off >= (1 << _OFF_BITS):
            raise OracleError("partition/offset too large")
        pos = (ti << (_OFF_BITS + _PART_BITS)) | (partition << _OFF_BITS) | off

        reason, v = validate(rec)
        if reason is not None:
            dead.append(pos)
            dead_reasons[reason] = dead_reasons.get(reason, 0) + 1
            continue

        t = v["event_time"]
        m = pmax.get(tp)
        if m is None or t > m:
            pmax[tp] = t
        if m is not None and t < m - MOOO - L:
            late.append(pos)
            continue

        typ = rec["type"]
        if typ == "impression":
            iid = v["impression_id"]
            prev = imps.get(iid)
            if prev is not None:
                dups.append(pos)
                if prev[2] != partition:
                    cross_partition_dups += 1
                continue
            dims = (
                intern(v["campaign_id"]),
                intern(v["ad_id"]),
                intern(v["search_keyword"]),
                intern(v["state"]),
                ip_range_of(v["user_ip"]),
                intern(v["device_type"]),
            )
            imps[iid] = (t, dims, partition)
            k = (t - t % WIN, dims)
            a = acc.get(k)
            if a is None:
                acc[k] = [1, 0, 0, v["cost_micros"], 0]
            else:
                a[0] += 1
                a[3] += v["cost_micros"]
        elif typ == "click":
            cid = v["click_id"]
            prev = clicks.get(cid)
            if prev is not None:
                dups.append(pos)
                if (prev[3] >> _OFF_BITS) & ((1 << _PART_BITS) - 1) != partition:
                    cross_partition_dups += 1
                continue
            clicks[cid] = (v["impression_id"], t, v["cost_micros"], pos)
        else:
            vid = v["conversion_id"]
            prev = convs.get(vid)
            if prev is not None:
                dups.append(pos)
                if (prev[4] >> _OFF_BITS) & ((1 << _PART_BITS) - 1) != partition:
                    cross_partition_dups += 1
                continue
            convs[vid] = (v["click_id"], v["impression_id"], t, v["revenue_micros"], pos)

    # ---- final watermark
    W = None
    for m in pmax.values():
        pwm = m - MOOO
        if W is None or pwm > W:
            W = pwm

    def is_unmatched(t: int) -> bool:
        return W is not None and W > t + L

    unmatched: list[int] = []
    pending: list[int] = []
    not_matched_reasons: dict[str, int] = {}

    def note(reason: str) -> None:
        not_matched_reasons[reason] = not_matched_reasons.get(reason, 0) + 1

    # ---- join clicks
    matched_clicks: dict[str, tuple] = {}  # click_id -> (event_time, dims, impression_id)
    for cid, (iid, t, cost, pos) in clicks.items():
        imp = imps.get(iid)
        if imp is not None and imp[0] <= t <= imp[0] + CW:
            dims = imp[1]
            matched_clicks[cid] = (t, dims, iid)
            k = (t - t % WIN, dims)
            a = acc.get(k)
            if a is None:
                acc[k] = [0, 1, 0, cost, 0]
            else:
                a[1] += 1
                a[3] += cost
        else:
            note("click: no impression" if imp is None else "click: outside click window")
            (unmatched if is_unmatched(t) else pending).append(pos)

    # ---- join conversions
    conv_imp_mismatch = 0
    n_conv_matched = 0
    for vid, (cid, iid, t, rev, pos) in convs.items():
        mc = matched_clicks.get(cid)
        if mc is not None and mc[0] <= t <= mc[0] + VW:
            n_conv_matched += 1
            if mc[2] != iid:
                conv_imp_mismatch += 1
            dims = mc[1]
            k = (t - t % WIN, dims)
            a = acc.get(k)
            if a is None:
                acc[k] = [0, 0, 1, 0, rev]
            else:
                a[2] += 1
                a[4] += rev
        else:
            if mc is not None:
                note("conversion: outside conversion window")
            elif cid in clicks:
                note("conversion: click unmatched")
            else:
                note("conversion: no click")
            (unmatched if is_unmatched(t) else pending).append(pos)

    # ---- accounting (computed per topic from independent structures)
    def topic_of(pos: int) -> str:
        return topic_names[pos >> (_OFF_BITS + _PART_BITS)]

    counts_by_topic: dict[str, dict[str, int]] = {}
    for t_name in topic_names:
        if t_name in TOPICS or n_input.get(t_name):
            counts_by_topic[t_name] = {c: 0 for c in CATEGORIES} | {"input": n_input.get(t_name, 0)}
    counts_by_topic[TOPIC_IMP]["counted"] += len(imps)
    counts_by_topic[TOPIC_CLICK]["counted"] += len(matched_clicks)
    counts_by_topic[TOPIC_CONV]["counted"] += n_conv_matched
    for cat, lst in (("late", late), ("duplicate", dups), ("unmatched", unmatched),
                     ("pending", pending), ("dead_letter", dead)):
        for p in lst:
            counts_by_topic[topic_of(p)][cat] += 1
    counts = {c: 0 for c in CATEGORIES} | {"input": 0}
    for ct in counts_by_topic.values():
        s = sum(ct[c] for c in CATEGORIES)
        assert s == ct["input"], f"accounting broken: {ct}"
        for k in counts:
            counts[k] += ct[k]
    assert sum(counts[c] for c in CATEGORIES) == counts["input"], counts
    # every kept click/conversion is exactly one of matched/unmatched/pending
    assert len(matched_clicks) + n_conv_matched + len(unmatched) + len(pending) == len(clicks) + len(convs)

    # ---- rows
    del imps, clicks, convs, matched_clicks
    ctr_acc: dict[tuple, list] = {}
    for (ws, dims), a in acc.items():
        k = (ws, dims[0])
        b = ctr_acc.get(k)
        if b is None:
            ctr_acc[k] = list(a)
        else:
            for i in range(5):
                b[i] += a[i]

    def ad_key(k: tuple) -> tuple:
        return (k[0],) + k[1]

    def unpack(p: int) -> list:
        return [topic_names[p >> (_OFF_BITS + _PART_BITS)],
                (p >> _OFF_BITS) & ((1 << _PART_BITS) - 1),
                p & ((1 << _OFF_BITS) - 1)]

    def pos_list(lst: list[int]) -> list[list]:
        return sorted(unpack(p) for p in lst)

    result = {
        "params": asdict(params),
        "final_watermark": W,
        "counts": counts,
        "counts_by_topic": counts_by_topic,
        "ad_metrics": LazyRows(acc, AD_GRAIN, W, params, True, ad_key),
        "campaign_ctr": LazyRows(ctr_acc, ("campaign_id",), W, params, True),
        "side_outputs": {
            "late": pos_list(late),
            "unmatched": pos_list(unmatched),
            "dead_letter": pos_list(dead),
        },
        "duplicates": pos_list(dups),
        "pending": pos_list(pending),
        "partition_watermarks": sorted([tp[0], tp[1], m - MOOO] for tp, m in pmax.items()),
        "diagnostics": {
            "dead_letter_reasons": dict(sorted(dead_reasons.items())),
            "not_matched_reasons": dict(sorted(not_matched_reasons.items())),
            "cross_partition_duplicate_ids": cross_partition_dups,
            "conversion_impression_id_differs_from_click": conv_imp_mismatch,
        },
    }
    if emit_all:
        result["open_windows"] = {
            "ad_metrics": LazyRows(acc, AD_GRAIN, W, params, False, ad_key),
            "campaign_ctr": LazyRows(ctr_acc, ("campaign_id",), W, params, False),
        }
    return result if lazy else materialise(result)


def summary_line(result: dict) -> str:
    c = result["counts"]
    return ("oracle: " + " ".join(f"{k}={c[k]}" for k in CATEGORIES + ("input",))
            + f" final_watermark={result['final_watermark']}"
            + f" ad_metrics={len(result['ad_metrics'])} campaign_ctr={len(result['campaign_ctr'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="adstream correctness oracle")
    ap.add_argument("recording", help="producer recording (JSON lines)")
    ap.add_argument("--out", required=True, help="output JSON file ('-' for stdout)")
    ap.add_argument("--max-out-of-orderness", type=int, default=Params.max_out_of_orderness)
    ap.add_argument("--allowed-lateness", type=int, default=Params.allowed_lateness)
    ap.add_argument("--click-window", type=int, default=Params.click_window)
    ap.add_argument("--conversion-window", type=int, default=Params.conversion_window)
    ap.add_argument("--window", type=int, default=Params.window)
    ap.add_argument("--emit-all", action="store_true",
                    help="also output windows not yet emitted, under open_windows")
    a = ap.parse_args(argv)
    if a.window <= 0:
        ap.error("--window must be > 0")
    for name in ("max_out_of_orderness", "allowed_lateness", "click_window", "conversion_window"):
        if getattr(a, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    params = Params(a.max_out_of_orderness, a.allowed_lateness, a.click_window,
                    a.conversion_window, a.window)
    try:
        result = run(read_lines(a.recording), params, emit_all=a.emit_all, lazy=True)
    except OracleError as e:
        print(f"oracle: error: {e}", file=sys.stderr)
        return 2
    if a.out == "-":
        f = sys.stdout
    else:
        f = open(a.out, "w", encoding="utf-8", buffering=1 << 20)
    try:
        write_json(result, f)
        f.write("\n")
    finally:
        if f is not sys.stdout:
            f.close()
    print(summary_line(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
