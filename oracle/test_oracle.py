"""Hand-made cases for oracle.py.  Run: python3 -m unittest discover -s oracle"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import oracle  # noqa: E402
from oracle import Params, run  # noqa: E402

IMP, CLK, CNV = "ad-impressions", "ad-clicks", "ad-conversions"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a multiple of 60 000
MIN = 60_000
CW = 1_800_000
VW = 86_400_000


def imp(iid, t, p=0, **over):
    v = {"impression_id": iid, "event_time": t, "campaign_id": "cmp-1", "ad_id": "ad-1",
         "search_keyword": "kw", "user_id": "u-1", "user_ip": "10.1.2.3", "state": "US-CA",
         "device_type": "mobile", "cost_micros": 100, "metadata": {}}
    key = over.pop("key", iid)
    v.update(over)
    return {"topic": IMP, "partition": p, "key": key, "type": "impression", "value": v,
            "label": "normal"}


def click(cid, iid, t, p=0, **over):
    v = {"click_id": cid, "impression_id": iid, "event_time": t, "user_ip": "10.9.9.9",
         "cost_micros": 1000}
    key = over.pop("key", iid)
    v.update(over)
    return {"topic": CLK, "partition": p, "key": key, "type": "click", "value": v,
            "label": "normal"}


def conv(vid, cid, iid, t, p=0, **over):
    v = {"conversion_id": vid, "click_id": cid, "impression_id": iid, "event_time": t,
         "conversion_type": "purchase", "revenue_micros": 50_000}
    key = over.pop("key", iid)
    v.update(over)
    return {"topic": CNV, "partition": p, "key": key, "type": "conversion", "value": v,
            "label": "normal"}


def raw(topic, p=0, key="k"):
    return {"topic": topic, "partition": p, "key": key, "type": "raw", "value_hex": "00ff",
            "label": "normal"}


def tick(t, p=5):
    """A valid impression in a partition of its own, used to push the final
    watermark W to t - 5000 (default max-out-of-orderness)."""
    return imp(f"tick-{t}-{p}", t, p)


def pos(topic, p, off):
    return [topic, p, off]


def rows_by(result, key="ad_metrics", **match):
    return [r for r in result[key] if all(r[k] == v for k, v in match.items())]


class Base(unittest.TestCase):
    def run_oracle(self, recs, **params):
        return run(recs, Params(**params), emit_all=True)

    def assertAccounting(self, res):
        c = res["counts"]
        self.assertEqual(sum(c[k] for k in oracle.CATEGORIES), c["input"])
        for ct in res["counts_by_topic"].values():
            self.assertEqual(sum(ct[k] for k in oracle.CATEGORIES), ct["input"])


class TestJoinWindows(Base):
    def test_click_at_click_window_edge_matched_one_ms_after_unmatched(self):
        res = self.run_oracle([
            imp("i1", T0, p=0),
            imp("i2", T0, p=1),
            click("c1", "i1", T0 + CW, p=0),
            click("c2", "i2", T0 + CW + 1, p=1),
            tick(T0 + 10 * CW),
        ])
        self.assertEqual(res["counts_by_topic"][CLK]["counted"], 1)
        self.assertEqual(res["side_outputs"]["unmatched"], [pos(CLK, 1, 0)])
        w = T0 + CW  # the matched click counts in the window of its own time
        self.assertEqual(sum(r["clicks"] for r in rows_by(res, "campaign_ctr", window_start=w)), 1)
        self.assertAccounting(res)

    def test_click_before_impression_time_unmatched(self):
        res = self.run_oracle([imp("i1", T0 + 10), click("c1", "i1", T0 + 9), tick(T0 + CW)])
        self.assertEqual(res["side_outputs"]["unmatched"], [pos(CLK, 0, 0)])
        self.assertEqual(res["diagnostics"]["not_matched_reasons"],
                         {"click: outside click window": 1})

    def test_click_at_impression_time_matched(self):
        res = self.run_oracle([imp("i1", T0 + 10), click("c1", "i1", T0 + 10), tick(T0 + CW)])
        self.assertEqual(res["counts"]["counted"], 3)
        [row] = rows_by(res, window_start=T0)
        self.assertEqual((row["impressions"], row["clicks"], row["cost_micros"]), (1, 1, 1100))
        self.assertEqual(row["ctr"], 1.0)

    def test_conversion_window_edges(self):
        tc = T0 + 1000
        res = self.run_oracle([
            imp("i1", T0),
            click("c1", "i1", tc),
            conv("v-edge", "c1", "i1", tc + VW),          # matched (inclusive)
            conv("v-after", "c1", "i1", tc + VW + 1),     # unmatched
            conv("v-before", "c1", "i1", tc - 1),         # before its click: unmatched
            conv("v-same", "c1", "i1", tc),               # at click time: matched
            tick(T0 + 20 * VW),
        ], max_out_of_orderness=10 * VW)  # keep everything on time
        self.assertEqual(res["counts_by_topic"][CNV]["counted"], 2)
        self.assertEqual(res["side_outputs"]["unmatched"], [pos(CNV, 0, 1), pos(CNV, 0, 2)])
        self.assertEqual(res["side_outputs"]["late"], [])
        # matched conversion counted in its own window, with the impression's dimensions
        [row] = rows_by(res, window_start=tc + VW - (tc + VW) % MIN)
        self.assertEqual((row["conversions"], row["revenue_micros"], row["clicks"]), (1, 50_000, 0))
        self.assertEqual(row["campaign_id"], "cmp-1")
        self.assertEqual(row["ip_range"], "10.1.2.0/24")  # impression's ip, not the click's
        self.assertIsNone(row["ctr"])
        self.assertIsNone(row["conversion_rate"])
        self.assertAccounting(res)

    def test_conversion_whose_click_never_came(self):
        res = self.run_oracle([imp("i1", T0), conv("v1", "c-missing", "i1", T0 + 5), tick(T0 + MIN)])
        self.assertEqual(res["side_outputs"]["unmatched"], [pos(CNV, 0, 0)])
        self.assertEqual(res["diagnostics"]["not_matched_reasons"], {"conversion: no click": 1})
        self.assertAccounting(res)

    def test_conversion_of_unmatched_click_is_unmatched(self):
        res = self.run_oracle([
            click("c1", "i-missing", T0), conv("v1", "c1", "i-missing", T0 + 1), tick(T0 + MIN)])
        self.assertEqual(res["side_outputs"]["unmatched"], [pos(CLK, 0, 0), pos(CNV, 0, 0)])
        self.assertEqual(res["diagnostics"]["not_matched_reasons"],
                         {"click: no impression": 1, "conversion: click unmatched": 1})

    def test_click_and_conversion_arriving_before_impression_still_match(self):
        res = self.run_oracle([
            conv("v1", "c1", "i1", T0 + 300),
            click("c1", "i1", T0 + 200),
            imp("i1", T0 + 100),
            tick(T0 + 2 * MIN),
        ])
        self.assertEqual(res["counts"]["counted"], 4)
        self.assertEqual(res["side_outputs"]["unmatched"], [])
        self.assertEqual(res["side_outputs"]["late"], [])
        [row] = rows_by(res, window_start=T0)
        self.assertEqual((row["impressions"], row["clicks"], row["conversions"]), (1, 1, 1))
        self.assertEqual((row["cost_micros"], row["revenue_micros"]), (1100, 50_000))
        self.assertEqual((row["ctr"], row["conversion_rate"]), (1.0, 1.0))

    def test_click_of_late_impression_is_unmatched(self):
        res = self.run_oracle([
            imp("i0", T0 + 20_000),
            imp("i1", T0),                 # late: 0 < 20000-5000
            click("c1", "i1", T0 + 10),    # its impression was late
            tick(T0 + 10 * MIN),
        ])
        self.assertEqual(res["side_outputs"]["late"], [pos(IMP, 0, 1)])
        self.assertEqual(res["side_outputs"]["unmatched"], [pos(CLK, 0, 0)])

    def test_matched_conversion_uses_its_clicks_impression(self):
        res = self.run_oracle([
            imp("i1", T0, campaign_id="A"),
            imp("i2", T0, campaign_id="B"),
            click("c1", "i1", T0 + 1),
            conv("v1", "c1", "i2", T0 + 2),  # claims i2, but its click belongs to i1
            tick(T0 + 2 * MIN),
        ])
        a = rows_by(res, "campaign_ctr", window_start=T0, campaign_id="A")[0]
        b = rows_by(res, "campaign_ctr", window_start=T0, campaign_id="B")[0]
        self.assertEqual((a["clicks"], a["conversions"]), (1, 1))
        self.assertEqual((b["clicks"], b["conversions"]), (0, 0))
        self.assertEqual(res["diagnostics"]["conversion_impression_id_differs_from_click"], 1)


class TestWindows(Base):
    def test_event_at_window_end_goes_to_next_window(self):
        res = self.run_oracle([imp("i1", T0 + MIN - 1), imp("i2", T0 + MIN), tick(T0 + 10 * MIN)])
        starts = [(r["window_start"], r["window_end"], r["impressions"])
                  for r in res["campaign_ctr"]]
        self.assertEqual(starts, [(T0, T0 + MIN, 1), (T0 + MIN, T0 + 2 * MIN, 1)])

    def test_emission_boundary(self):
        # W = tick - 5000.  Window [T0, T0+MIN) emitted iff T0+MIN+L <= W.
        for L in (0, 7000):
            for delta, emitted in ((0, True), (-1, False)):
                W = T0 + MIN + L + delta
                res = self.run_oracle([imp("i1", T0), tick(W + 5000)], allowed_lateness=L)
                self.assertEqual(res["final_watermark"], W)
                self.assertEqual(len(rows_by(res, window_start=T0)), 1 if emitted else 0, (L, delta))
                self.assertEqual(len(rows_by(res["open_windows"], window_start=T0)),
                                 0 if emitted else 1)
                self.assertEqual(res["counts"]["counted"], 2)  # counted even if not emitted

    def test_window_size_param_and_alignment(self):
        res = self.run_oracle([imp("i1", T0 + 12_345), tick(T0 + 100_000)], window=10_000)
        self.assertEqual([(r["window_start"], r["window_end"]) for r in res["ad_metrics"]],
                         [(T0 + 10_000, T0 + 20_000)])

    def test_grains_sums_and_rates(self):
        res = self.run_oracle([
            imp("i1", T0, ad_id="a1", cost_micros=10),
            imp("i2", T0 + 1, ad_id="a2", cost_micros=20),
            imp("i3", T0 + 2, ad_id="a2", cost_micros=30),
            imp("i4", T0 + 3, ad_id="a2", cost_micros=40, device_type="tablet"),
            click("c1", "i2", T0 + 4, cost_micros=1),
            click("c2", "i3", T0 + 5, cost_micros=2),
            conv("v1", "c2", "i3", T0 + 6, revenue_micros=7),
            imp("o1", T0, campaign_id="cmp-2", cost_micros=0),
            tick(T0 + 2 * MIN),
        ])
        ad = [(r["ad_id"], r["device_type"], r["impressions"], r["clicks"], r["conversions"],
               r["cost_micros"], r["revenue_micros"], r["ctr"], r["conversion_rate"])
              for r in rows_by(res, window_start=T0, campaign_id="cmp-1")]
        self.assertEqual(ad, [
            ("a1", "mobile", 1, 0, 0, 10, 0, 0.0, None),
            ("a2", "mobile", 2, 2, 1, 53, 7, 1.0, 0.5),
            ("a2", "tablet", 1, 0, 0, 40, 0, 0.0, None),
        ])
        ctr = rows_by(res, "campaign_ctr", window_start=T0)
        self.assertEqual([(r["campaign_id"], r["impressions"], r["clicks"], r["conversions"],
                           r["cost_micros"], r["revenue_micros"], r["ctr"], r["conversion_rate"])
                          for r in ctr],
                         [("cmp-1", 4, 2, 1, 103, 7, 0.5, 0.5),
                          ("cmp-2", 1, 0, 0, 0, 0, 0.0, None)])
        self.assertEqual(set(ctr[0]), {"window_start", "window_end", "campaign_id", "impressions",
                                       "clicks", "conversions", "cost_micros", "revenue_micros",
                                       "ctr", "conversion_rate"})

    def test_window_with_only_clicks_has_null_ctr(self):
        # impression in window 0, its click in window 1: window 1 has clicks but no impressions
        res = self.run_oracle([imp("i1", T0 + MIN - 1), click("c1", "i1", T0 + MIN),
                               tick(T0 + 5 * MIN)])
        [row] = rows_by(res, window_start=T0 + MIN)
        self.assertEqual((row["impressions"], row["clicks"]), (0, 1))
        self.assertIsNone(row["ctr"])
        self.assertEqual(row["conversion_rate"], 0.0)

    def test_ip_ranges(self):
        res = self.run_oracle([
            imp("i1", T0, user_ip="10.1.2.3"),
            imp("i2", T0, user_ip="2001:db8:1:2::5"),
            imp("i3", T0, user_ip="2001:0DB8:0000:0000:1::1"),
            imp("i4", T0, user_ip="::ffff:1.2.3.4"),
            tick(T0 + 2 * MIN),
        ])
        self.assertEqual(sorted(r["ip_range"] for r in rows_by(res, window_start=T0)),
                         ["10.1.2.0/24", "2001:db8:1::/48", "2001:db8::/48", "::/48"])
        self.assertEqual(oracle.ip_range_of("192.168.7.255"), "192.168.7.0/24")
        self.assertEqual(oracle.ip_range_of("fe80::1%eth0"), None)


class TestLateness(Base):
    def test_late_boundary(self):
        for L in (0, 1000):
            # first record sets max=T0+20000, pwm=T0+15000
            pwm = T0 + 20_000 - 5000
            res = self.run_oracle([
                imp("i0", T0 + 20_000),
                imp("on-time", pwm - L),        # not late
                imp("late", pwm - L - 1),       # late
                tick(T0 + 10 * MIN),
            ], allowed_lateness=L)
            self.assertEqual(res["side_outputs"]["late"], [pos(IMP, 0, 2)], L)
            self.assertAccounting(res)

    def test_late_and_duplicate_records_advance_the_watermark(self):
        res = self.run_oracle([
            imp("a", T0 + 100_000),
            imp("b", T0 + 1000),          # late (pwm = T0+95000)
            imp("a", T0 + 200_000),       # duplicate, but advances max to T0+200000
            imp("c", T0 + 190_000),       # late because of the duplicate's time
            imp("d", T0 + 195_000),       # on time (== pwm)
        ])
        self.assertEqual(res["side_outputs"]["late"], [pos(IMP, 0, 1), pos(IMP, 0, 3)])
        self.assertEqual(res["duplicates"], [pos(IMP, 0, 2)])
        self.assertEqual(res["final_watermark"], T0 + 195_000)
        # a late record with a larger time also advances it
        res = self.run_oracle([
            imp("x", T0 + 100_000, cost_micros=-1),   # dead letter: does not count
            imp("a", T0 + 10_000),
            imp("b", T0),                             # late (pwm = T0+5000)
        ])
        self.assertEqual(res["side_outputs"]["late"], [pos(IMP, 0, 2)])
        self.assertEqual(res["final_watermark"], T0 + 5000)

    def test_watermarks_are_per_partition_and_topic(self):
        res = self.run_oracle([
            imp("a", T0 + 100_000, p=0),
            imp("b", T0, p=1),                    # other partition: on time
            click("c", "a", T0, p=0),             # other topic, same partition: on time
            imp("d", T0, p=0),                    # late
        ])
        self.assertEqual(res["side_outputs"]["late"], [pos(IMP, 0, 1)])
        self.assertEqual(res["partition_watermarks"],
                         [[CLK, 0, T0 - 5000], [IMP, 0, T0 + 95_000], [IMP, 1, T0 - 5000]])
        self.assertEqual(res["final_watermark"], T0 + 95_000)  # max over partitions

    def test_max_out_of_orderness_param(self):
        res = self.run_oracle([imp("a", T0 + 10_000), imp("b", T0)], max_out_of_orderness=10_000)
        self.assertEqual(res["side_outputs"]["late"], [])
        res = self.run_oracle([imp("a", T0 + 10_000), imp("b", T0)], max_out_of_orderness=9_999)
        self.assertEqual(res["side_outputs"]["late"], [pos(IMP, 0, 1)])

    def test_late_click_of_existing_impression(self):
        res = self.run_oracle([imp("i1", T0), click("c0", "x", T0 + 50_000),
                               click("c1", "i1", T0 + 10), tick(T0 + 10 * MIN)])
        self.assertEqual(res["side_outputs"]["late"], [pos(CLK, 0, 1)])
        self.assertEqual(res["counts_by_topic"][CLK]["counted"], 0)


class TestDuplicates(Base):
    def test_duplicate_in_later_window_not_counted(self):
        res = self.run_oracle([
            imp("i1", T0 + 10, cost_micros=5),
            imp("i1", T0 + MIN + 10, cost_micros=7),   # same id, later window
            click("c1", "i1", T0 + 20),
            click("c1", "i1", T0 + 30),                # duplicate click
            conv("v1", "c1", "i1", T0 + 40),
            conv("v1", "c1", "i1", T0 + 40),           # duplicate conversion
            tick(T0 + 10 * MIN),
        ])
        self.assertEqual(res["duplicates"], [pos(CLK, 0, 1), pos(CNV, 0, 1), pos(IMP, 0, 1)])
        self.assertEqual(rows_by(res, window_start=T0 + MIN), [])
        [row] = rows_by(res, window_start=T0)
        self.assertEqual((row["impressions"], row["clicks"], row["conversions"], row["cost_micros"]),
                         (1, 1, 1, 1005))
        self.assertAccounting(res)

    def test_late_first_copy_then_on_time_copy_is_kept(self):
        res = self.run_oracle([
            imp("z", T0 + 100_000),
            imp("i1", T0),                   # late
            imp("i1", T0 + 99_000),          # same id, on time: kept (not a duplicate)
        ])
        self.assertEqual(res["side_outputs"]["late"], [pos(IMP, 0, 1)])
        self.assertEqual(res["duplicates"], [])
        self.assertEqual(res["counts"]["counted"], 2)

    def test_invalid_first_copy_does_not_make_valid_copy_a_duplicate(self):
        res = self.run_oracle([imp("i1", T0, device_type="fridge"), imp("i1", T0)])
        self.assertEqual(res["duplicates"], [])
        self.assertEqual(res["counts"]["dead_letter"], 1)
        self.assertEqual(res["counts"]["counted"], 1)

    def test_duplicate_id_in_other_partition_first_in_file_order_wins(self):
        res = self.run_oracle([click("c1", "i1", T0, p=0, key="i1"),
                               click("c1", "i2", T0, p=1, key="i2"), tick(T0 + MIN)])
        self.assertEqual(res["duplicates"], [pos(CLK, 1, 0)])
        self.assertEqual(res["diagnostics"]["cross_partition_duplicate_ids"], 1)

    def test_same_id_different_types_are_not_duplicates(self):
        res = self.run_oracle([imp("x", T0), click("x", "x", T0), conv("x", "x", "x", T0),
                               tick(T0 + MIN)])
        self.assertEqual(res["duplicates"], [])
        self.assertEqual(res["counts"]["counted"], 4)


class TestValidation(Base):
    def test_invalid_kinds(self):
        bad = [
            raw(IMP), raw(CLK), raw(CNV),
            imp("", T0, key=""),
            imp("i", T0, campaign_id=""),
            imp("i", T0, ad_id=""),
            imp("i", T0, cost_micros=-1),
            imp("i", T0, user_ip="999.1.2.3"),
            imp("i", T0, user_ip="fe80::1%eth0"),
            imp("i", T0, user_ip="not an ip"),
            imp("i", T0, user_ip=""),
            imp("i", T0, device_type="fridge"),
            imp("i", T0, device_type="Mobile"),
            imp("i", 0),
            imp("i", -5),
            imp("i", T0, key="other"),
            imp("i", True),
            imp("i", T0, cost_micros=None),
            click("", "i", T0),
            click("c", "", T0, key=""),
            click("c", "i", T0, cost_micros=-1),
            click("c", "i", T0, user_ip="1.2.3"),
            click("c", "i", 0),
            click("c", "i", T0, key="j"),
            conv("", "c", "i", T0),
            conv("v", "", "i", T0),
            conv("v", "c", "", T0, key=""),
            conv("v", "c", "i", T0, revenue_micros=-1),
            conv("v", "c", "i", 0),
            conv("v", "c", "i", T0, key="j"),
        ]
        # type / topic mismatch
        wrong = imp("i", T0); wrong["topic"] = CLK
        bad.append(wrong)
        wrong = click("c", "i", T0); wrong["topic"] = CNV
        bad.append(wrong)
        wrong = conv("v", "c", "i", T0); wrong["topic"] = IMP
        bad.append(wrong)
        missing = click("c", "i", T0); del missing["value"]["cost_micros"]
        bad.append(missing)
        for r in bad:
            res = self.run_oracle([r])
            self.assertEqual(res["counts"]["dead_letter"], 1, r)
            self.assertEqual(res["final_watermark"], None, r)
        res = self.run_oracle(bad)
        self.assertEqual(res["counts"]["dead_letter"], len(bad))
        self.assertEqual(res["counts"]["input"], len(bad))
        self.assertAccounting(res)

    def test_valid_edge_values(self):
        ok = [
            imp("i1", 1, cost_micros=0, user_ip="::1", device_type="ctv", search_keyword="",
                state=""),
            imp("i2", 1, device_type="other"),
            click("c1", "i1", 1, cost_micros=0, user_ip="2001:db8::1"),
            conv("v1", "c1", "i1", 1, revenue_micros=0),
        ]
        res = self.run_oracle(ok)
        self.assertEqual(res["counts"]["dead_letter"], 0)
        self.assertEqual(res["counts"]["counted"], 4)

    def test_dead_letters_do_not_advance_watermark_and_label_ignored(self):
        r = imp("i1", T0 + 10 * MIN)
        r["label"] = "late"
        res = self.run_oracle([imp("bad", T0 + 100 * MIN, device_type="x"), r,
                               imp("i2", T0 + 10 * MIN - 5000)])
        self.assertEqual(res["side_outputs"]["late"], [])
        self.assertEqual(res["side_outputs"]["dead_letter"], [pos(IMP, 0, 0)])
        self.assertEqual(res["final_watermark"], T0 + 10 * MIN - 5000)


class TestPendingAndAccounting(Base):
    def test_pending_vs_unmatched(self):
        # W = tick - 5000; click at t is unmatched iff W > t + L
        for L in (0, 3000):
            t = T0 + 1000
            for W, expect in ((t + L, "pending"), (t + L + 1, "unmatched")):
                res = self.run_oracle([click("c1", "none", t, p=0), tick(W + 5000, p=1)],
                                      allowed_lateness=L)
                self.assertEqual(res["final_watermark"], W)
                self.assertEqual(res["counts"][expect], 1, (L, W))
                if expect == "pending":
                    self.assertEqual(res["pending"], [pos(CLK, 0, 0)])
                    self.assertEqual(res["side_outputs"]["unmatched"], [])
                else:
                    self.assertEqual(res["side_outputs"]["unmatched"], [pos(CLK, 0, 0)])
                self.assertAccounting(res)

    def test_no_valid_records_nothing_emitted_all_pending(self):
        res = self.run_oracle([raw(IMP)])
        self.assertIsNone(res["final_watermark"])
        res = self.run_oracle([click("c1", "i1", T0)], max_out_of_orderness=0)
        # a single click: W = its own time, W > t is false -> pending
        self.assertEqual(res["counts"]["pending"], 1)
        self.assertEqual(res["ad_metrics"], [])

    def test_offsets_per_topic_partition(self):
        res = self.run_oracle([raw(IMP, 0), raw(IMP, 1), raw(CLK, 0), raw(IMP, 0), raw(IMP, 1)])
        self.assertEqual(res["side_outputs"]["dead_letter"],
                         [pos(CLK, 0, 0), pos(IMP, 0, 0), pos(IMP, 0, 1), pos(IMP, 1, 0),
                          pos(IMP, 1, 1)])

    def test_accounting_identity_mixed(self):
        recs = [
            imp("i1", T0), imp("i1", T0), imp("i2", T0 + 100_000), imp("i3", T0),  # dup, late
            click("c1", "i1", T0 + 5), click("c2", "nope", T0 + 6), click("c3", "i2", T0 + 99_000),
            conv("v1", "c1", "i1", T0 + 7), conv("v2", "zz", "i1", T0 + 8),
            raw(CNV), imp("bad", T0, user_ip="x"),
            click("c9", "i2", T0 + 100_000 + 10 * CW, p=3),  # pending (beyond W)
        ]
        res = self.run_oracle(recs)
        c = res["counts"]
        self.assertEqual((c["counted"], c["late"], c["duplicate"], c["unmatched"], c["pending"],
                          c["dead_letter"], c["input"]), (4, 1, 1, 3, 1, 2, 12))
        self.assertAccounting(res)
        self.assertEqual(res["counts_by_topic"][CNV],
                         {"counted": 1, "late": 0, "duplicate": 0, "unmatched": 1, "pending": 0,
                          "dead_letter": 1, "input": 3})


class TestCli(unittest.TestCase):
    def test_cli_round_trip(self):
        recs = [imp("i1", T0), click("c1", "i1", T0 + 1), raw(CLK), tick(T0 + 5 * MIN)]
        here = os.path.dirname(os.path.abspath(__file__))
        with tempfile.TemporaryDirectory() as d:
            rec = os.path.join(d, "rec.jsonl")
            out = os.path.join(d, "out.json")
            with open(rec, "w") as f:
                for i, r in enumerate(recs):
                    f.write(json.dumps({"seq": i, **r}) + "\n")
            p = subprocess.run([sys.executable, os.path.join(here, "oracle.py"), rec, "--out", out,
                                "--emit-all", "--window", "60000"],
                               capture_output=True, text=True)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("counted=3", p.stderr)
            self.assertIn("dead_letter=1", p.stderr)
            with open(out) as f:
                res = json.load(f)
        # the CLI output equals the in-process result
        self.assertEqual(res, json.loads(json.dumps(run(recs, Params(), emit_all=True))))
        self.assertEqual(res["params"], {"max_out_of_orderness": 5000, "allowed_lateness": 0,
                                         "click_window": 1_800_000, "conversion_window": 86_400_000,
                                         "window": 60_000})
        self.assertEqual(len(res["ad_metrics"]), 1)
        self.assertEqual(len(res["open_windows"]["ad_metrics"]), 1)
        self.assertEqual(res["side_outputs"]["dead_letter"], [pos(CLK, 0, 1)])


if __name__ == "__main__":
    unittest.main()
