//! Rule-by-rule tests of the engine against CONTRACT.md, boundaries included.

use super::*;
use adstream_schemas::{AdMetric, Click, Conversion, Impression};
use std::collections::BTreeMap;

const MIN: i64 = 60_000;

struct Harness {
    engine: Engine,
    offsets: BTreeMap<(u8, i32), i64>,
    outputs: Vec<Output>,
}

/// The input schemas under ids 1, 2, 3, as the records below are framed.
fn codec() -> Codec {
    adstream_producer::encode::SchemaIds::OFFLINE
        .offline_codec()
        .expect("schemas")
}

fn imp(id: &str, t: i64) -> Impression {
    Impression {
        impression_id: id.into(),
        event_time: t,
        campaign_id: "c1".into(),
        ad_id: "a1".into(),
        search_keyword: "shoes".into(),
        user_id: "u1".into(),
        user_ip: "10.1.2.3".into(),
        state: "US-CA".into(),
        device_type: "mobile".into(),
        cost_micros: 100,
        metadata: Default::default(),
    }
}

fn click(id: &str, imp: &str, t: i64) -> Click {
    Click {
        click_id: id.into(),
        impression_id: imp.into(),
        event_time: t,
        user_ip: "10.1.2.3".into(),
        cost_micros: 1_000,
    }
}

fn conv(id: &str, click: &str, imp: &str, t: i64) -> Conversion {
    Conversion {
        conversion_id: id.into(),
        click_id: click.into(),
        impression_id: imp.into(),
        event_time: t,
        conversion_type: "purchase".into(),
        revenue_micros: 50_000,
    }
}

impl Harness {
    fn new(cfg: EngineConfig, partitions: &[(u8, i32)]) -> Self {
        let mut engine = Engine::new(cfg, codec());
        for &(topic, partition) in partitions {
            engine.add_partition(InputPartition { topic, partition });
        }
        Harness {
            engine,
            offsets: BTreeMap::new(),
            outputs: Vec::new(),
        }
    }

    /// One partition per topic, lateness 0, ooo 5 s.
    fn simple() -> Self {
        Self::new(EngineConfig::default(), &[(0, 0), (1, 0), (2, 0)])
    }

    fn send_bytes(&mut self, topic: u8, partition: i32, key: &str, value: &[u8]) -> SourceRef {
        let off = self.offsets.entry((topic, partition)).or_insert(0);
        let source = SourceRef {
            topic,
            partition,
            offset: *off,
        };
        *off += 1;
        self.engine
            .on_record(source, Some(key.as_bytes()), Some(value), None);
        self.outputs.extend(self.engine.take_outputs());
        source
    }

    fn imp_on(&mut self, partition: i32, r: &Impression) -> SourceRef {
        let mut b = Vec::new();
        Codec::encode_with_id(1, r, &mut b).expect("encode");
        self.send_bytes(IMPRESSIONS, partition, &r.impression_id.clone(), &b)
    }
    fn imp(&mut self, r: &Impression) -> SourceRef {
        self.imp_on(0, r)
    }
    fn click(&mut self, r: &Click) -> SourceRef {
        let mut b = Vec::new();
        Codec::encode_with_id(2, r, &mut b).expect("encode");
        self.send_bytes(CLICKS, 0, &r.impression_id.clone(), &b)
    }
    fn conv(&mut self, r: &Conversion) -> SourceRef {
        let mut b = Vec::new();
        Codec::encode_with_id(3, r, &mut b).expect("encode");
        self.send_bytes(CONVERSIONS, 0, &r.impression_id.clone(), &b)
    }

    /// Moves every partition's event time to `t` with a filler impression
    /// (campaign "filler") and filler clicks/conversions that are unmatched.
    fn advance_all_to(&mut self, t: i64) {
        let n = self.offsets.values().sum::<i64>();
        let mut f = imp(&format!("filler-{n}"), t);
        f.campaign_id = "filler".into();
        self.imp(&f);
        self.click(&click(&format!("fc-{n}"), &format!("nothing-{n}"), t));
        self.conv(&conv(
            &format!("fv-{n}"),
            &format!("nothing-{n}"),
            &format!("nothing-{n}"),
            t,
        ));
    }

    fn rows(&self) -> Vec<AdMetric> {
        self.outputs
            .iter()
            .flat_map(|o| match o {
                Output::AdMetrics(rows) => rows.to_vec(),
                _ => Vec::new(),
            })
            .filter(|m| m.campaign_id != "filler")
            .collect()
    }

    fn campaign_rows(&self) -> Vec<&CampaignCtr> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                Output::CampaignCtr(m) if m.campaign_id != "filler" => Some(m),
                _ => None,
            })
            .collect()
    }

    fn side(&self, kind: SideKind) -> Vec<SourceRef> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Side { kind: k, raw, .. } if *k == kind => Some(raw.source),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn impression_click_conversion_roll_up_into_one_window() {
    let mut h = Harness::simple();
    h.imp(&imp("i1", 1_000));
    h.click(&click("k1", "i1", 2_000));
    h.conv(&conv("v1", "k1", "i1", 3_000));
    h.imp(&imp("i2", 4_000));
    assert!(
        h.rows().is_empty(),
        "nothing emitted before the watermark passes"
    );
    h.advance_all_to(MIN + 5_000);
    let rows = h.rows();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!((r.window_start, r.window_end), (0, MIN));
    assert_eq!((r.impressions, r.clicks, r.conversions), (2, 1, 1));
    assert_eq!(r.cost_micros, 2 * 100 + 1_000);
    assert_eq!(r.revenue_micros, 50_000);
    assert_eq!(r.ctr, Some(0.5));
    assert_eq!(r.conversion_rate, Some(1.0));
    assert_eq!(r.ip_range, "10.1.2.0/24");
    let c = h.campaign_rows();
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].impressions, c[0].clicks, c[0].conversions), (2, 1, 1));
}

#[test]
fn window_emitted_exactly_when_watermark_reaches_end_plus_lateness() {
    let cfg = EngineConfig {
        allowed_lateness: 2_000,
        ..Default::default()
    };
    let mut h = Harness::new(cfg, &[(0, 0)]);
    h.imp(&imp("i1", 10));
    // Watermark = max - 5 s. Needs >= 60 s + 2 s.
    h.imp(&imp("i2", MIN + 2_000 + 5_000 - 1));
    assert!(h.rows().is_empty());
    h.imp(&imp("i3", MIN + 2_000 + 5_000));
    assert_eq!(h.rows().len(), 1);
    assert_eq!(h.rows()[0].impressions, 1);
}

#[test]
fn event_exactly_at_window_end_belongs_to_the_next_window() {
    let mut h = Harness::new(EngineConfig::default(), &[(0, 0)]);
    h.imp(&imp("i1", MIN - 1));
    h.imp(&imp("i2", MIN));
    h.imp(&imp("i3", 3 * MIN + 5_000));
    let rows = h.rows();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].window_start, rows[0].impressions), (0, 1));
    assert_eq!((rows[1].window_start, rows[1].impressions), (MIN, 1));
}

#[test]
fn click_at_exactly_click_window_matches_and_one_ms_later_does_not() {
    let mut h = Harness::simple();
    let cw = EngineConfig::default().click_window;
    h.imp(&imp("i1", 1_000));
    h.imp(&imp("i2", 1_000));
    h.click(&click("k1", "i1", 1_000 + cw));
    let late_click = h.click(&click("k2", "i2", 1_000 + cw + 1));
    h.advance_all_to(1_000 + cw + 10 * MIN);
    let clicks: i64 = h.rows().iter().map(|r| r.clicks).sum();
    assert_eq!(clicks, 1);
    assert!(h.side(SideKind::Unmatched).contains(&late_click));
}

#[test]
fn click_before_its_impression_still_matches() {
    let mut h = Harness::simple();
    h.click(&click("k1", "i1", 3_000));
    h.imp(&imp("i1", 2_000));
    h.advance_all_to(2 * MIN);
    assert_eq!(h.rows()[0].clicks, 1);
    assert!(h
        .side(SideKind::Unmatched)
        .iter()
        .all(|s| s.offset != 0 || s.topic != CLICKS));
}

#[test]
fn click_before_impression_time_does_not_match() {
    let mut h = Harness::simple();
    h.imp(&imp("i1", 5_000));
    let k = h.click(&click("k1", "i1", 4_999));
    h.advance_all_to(2 * MIN);
    assert_eq!(h.rows()[0].clicks, 0);
    assert!(h.side(SideKind::Unmatched).contains(&k));
}

#[test]
fn conversion_window_boundaries() {
    let mut h = Harness::simple();
    let vw = EngineConfig::default().conversion_window;
    h.imp(&imp("i1", 1_000));
    h.click(&click("k1", "i1", 2_000));
    h.click(&click("k2", "i1", 2_000));
    h.conv(&conv("v1", "k1", "i1", 2_000 + vw));
    let v2 = h.conv(&conv("v2", "k2", "i1", 2_000 + vw + 1));
    h.advance_all_to(2_000 + vw + 10 * MIN);
    let convs: i64 = h.rows().iter().map(|r| r.conversions).sum();
    assert_eq!(convs, 1);
    assert!(h.side(SideKind::Unmatched).contains(&v2));
}

#[test]
fn conversion_whose_click_never_came_is_unmatched() {
    let mut h = Harness::simple();
    h.imp(&imp("i1", 1_000));
    let v = h.conv(&conv("v1", "ghost", "i1", 2_000));
    h.advance_all_to(2_000 + 5_000);
    assert!(
        h.side(SideKind::Unmatched).is_empty(),
        "not before the watermark passes t + lateness"
    );
    h.advance_all_to(2_000 + 5_000 + 1);
    assert_eq!(
        h.side(SideKind::Unmatched)
            .iter()
            .filter(|s| **s == v)
            .count(),
        1
    );
}

#[test]
fn conversion_of_an_unmatched_click_is_unmatched() {
    let mut h = Harness::simple();
    let k = h.click(&click("k1", "nobody", 2_000));
    let v = h.conv(&conv("v1", "k1", "nobody", 3_000));
    h.advance_all_to(2 * MIN);
    let un = h.side(SideKind::Unmatched);
    assert!(un.contains(&k) && un.contains(&v));
}

#[test]
fn late_boundary_is_partition_watermark_minus_lateness() {
    let mut h = Harness::new(EngineConfig::default(), &[(0, 0), (0, 1)]);
    h.imp_on(0, &imp("i0", 100_000));
    // Partition watermark 95 000: exactly at it is on time, 1 ms below is late.
    let on_time = h.imp_on(0, &imp("i1", 95_000));
    let late = h.imp_on(0, &imp("i2", 94_999));
    // Another partition is unaffected by partition 0's watermark.
    let other = h.imp_on(1, &imp("i3", 10_000));
    let lates = h.side(SideKind::Late);
    assert_eq!(lates, vec![late]);
    assert!(!lates.contains(&on_time) && !lates.contains(&other));
    assert_eq!(h.engine.stats().by_topic[0].late, 1);
}

#[test]
fn duplicate_in_a_later_window_is_dropped_and_counted() {
    let mut h = Harness::simple();
    h.imp(&imp("i1", 58_000));
    h.imp(&imp("i2", 61_000));
    // Same impression again, arriving while the next window is current, on time.
    h.imp(&imp("i1", 58_000));
    h.advance_all_to(3 * MIN);
    assert_eq!(h.engine.stats().by_topic[0].duplicate, 1);
    let total: i64 = h.rows().iter().map(|r| r.impressions).sum();
    assert_eq!(total, 2);
    // Duplicate clicks and conversions too.
    let mut h = Harness::simple();
    h.imp(&imp("i1", 1_000));
    h.click(&click("k1", "i1", 2_000));
    h.click(&click("k1", "i1", 2_000));
    h.conv(&conv("v1", "k1", "i1", 3_000));
    h.conv(&conv("v1", "k1", "i1", 3_000));
    h.advance_all_to(2 * MIN);
    assert_eq!((h.rows()[0].clicks, h.rows()[0].conversions), (1, 1));
    assert_eq!(h.engine.stats().by_topic[1].duplicate, 1);
    assert_eq!(h.engine.stats().by_topic[2].duplicate, 1);
}

#[test]
fn idle_partition_stops_holding_back_and_later_records_for_emitted_windows_are_late() {
    let mut h = Harness::new(EngineConfig::default(), &[(0, 0), (0, 1)]);
    h.imp_on(0, &imp("i1", 10_000));
    h.imp_on(1, &imp("i2", 10_000));
    h.imp_on(0, &imp("i3", 5 * MIN));
    assert!(h.rows().is_empty(), "partition 1 holds the watermark back");
    h.engine.set_idle(
        InputPartition {
            topic: 0,
            partition: 1,
        },
        true,
    );
    h.outputs.extend(h.engine.take_outputs());
    assert_eq!(
        h.rows().len(),
        1,
        "window [0, 60 s) emitted once partition 1 is idle"
    );
    // Partition 1 wakes up with a record for the emitted window: on time for
    // its own partition watermark, but its window is gone, so it is late.
    let r = h.imp_on(1, &imp("i4", 20_000));
    assert_eq!(h.side(SideKind::Late), vec![r]);
    assert_eq!(h.rows().len(), 1);
}

#[test]
fn invalid_records_go_to_dead_letter_and_do_not_move_watermarks() {
    let mut h = Harness::simple();
    let a = h.send_bytes(IMPRESSIONS, 0, "x", b"{\"not\":\"avro\"}");
    let mut bad = imp("i1", 9_999_999);
    bad.cost_micros = -1;
    let b = h.imp(&bad);
    let mut wrong_key = imp("i2", 1_000);
    wrong_key.impression_id = "i2".into();
    let mut bytes = Vec::new();
    Codec::encode_with_id(1, &wrong_key, &mut bytes).expect("encode");
    let c = h.send_bytes(IMPRESSIONS, 0, "not-i2", &bytes);
    let mut bad_ip = imp("i3", 1_000);
    bad_ip.user_ip = "1.2.3".into();
    let d = h.imp(&bad_ip);
    let mut bad_device = imp("i4", 1_000);
    bad_device.device_type = "toaster".into();
    let e = h.imp(&bad_device);
    // A click encoded on the impressions topic.
    let mut cb = Vec::new();
    Codec::encode_with_id(2, &click("k", "i", 1), &mut cb).expect("encode");
    let f = h.send_bytes(IMPRESSIONS, 0, "i", &cb);
    assert_eq!(h.side(SideKind::DeadLetter), vec![a, b, c, d, e, f]);
    assert_eq!(
        h.engine.partition_watermark(InputPartition {
            topic: 0,
            partition: 0
        }),
        i64::MIN
    );
    let reasons: Vec<String> = h
        .outputs
        .iter()
        .filter_map(|o| match o {
            Output::Side { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert!(reasons[0].contains("wrong-magic-byte"), "{reasons:?}");
    assert!(reasons[1].contains("negative"), "{reasons:?}");
    assert!(reasons[5].contains("wrong-schema"), "{reasons:?}");
}

#[test]
fn rates_are_null_on_zero_denominators() {
    let mut h = Harness::simple();
    h.imp(&imp("i1", 1_000));
    h.advance_all_to(2 * MIN);
    assert_eq!(h.rows()[0].ctr, Some(0.0));
    assert_eq!(h.rows()[0].conversion_rate, None);
}

#[test]
fn every_record_is_accounted_for_once() {
    let mut h = Harness::simple();
    h.imp(&imp("i1", 1_000));
    h.imp(&imp("i1", 1_000)); // duplicate
    h.click(&click("k1", "i1", 2_000)); // counted
    h.click(&click("k2", "zz", 2_000)); // unmatched
    h.imp(&imp("i9", 200_000)); // moves watermark
    h.imp(&imp("i8", 1_000)); // late
    h.send_bytes(CLICKS, 0, "x", b""); // dead letter
    h.advance_all_to(400_000);
    let t = h.engine.stats().total();
    let pending = t.input - t.counted - t.late - t.duplicate - t.unmatched - t.dead_letter;
    // The last filler click/conversion are still waiting (watermark not past them).
    assert_eq!(pending, 2);
    assert_eq!(h.engine.stats().by_topic[0].counted, 3); // i1, i9 and the filler
    assert_eq!(t.late, 1);
    assert_eq!(t.duplicate, 1);
    assert_eq!(t.dead_letter, 1);
}

#[test]
fn state_is_freed_after_its_horizon() {
    let mut h = Harness::simple();
    for i in 0..100 {
        h.imp(&imp(&format!("i{i}"), 1_000 + i));
    }
    assert_eq!(h.engine.join_sizes().impressions, 100);
    let cw = EngineConfig::default().click_window;
    h.advance_all_to(1_000 + cw + 3 * MIN);
    assert!(
        h.engine.join_sizes().impressions <= 3,
        "{:?}",
        h.engine.join_sizes()
    );
}

#[test]
fn interned_strings_are_freed_with_the_state_that_holds_them() {
    let mut h = Harness::simple();
    // 100 impressions of 100 distinct ads (and a /24 each); half get a click.
    for i in 0..100 {
        let mut r = imp(&format!("i{i}"), 1_000 + i);
        r.ad_id = format!("ad{i}");
        r.user_ip = format!("10.{i}.0.1");
        h.imp(&r);
        if i % 2 == 0 {
            h.click(&click(&format!("k{i}"), &format!("i{i}"), 2_000 + i));
        }
    }
    // The ads, and c1, shoes, US-CA, mobile; IP ranges are not strings.
    assert_eq!(h.engine.interned_strings(), 104);
    // Past the click window: unclicked impressions and their window cells
    // are gone; matched clicks still hold their grains for conversions.
    let cw = EngineConfig::default().click_window;
    h.advance_all_to(1_000 + cw + 3 * MIN);
    assert_eq!(
        h.rows().iter().filter(|r| r.campaign_id == "c1").count(),
        100
    );
    // The clicked ads and the four shared strings, plus the filler
    // impression's "filler" and "a1".
    assert_eq!(h.engine.interned_strings(), 50 + 4 + 2);
    // Past the conversion window only the last filler impression is held.
    let vw = EngineConfig::default().conversion_window;
    h.advance_all_to(2_000 + vw + 3 * MIN);
    assert_eq!(h.engine.interned_strings(), 5);
    // A grain seen again after being freed is interned afresh and counted.
    let mut r = imp("again", 2_000 + vw + 4 * MIN);
    r.ad_id = "ad7".into();
    r.user_ip = "10.7.0.1".into();
    h.imp(&r);
    h.advance_all_to(2_000 + vw + 10 * MIN);
    let again: Vec<_> = h
        .rows()
        .into_iter()
        .filter(|r| r.campaign_id == "c1")
        .collect();
    assert_eq!(again.len(), 101);
    assert_eq!(again[100].ip_range, "10.7.0.0/24");
    assert_eq!(again[100].impressions, 1);
}

#[test]
fn a_checkpoint_of_another_format_is_refused_with_a_clear_error() {
    let mut h = Harness::simple();
    h.imp(&imp("i1", 1_000));
    let mut bytes = h.engine.checkpoint();
    assert!(Engine::restore(EngineConfig::default(), codec(), &bytes).is_ok());
    bytes[4] = bytes[4].wrapping_add(1); // another format version
    let e = Engine::restore(EngineConfig::default(), codec(), &bytes)
        .err()
        .expect("refused");
    assert!(matches!(e, CheckpointError::Format), "{e}");
    assert!(e.to_string().contains("incompatible version"), "{e}");
    let rollup = rollup::Rollup::new(&EngineConfig::default(), 1).snapshot();
    assert!(
        Engine::restore(EngineConfig::default(), codec(), &rollup).is_err(),
        "a rollup checkpoint is not a join task's"
    );
}
