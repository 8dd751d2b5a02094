//! Property tests of the engine against a reference model written separately
//! (below, sharing none of the engine's join or window code).
//!
//! For random streams whose disorder stays within the out-of-orderness bound
//! (plus deliberate late records and duplicates), the engine's outputs equal
//! the model's, every input record is accounted for exactly once, and feeding
//! the same partitions in a different interleaving gives the same outputs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use adstream_processor::engine::rollup::{Mark, PartialMessage, Rollup};
use adstream_processor::engine::watermark::InputPartition;
use adstream_processor::engine::{Engine, EngineConfig, Output, SideKind, SourceRef};
use adstream_schemas::{Click, Codec, Conversion, Impression};
use proptest::prelude::*;

const OOO: i64 = 2_000;
const WINDOW: i64 = 10_000;
const CLICK_WINDOW: i64 = 30_000;
const CONV_WINDOW: i64 = 60_000;
const PARTITIONS: i32 = 2;

#[derive(Debug, Clone)]
enum Rec {
    Imp(Impression),
    Click(Click),
    Conv(Conversion),
}

impl Rec {
    fn t(&self) -> i64 {
        match self {
            Rec::Imp(r) => r.event_time,
            Rec::Click(r) => r.event_time,
            Rec::Conv(r) => r.event_time,
        }
    }
    fn topic(&self) -> u8 {
        match self {
            Rec::Imp(_) => 0,
            Rec::Click(_) => 1,
            Rec::Conv(_) => 2,
        }
    }
    fn key(&self) -> &str {
        match self {
            Rec::Imp(r) => &r.impression_id,
            Rec::Click(r) => &r.impression_id,
            Rec::Conv(r) => &r.impression_id,
        }
    }
    fn id(&self) -> &str {
        match self {
            Rec::Imp(r) => &r.impression_id,
            Rec::Click(r) => &r.click_id,
            Rec::Conv(r) => &r.conversion_id,
        }
    }
}

/// A tiny deterministic PRNG so one proptest seed describes a whole stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// Per-(topic, partition) record sequences in arrival order.
type Streams = BTreeMap<(u8, i32), Vec<Rec>>;

fn partition_of(key: &str) -> i32 {
    (key.bytes().map(u32::from).sum::<u32>() % PARTITIONS as u32) as i32
}

fn generate(seed: u64) -> Streams {
    let mut rng = Rng(seed);
    let n_imp = 5 + rng.below(40) as usize;
    let mut recs: Vec<Rec> = Vec::new();
    let mut clicks = Vec::new();
    for i in 0..n_imp {
        let mut t = 1_000 + rng.below(120_000) as i64;
        if rng.chance(20) {
            // Exactly at, or just before, a window boundary.
            t = t - t.rem_euclid(WINDOW) - rng.below(2) as i64 + WINDOW;
        }
        let id = format!("i{i}");
        recs.push(Rec::Imp(Impression {
            impression_id: id.clone(),
            event_time: t,
            campaign_id: format!("c{}", rng.below(2)),
            ad_id: format!("a{}", rng.below(2)),
            search_keyword: "k".into(),
            user_id: "u".into(),
            user_ip: if rng.chance(50) {
                "10.0.0.1".into()
            } else {
                "2001:db8::7".into()
            },
            state: "US-CA".into(),
            device_type: "mobile".into(),
            cost_micros: 1 + rng.below(100) as i64,
            metadata: Default::default(),
        }));
        for c in 0..rng.below(3) {
            // Mostly inside the click window, some just outside or before.
            let mut dt = rng.below(CLICK_WINDOW as u64 + 4_000) as i64 - 1_000;
            if rng.chance(25) {
                dt = [-1, 0, CLICK_WINDOW, CLICK_WINDOW + 1][rng.below(4) as usize];
            }
            let cid = format!("k{i}-{c}");
            clicks.push((cid.clone(), id.clone(), t + dt));
            recs.push(Rec::Click(Click {
                click_id: cid,
                impression_id: id.clone(),
                event_time: t + dt,
                user_ip: "10.0.0.1".into(),
                cost_micros: 10 + rng.below(100) as i64,
            }));
        }
    }
    for (n, (cid, iid, ct)) in clicks.iter().enumerate() {
        if rng.chance(40) {
            let mut dt = rng.below(CONV_WINDOW as u64 + 4_000) as i64 - 1_000;
            if rng.chance(25) {
                dt = [-1, 0, CONV_WINDOW, CONV_WINDOW + 1][rng.below(4) as usize];
            }
            recs.push(Rec::Conv(Conversion {
                conversion_id: format!("v{n}"),
                click_id: cid.clone(),
                impression_id: iid.clone(),
                event_time: ct + dt,
                conversion_type: "purchase".into(),
                revenue_micros: 100 + rng.below(1_000) as i64,
            }));
        }
    }
    // Orphans.
    for n in 0..rng.below(3) {
        recs.push(Rec::Click(Click {
            click_id: format!("orphan{n}"),
            impression_id: format!("ghost{n}"),
            event_time: 1_000 + rng.below(120_000) as i64,
            user_ip: "10.0.0.1".into(),
            cost_micros: 5,
        }));
    }
    // Arrival: event time plus jitter within the bound; some duplicates; some late.
    let mut arrivals: Vec<(i64, u64, Rec)> = Vec::new();
    for r in recs {
        let jitter = rng.below(OOO as u64 + 1) as i64;
        if rng.chance(10) {
            arrivals.push((
                r.t() + rng.below(OOO as u64 + 1) as i64,
                rng.next(),
                r.clone(),
            ));
        }
        let arrive = if rng.chance(5) {
            r.t() + OOO + 1 + rng.below(20_000) as i64
        } else {
            r.t() + jitter
        };
        arrivals.push((arrive, rng.next(), r));
    }
    arrivals.sort_by_key(|(a, tie, _)| (*a, *tie));
    let mut streams: Streams = BTreeMap::new();
    for (_, _, r) in arrivals {
        streams
            .entry((r.topic(), partition_of(r.key())))
            .or_default()
            .push(r);
    }
    streams
}

/// The input schemas under ids 1, 2, 3, as the records below are framed.
fn codec() -> Codec {
    adstream_producer::encode::SchemaIds::OFFLINE
        .offline_codec()
        .expect("schemas")
}

fn encode(r: &Rec) -> Vec<u8> {
    let mut b = Vec::new();
    match r {
        Rec::Imp(x) => Codec::encode_with_id(1, x, &mut b),
        Rec::Click(x) => Codec::encode_with_id(2, x, &mut b),
        Rec::Conv(x) => Codec::encode_with_id(3, x, &mut b),
    }
    .expect("encode");
    b
}

/// Everything compared between engine and model.
#[derive(Debug, PartialEq, Default)]
struct Result {
    ad_metrics: BTreeSet<String>,
    campaigns: BTreeSet<String>,
    late: BTreeSet<(u8, i32, i64)>,
    unmatched: BTreeSet<(u8, i32, i64)>,
    counted: u64,
    duplicate: u64,
}

fn row(start: i64, dims: &str, m: [i64; 5]) -> String {
    let rate = |a: i64, b: i64| {
        if b == 0 {
            "null".to_owned()
        } else {
            format!("{:?}", a as f64 / b as f64)
        }
    };
    format!(
        "{start}|{dims}|{}|{}|{}|{}|{}|{}|{}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        rate(m[1], m[0]),
        rate(m[2], m[1])
    )
}

fn config() -> EngineConfig {
    EngineConfig {
        max_out_of_orderness: OOO,
        allowed_lateness: 0,
        click_window: CLICK_WINDOW,
        conversion_window: CONV_WINDOW,
        window: WINDOW,
        ..Default::default()
    }
}

/// Runs the engine over `streams` in the interleaving chosen by `order_seed`.
fn run_engine(streams: &Streams, order_seed: u64) -> (Result, u64) {
    let mut engine = Engine::new(config(), codec());
    for topic in 0..3u8 {
        for partition in 0..PARTITIONS {
            engine.add_partition(InputPartition { topic, partition });
        }
    }
    let mut cursors: Vec<((u8, i32), usize)> = streams.keys().map(|k| (*k, 0)).collect();
    let mut rng = Rng(order_seed);
    let mut outputs = Vec::new();
    let mut fed = 0u64;
    while !cursors.is_empty() {
        let pick = rng.below(cursors.len() as u64) as usize;
        let ((topic, partition), i) = cursors[pick];
        let r = &streams[&(topic, partition)][i];
        let value = encode(r);
        engine.on_record(
            SourceRef {
                topic,
                partition,
                offset: i as i64,
            },
            Some(r.key().as_bytes()),
            Some(&value),
            None,
        );
        fed += 1;
        outputs.extend(engine.take_outputs());
        if i + 1 == streams[&(topic, partition)].len() {
            cursors.swap_remove(pick);
        } else {
            cursors[pick].1 += 1;
        }
    }
    for topic in 0..3u8 {
        for partition in 0..PARTITIONS {
            engine.set_idle(InputPartition { topic, partition }, true);
        }
    }
    outputs.extend(engine.take_outputs());
    let mut res = collect(outputs);
    let t = engine.stats().total();
    res.counted = t.counted;
    res.duplicate = t.duplicate;
    assert_eq!(t.input, fed);
    (
        res,
        t.input - t.counted - t.late - t.duplicate - t.unmatched - t.dead_letter,
    )
}

/// The engine's outputs, as compared with the model (counters not included).
fn collect(outputs: Vec<Output>) -> Result {
    let mut res = Result::default();
    for o in outputs {
        match o {
            Output::AdMetrics(rows) => {
                for m in rows.to_vec() {
                    let dims = format!("{}|{}|{}", m.campaign_id, m.ad_id, m.ip_range);
                    res.ad_metrics.insert(row(
                        m.window_start,
                        &dims,
                        [
                            m.impressions,
                            m.clicks,
                            m.conversions,
                            m.cost_micros,
                            m.revenue_micros,
                        ],
                    ));
                }
            }
            Output::CampaignCtr(m) => {
                res.campaigns.insert(row(
                    m.window_start,
                    &m.campaign_id,
                    [
                        m.impressions,
                        m.clicks,
                        m.conversions,
                        m.cost_micros,
                        m.revenue_micros,
                    ],
                ));
            }
            Output::Alert(_) => {}
            Output::Partial(_) => panic!("partials never leave a topology"),
            Output::Side { kind, raw, .. } => {
                let k = (raw.source.topic, raw.source.partition, raw.source.offset);
                match kind {
                    SideKind::Late => assert!(res.late.insert(k)),
                    SideKind::Unmatched => assert!(res.unmatched.insert(k)),
                    SideKind::DeadLetter => panic!("no invalid input was generated"),
                }
            }
        }
    }
    res
}

/// Runs the scaled-out topology in one process: one join task per input
/// partition, `rollups` rollup tasks fed through FIFO channels (one per
/// task and rollup, delivered in a random interleaving), and, when
/// `restart_pct` > 0, tasks replaced at random moments by engines restored
/// from their checkpoints (what a crash and a restore on another instance do).
fn run_topology(
    streams: &Streams,
    order_seed: u64,
    rollups: usize,
    restart_pct: u64,
) -> (Result, u64) {
    let tasks = PARTITIONS as usize;
    let mut engines: Vec<Engine> = (0..PARTITIONS)
        .map(|partition| {
            let mut e = Engine::new_task(config(), codec());
            for topic in 0..3u8 {
                e.add_partition(InputPartition { topic, partition });
            }
            e
        })
        .collect();
    let mut rolls: Vec<Rollup> = (0..rollups)
        .map(|_| Rollup::new(&config(), tasks))
        .collect();
    // channels[task][rollup]: messages not yet delivered.
    let mut channels: Vec<Vec<std::collections::VecDeque<Vec<u8>>>> =
        vec![vec![Default::default(); rollups]; tasks];
    let mut rng = Rng(order_seed);
    let mut outputs = Vec::new();
    let route =
        |campaign: &str| (campaign.bytes().map(u64::from).sum::<u64>() % rollups as u64) as usize;
    let publish = |task: usize,
                   e: &mut Engine,
                   channels: &mut Vec<Vec<std::collections::VecDeque<Vec<u8>>>>,
                   outputs: &mut Vec<Output>| {
        for o in e.take_outputs() {
            match o {
                Output::Partial(p) => {
                    let r = route(&p.campaign_id);
                    channels[task][r].push_back(
                        PartialMessage::Cells {
                            task: task as u32,
                            partial: p,
                        }
                        .encode(),
                    );
                }
                other => outputs.push(other),
            }
        }
        let mark = PartialMessage::Mark {
            task: task as u32,
            mark: Mark {
                watermark: e.watermark(),
                idle: e.all_idle(),
                at_ms: 0,
            },
        }
        .encode();
        for ch in channels[task].iter_mut() {
            ch.push_back(mark.clone());
        }
    };
    let deliver = |channels: &mut Vec<Vec<std::collections::VecDeque<Vec<u8>>>>,
                   rolls: &mut Vec<Rollup>,
                   outputs: &mut Vec<Output>,
                   rng: &mut Rng,
                   all: bool| {
        loop {
            let nonempty: Vec<(usize, usize)> = (0..tasks)
                .flat_map(|t| (0..rollups).map(move |r| (t, r)))
                .filter(|(t, r)| !channels[*t][*r].is_empty())
                .collect();
            if nonempty.is_empty() || (!all && rng.chance(50)) {
                return;
            }
            let (t, r) = nonempty[rng.below(nonempty.len() as u64) as usize];
            let bytes = channels[t][r].pop_front().expect("non-empty");
            rolls[r].on_record(&bytes).expect("decodes");
            outputs.extend(rolls[r].take_outputs());
        }
    };
    let mut cursors: Vec<((u8, i32), usize)> = streams.keys().map(|k| (*k, 0)).collect();
    let mut fed = 0u64;
    while !cursors.is_empty() {
        let pick = rng.below(cursors.len() as u64) as usize;
        let ((topic, partition), i) = cursors[pick];
        let r = &streams[&(topic, partition)][i];
        let value = encode(r);
        let task = partition as usize;
        engines[task].on_record(
            SourceRef {
                topic,
                partition,
                offset: i as i64,
            },
            Some(r.key().as_bytes()),
            Some(&value),
            None,
        );
        fed += 1;
        publish(task, &mut engines[task], &mut channels, &mut outputs);
        deliver(&mut channels, &mut rolls, &mut outputs, &mut rng, false);
        let global = rolls.iter().map(Rollup::global).max().unwrap_or(i64::MIN);
        for (t, e) in engines.iter_mut().enumerate() {
            if e.all_idle() {
                e.on_global_watermark(global);
                publish(t, e, &mut channels, &mut outputs);
            }
        }
        if restart_pct > 0 && rng.chance(restart_pct) {
            let cp = engines[task].checkpoint();
            engines[task] = Engine::restore(config(), codec(), &cp).expect("restores");
            let r = rng.below(rollups as u64) as usize;
            rolls[r] = Rollup::restore(&rolls[r].snapshot()).expect("restores");
        }
        if i + 1 == streams[&(topic, partition)].len() {
            cursors.swap_remove(pick);
        } else {
            cursors[pick].1 += 1;
        }
    }
    for (task, e) in engines.iter_mut().enumerate() {
        for topic in 0..3u8 {
            e.set_idle(
                InputPartition {
                    topic,
                    partition: task as i32,
                },
                true,
            );
        }
        publish(task, e, &mut channels, &mut outputs);
    }
    // Everything idle: the global watermark reaches the tasks, they flush,
    // and their raised marks let the rollups close the last windows.
    for _ in 0..2 {
        deliver(&mut channels, &mut rolls, &mut outputs, &mut rng, true);
        let global = rolls.iter().map(Rollup::global).max().unwrap_or(i64::MIN);
        for (task, e) in engines.iter_mut().enumerate() {
            e.on_global_watermark(global);
            publish(task, e, &mut channels, &mut outputs);
        }
    }
    deliver(&mut channels, &mut rolls, &mut outputs, &mut rng, true);
    let mut res = collect(outputs);
    let mut input = 0;
    let mut settled = 0;
    for e in &engines {
        let t = e.stats().total();
        res.counted += t.counted;
        res.duplicate += t.duplicate;
        input += t.input;
        settled += t.counted + t.late + t.duplicate + t.unmatched + t.dead_letter;
    }
    assert_eq!(input, fed);
    (res, input - settled)
}

/// The reference model: a batch computation straight from CONTRACT.md.
fn model(streams: &Streams) -> (Result, u64) {
    let mut res = Result::default();
    let mut kept: Vec<(u8, i32, i64, &Rec)> = Vec::new();
    let mut final_wm = i64::MIN;
    let mut seen: HashSet<(u8, String)> = HashSet::new();
    // Streams are visited in key order; duplicates share a key, hence a
    // partition, so "first occurrence" is the same in every interleaving.
    for ((topic, partition), recs) in streams {
        let mut max_t = i64::MIN;
        for (off, r) in recs.iter().enumerate() {
            let pwm = max_t.saturating_sub(OOO);
            max_t = max_t.max(r.t());
            if r.t() < pwm {
                res.late.insert((*topic, *partition, off as i64));
                continue;
            }
            if !seen.insert((*topic, r.id().to_owned())) {
                res.duplicate += 1;
                continue;
            }
            kept.push((*topic, *partition, off as i64, r));
        }
        final_wm = final_wm.max(max_t.saturating_sub(OOO));
    }
    let imps: HashMap<&str, &Impression> = kept
        .iter()
        .filter_map(|(_, _, _, r)| match r {
            Rec::Imp(i) => Some((i.impression_id.as_str(), i)),
            _ => None,
        })
        .collect();
    let mut matched_clicks: HashMap<&str, (&Click, &Impression)> = HashMap::new();
    let mut cells: BTreeMap<(i64, String, String), [i64; 5]> = BTreeMap::new();
    let mut add = |t: i64, imp: &Impression, d: [i64; 5]| {
        let ip = if imp.user_ip.contains(':') {
            "2001:db8::/48"
        } else {
            "10.0.0.0/24"
        };
        let dims = format!("{}|{}|{}", imp.campaign_id, imp.ad_id, ip);
        let start = t - t.rem_euclid(WINDOW);
        let c = cells
            .entry((start, dims, imp.campaign_id.clone()))
            .or_default();
        for i in 0..5 {
            c[i] += d[i];
        }
    };
    let mut pending = 0u64;
    for (_, _, _, r) in &kept {
        if let Rec::Imp(i) = r {
            add(i.event_time, i, [1, 0, 0, i.cost_micros, 0]);
            res.counted += 1;
        }
    }
    for (topic, partition, off, r) in &kept {
        if let Rec::Click(c) = r {
            match imps.get(c.impression_id.as_str()) {
                Some(i)
                    if i.event_time <= c.event_time
                        && c.event_time <= i.event_time + CLICK_WINDOW =>
                {
                    matched_clicks.insert(&c.click_id, (c, i));
                    add(c.event_time, i, [0, 1, 0, c.cost_micros, 0]);
                    res.counted += 1;
                }
                _ if final_wm > c.event_time => {
                    res.unmatched.insert((*topic, *partition, *off));
                }
                _ => pending += 1,
            }
        }
    }
    for (topic, partition, off, r) in &kept {
        if let Rec::Conv(v) = r {
            match matched_clicks.get(v.click_id.as_str()) {
                Some((c, i))
                    if c.event_time <= v.event_time
                        && v.event_time <= c.event_time + CONV_WINDOW =>
                {
                    add(v.event_time, i, [0, 0, 1, 0, v.revenue_micros]);
                    res.counted += 1;
                }
                _ if final_wm > v.event_time => {
                    res.unmatched.insert((*topic, *partition, *off));
                }
                _ => pending += 1,
            }
        }
    }
    let mut campaigns: BTreeMap<(i64, String), [i64; 5]> = BTreeMap::new();
    for ((start, dims, campaign), m) in &cells {
        if start + WINDOW > final_wm {
            continue;
        }
        res.ad_metrics.insert(row(*start, dims, *m));
        let c = campaigns.entry((*start, campaign.clone())).or_default();
        for i in 0..5 {
            c[i] += m[i];
        }
    }
    for ((start, campaign), m) in campaigns {
        res.campaigns.insert(row(start, &campaign, m));
    }
    (res, pending)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn engine_equals_model_in_any_interleaving(seed in any::<u64>(), order_a in any::<u64>(), order_b in any::<u64>()) {
        let streams = generate(seed);
        let (want, want_pending) = model(&streams);
        let (got_a, pending_a) = run_engine(&streams, order_a);
        let (got_b, pending_b) = run_engine(&streams, order_b);
        prop_assert_eq!(&got_a, &want);
        prop_assert_eq!(pending_a, want_pending);
        prop_assert_eq!(&got_b, &got_a);
        prop_assert_eq!(pending_b, pending_a);
    }

    #[test]
    fn join_tasks_and_rollups_equal_the_model(seed in any::<u64>(), order in any::<u64>(), rollups in 1usize..4) {
        let streams = generate(seed);
        let (want, want_pending) = model(&streams);
        let (got, pending) = run_topology(&streams, order, rollups, 0);
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(pending, want_pending);
    }

    #[test]
    fn tasks_restored_from_checkpoints_equal_the_model(seed in any::<u64>(), order in any::<u64>()) {
        let streams = generate(seed);
        let (want, want_pending) = model(&streams);
        let (got, pending) = run_topology(&streams, order, 2, 5);
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(pending, want_pending);
    }
}

/// The generated streams exercise every outcome (so the property is not vacuous).
#[test]
fn generated_streams_cover_every_outcome() {
    let mut total = Result::default();
    let mut pending = 0;
    for seed in 0..64 {
        let (r, p) = model(&generate(seed));
        total.ad_metrics.extend(r.ad_metrics);
        total.late.extend(
            r.late
                .iter()
                .map(|(t, p, o)| (*t, *p, *o + seed as i64 * 1_000_000)),
        );
        total.unmatched.extend(
            r.unmatched
                .iter()
                .map(|(t, p, o)| (*t, *p, *o + seed as i64 * 1_000_000)),
        );
        total.duplicate += r.duplicate;
        total.counted += r.counted;
        pending += p;
    }
    assert!(total.ad_metrics.len() > 100);
    assert!(!total.late.is_empty());
    assert!(!total.unmatched.is_empty());
    assert!(total.duplicate > 0);
    assert!(pending > 0);
    assert!(total.ad_metrics.iter().any(|r| r.contains("2001:db8::/48")));
}
