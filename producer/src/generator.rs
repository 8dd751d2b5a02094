//! Deterministic ad-traffic generator: the same [`GeneratorConfig`] yields the
//! same records in the same order, on any machine.
//!
//! Model: impressions arrive at `event_rate` per second of event time. Each
//! picks a campaign, ad, keyword and user from skewed (Zipf) popularity; the
//! user fixes the IP address, state and device. A campaign has its own click
//! and conversion probabilities (scaled by any labelled episode covering the
//! event time), so clicks follow after seconds to minutes and conversions
//! after minutes to hours, and a small share falls beyond the contract's join
//! windows.
//!
//! Ordering: every record gets an emit time `event_time + U[0, max_disorder]`
//! and records leave in emit-time order, so within any partition a record is
//! never more than `max_disorder` older than one sent before it. Late records
//! are the deliberate exception: their emit time is pushed past that bound.
//! Records are emitted only once the impression clock has passed their emit
//! time, which is safe because no later impression can schedule anything
//! earlier than its own event time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use adstream_schemas::{Click, Conversion, Impression};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use rand_pcg::Pcg64Mcg;

use crate::scenario::{Episode, Metric};

/// Which input topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputTopic {
    Impressions,
    Clicks,
    Conversions,
}

impl InputTopic {
    pub const ALL: [InputTopic; 3] = [
        InputTopic::Impressions,
        InputTopic::Clicks,
        InputTopic::Conversions,
    ];

    /// CONTRACT.md's topic name (before any test prefix).
    pub fn name(self) -> &'static str {
        match self {
            InputTopic::Impressions => adstream_schemas::topics::IMPRESSIONS,
            InputTopic::Clicks => adstream_schemas::topics::CLICKS,
            InputTopic::Conversions => adstream_schemas::topics::CONVERSIONS,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// How an undecodable record is broken. Semantically invalid but decodable
/// records are ordinary [`Payload`]s with a bad field (see [`Payload::label`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// Bytes that are not Confluent wire format at all (e.g. JSON).
    NotAvro(Vec<u8>),
    /// A valid record framed with a magic byte other than 0.
    WrongMagicByte(Box<Payload>),
    /// A valid record framed with a schema id the registry never issued.
    UnknownSchemaId(Box<Payload>),
    /// A valid record cut short after `keep` body bytes.
    Truncated { payload: Box<Payload>, keep: usize },
    /// A valid record of another topic's schema (e.g. a click on the impressions topic).
    WrongRecord(Box<Payload>),
}

impl Broken {
    pub fn reason(&self) -> &'static str {
        match self {
            Broken::NotAvro(_) => "not-avro",
            Broken::WrongMagicByte(_) => "wrong-magic-byte",
            Broken::UnknownSchemaId(_) => "unknown-schema-id",
            Broken::Truncated { .. } => "truncated",
            Broken::WrongRecord(_) => "wrong-schema",
        }
    }
}

/// A record's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Impression(Impression),
    Click(Click),
    Conversion(Conversion),
    Broken(Broken),
}

/// One record to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedRecord {
    pub topic: InputTopic,
    pub key: String,
    pub payload: Payload,
    /// What the generator meant this record to exercise (for summaries only;
    /// the oracle must not use it).
    pub label: Label,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Label {
    Normal,
    Duplicate,
    Late,
    Orphan,
    BeyondWindow,
    Invalid,
}

impl Label {
    pub fn name(self) -> &'static str {
        match self {
            Label::Normal => "normal",
            Label::Duplicate => "duplicate",
            Label::Late => "late",
            Label::Orphan => "orphan",
            Label::BeyondWindow => "beyond-window",
            Label::Invalid => "invalid",
        }
    }
}

/// Every knob of the generator. Probabilities are per impression unless noted.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub seed: u64,
    pub start_time_ms: i64,
    /// Impressions per second of event time.
    pub event_rate: f64,
    pub campaigns: usize,
    pub max_ads_per_campaign: usize,
    pub keywords: usize,
    pub users: usize,
    /// Share of users on IPv6.
    pub ipv6_share: f64,
    /// Probability that a record is sent twice.
    pub duplicate_rate: f64,
    /// Bound on out-of-order delay of on-time records, in ms.
    pub max_disorder_ms: i64,
    /// Probability that a record is sent late, beyond the disorder bound.
    pub late_rate: f64,
    /// How far beyond the disorder bound a late record may fall, in ms.
    pub max_lateness_ms: i64,
    pub orphan_click_rate: f64,
    pub orphan_conversion_rate: f64,
    /// Probability of an undecodable or invalid record.
    pub invalid_rate: f64,
    /// Share of clicks and conversions delayed past the join windows.
    pub beyond_window_rate: f64,
    pub click_window_ms: i64,
    pub conversion_window_ms: i64,
    pub episodes: Vec<Episode>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 1,
            start_time_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            event_rate: 100.0,
            campaigns: 40,
            max_ads_per_campaign: 8,
            keywords: 400,
            users: 200_000,
            ipv6_share: 0.2,
            duplicate_rate: 0.01,
            max_disorder_ms: 3_000,
            late_rate: 0.002,
            max_lateness_ms: 600_000,
            orphan_click_rate: 0.002,
            orphan_conversion_rate: 0.001,
            invalid_rate: 0.001,
            beyond_window_rate: 0.01,
            click_window_ms: 30 * 60_000,
            conversion_window_ms: 24 * 3_600_000,
            episodes: Vec::new(),
        }
    }
}

/// A campaign's fixed traits, drawn from the seed.
#[derive(Debug, Clone)]
pub struct CampaignProfile {
    pub id: String,
    pub ctr: f64,
    pub cvr: f64,
    pub ads: Vec<String>,
    pub impression_cost_micros: i64,
    pub click_cost_micros: i64,
    pub order_value_micros: i64,
}

const ADJECTIVES: [&str; 24] = [
    "cheap",
    "best",
    "organic",
    "used",
    "wireless",
    "luxury",
    "vintage",
    "kids",
    "smart",
    "portable",
    "waterproof",
    "electric",
    "handmade",
    "discount",
    "premium",
    "compact",
    "classic",
    "eco",
    "gaming",
    "outdoor",
    "mens",
    "womens",
    "refurbished",
    "local",
];
const NOUNS: [&str; 24] = [
    "running shoes",
    "headphones",
    "coffee",
    "laptop",
    "sofa",
    "tent",
    "bike",
    "watch",
    "camera",
    "blender",
    "backpack",
    "jacket",
    "mattress",
    "phone case",
    "sunglasses",
    "desk",
    "guitar",
    "drone",
    "vacuum",
    "skincare",
    "flights",
    "hotel",
    "insurance",
    "pizza",
];
const STATES: [&str; 51] = [
    "US-CA", "US-TX", "US-FL", "US-NY", "US-PA", "US-IL", "US-OH", "US-GA", "US-NC", "US-MI",
    "US-NJ", "US-VA", "US-WA", "US-AZ", "US-TN", "US-MA", "US-IN", "US-MD", "US-MO", "US-WI",
    "US-CO", "US-MN", "US-SC", "US-AL", "US-LA", "US-KY", "US-OR", "US-OK", "US-CT", "US-UT",
    "US-IA", "US-NV", "US-AR", "US-KS", "US-MS", "US-NM", "US-NE", "US-ID", "US-WV", "US-HI",
    "US-NH", "US-ME", "US-MT", "US-RI", "US-DE", "US-SD", "US-ND", "US-AK", "US-DC", "US-VT",
    "US-WY",
];
/// Device mix in percent: desktop, mobile, tablet, ctv, other.
const DEVICES: [(&str, u64); 5] = [
    ("desktop", 42),
    ("mobile", 44),
    ("tablet", 8),
    ("ctv", 4),
    ("other", 2),
];

/// SplitMix64: a fixed, well-mixed hash of a counter, used for ids and per-user traits.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Traits of a user, a pure function of (seed, user index).
#[derive(Clone)]
struct UserTraits {
    ip: String,
    state: &'static str,
    device: &'static str,
}

fn user_traits(seed: u64, user: u64, ipv6_share: f64) -> UserTraits {
    let h = mix(seed ^ mix(user));
    // Users come in households/offices of up to 8 sharing a /24 or /48.
    let site = mix(seed ^ mix(user / 8) ^ 0x5173);
    let ip = if ((site >> 8) % 10_000) as f64 / 10_000.0 < ipv6_share {
        Ipv6Addr::new(
            0x2001,
            0x0db8 + (site % 4) as u16,
            (site >> 16) as u16,
            (h >> 16) as u16 & 0x00ff,
            0,
            0,
            (h >> 32) as u16,
            (h >> 48) as u16 | 1,
        )
        .to_string()
    } else {
        let a = 11 + (site % 200) as u8;
        Ipv4Addr::new(
            a,
            (site >> 16) as u8,
            (site >> 24) as u8,
            1 + (h % 254) as u8,
        )
        .to_string()
    };
    // Zipf-like state skew: square a uniform to favour the first (largest) states.
    let u = ((h >> 20) % 1_000_000) as f64 / 1_000_000.0;
    let state = STATES[((u * u) * STATES.len() as f64) as usize % STATES.len()];
    let mut d = (h >> 40) % 100;
    let mut device = DEVICES[0].0;
    for (name, pct) in DEVICES {
        if d < pct {
            device = name;
            break;
        }
        d -= pct;
    }
    UserTraits { ip, state, device }
}

/// Zipf(s) over ranks 1..=n by inverse CDF: one uniform draw and a binary
/// search, instead of rejection sampling's powers and logarithms per draw.
struct ZipfTable {
    cdf: Vec<f64>,
}

impl ZipfTable {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                acc += (k as f64).powf(-s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        ZipfTable { cdf }
    }

    /// A rank in `1..=n`.
    fn sample(&self, rng: &mut Pcg64Mcg) -> usize {
        let u: f64 = rng.random();
        self.cdf
            .partition_point(|c| *c <= u)
            .min(self.cdf.len() - 1)
            + 1
    }
}

/// Scheduled record, ordered by (emit time, sequence number).
struct Pending {
    emit_at: i64,
    seq: u64,
    // Boxed so heap sifts move 24 bytes, not a whole record.
    record: Box<GeneratedRecord>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.emit_at, self.seq) == (other.emit_at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.emit_at, self.seq).cmp(&(other.emit_at, other.seq))
    }
}

/// The generator: an iterator of records in send order.
pub struct Generator {
    cfg: GeneratorConfig,
    rng: Pcg64Mcg,
    campaigns: Vec<CampaignProfile>,
    campaign_zipf: ZipfTable,
    ad_zipf: Vec<ZipfTable>,
    keyword_zipf: ZipfTable,
    user_zipf: ZipfTable,
    keywords: Vec<String>,
    click_delay: LogNormal<f64>,
    conversion_delay: LogNormal<f64>,
    heap: BinaryHeap<Reverse<Pending>>,
    /// Memo of [`user_traits`] and user ids (pure functions, so caching cannot change output).
    users: std::collections::HashMap<u64, (UserTraits, String)>,
    seq: u64,
    impressions: u64,
    ids: u64,
    /// Impression clock: event time of the next impression.
    clock: i64,
    clock_f: f64,
    /// Stop scheduling after this many records (None: unbounded).
    limit: Option<u64>,
    scheduled: u64,
    emitted: u64,
}

impl Generator {
    pub fn new(cfg: GeneratorConfig, limit: Option<u64>) -> Self {
        let mut rng = Pcg64Mcg::seed_from_u64(cfg.seed);
        let campaigns = (0..cfg.campaigns.max(1))
            .map(|i| {
                let n_ads = rng.random_range(1..=cfg.max_ads_per_campaign.max(1));
                let ctr = (rng.random_range(0.01f64.ln()..0.08f64.ln())).exp();
                let cvr = (rng.random_range(0.03f64.ln()..0.15f64.ln())).exp();
                CampaignProfile {
                    id: format!("cmp-{:04}", i + 1),
                    ctr,
                    cvr,
                    ads: (0..n_ads)
                        .map(|a| format!("ad-{:04}-{:02}", i + 1, a + 1))
                        .collect(),
                    impression_cost_micros: rng.random_range(200..5_000),
                    click_cost_micros: rng.random_range(50_000..2_500_000),
                    order_value_micros: rng.random_range(5_000_000..150_000_000),
                }
            })
            .collect::<Vec<_>>();
        let zipf = ZipfTable::new;
        let ad_zipf = campaigns.iter().map(|c| zipf(c.ads.len(), 1.2)).collect();
        let keywords = (0..cfg.keywords.max(1))
            .map(|i| {
                let adj = ADJECTIVES[(mix(cfg.seed ^ i as u64) % ADJECTIVES.len() as u64) as usize];
                let noun = NOUNS[i % NOUNS.len()];
                if i < NOUNS.len() {
                    noun.to_owned()
                } else {
                    format!("{adj} {noun}")
                }
            })
            .collect::<Vec<_>>();
        Generator {
            campaign_zipf: zipf(campaigns.len(), 0.8),
            ad_zipf,
            keyword_zipf: zipf(keywords.len(), 1.05),
            user_zipf: zipf(cfg.users.max(1), 0.9),
            click_delay: LogNormal::new((15_000f64).ln(), 1.0).expect("valid lognormal"),
            conversion_delay: LogNormal::new((20.0 * 60_000f64).ln(), 1.2)
                .expect("valid lognormal"),
            clock: cfg.start_time_ms,
            clock_f: cfg.start_time_ms as f64,
            keywords,
            campaigns,
            rng,
            cfg,
            heap: BinaryHeap::new(),
            users: std::collections::HashMap::new(),
            seq: 0,
            impressions: 0,
            ids: 0,
            limit,
            scheduled: 0,
            emitted: 0,
        }
    }

    pub fn campaigns(&self) -> &[CampaignProfile] {
        &self.campaigns
    }

    /// Event time of the next impression.
    pub fn clock_ms(&self) -> i64 {
        self.clock
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.ids += 1;
        let mut s = String::with_capacity(prefix.len() + 17);
        s.push_str(prefix);
        let _ = write!(s, "{:016x}", mix(self.cfg.seed.rotate_left(17) ^ self.ids));
        s
    }

    fn factor(&self, campaign: &str, metric: Metric, t: i64) -> f64 {
        self.cfg
            .episodes
            .iter()
            .filter(|e| {
                e.metric == metric && e.campaign == campaign && (e.start_ms..e.end_ms).contains(&t)
            })
            .map(|e| e.factor)
            .product()
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }

    /// Schedules `record` (and maybe a duplicate of it) by its event time.
    fn schedule(&mut self, event_time: i64, record: GeneratedRecord) {
        let max_disorder = self.cfg.max_disorder_ms.max(0);
        let (emit_at, record) = if record.label == Label::Normal && self.chance(self.cfg.late_rate)
        {
            let beyond = self
                .rng
                .random_range(1_000..=self.cfg.max_lateness_ms.max(1_001));
            (
                event_time + max_disorder + beyond,
                GeneratedRecord {
                    label: Label::Late,
                    ..record
                },
            )
        } else {
            (event_time + self.rng.random_range(0..=max_disorder), record)
        };
        if !matches!(record.payload, Payload::Broken(_)) && self.chance(self.cfg.duplicate_rate) {
            let again = event_time + self.rng.random_range(0..=max_disorder);
            let dup = GeneratedRecord {
                label: Label::Duplicate,
                ..record.clone()
            };
            self.push(again, dup);
        }
        self.push(emit_at, record);
    }

    fn push(&mut self, emit_at: i64, record: GeneratedRecord) {
        self.seq += 1;
        self.scheduled += 1;
        self.heap.push(Reverse(Pending {
            emit_at,
            seq: self.seq,
            record: Box::new(record),
        }));
    }

    /// Generates one impression with everything that follows from it.
    fn generate_impression(&mut self) {
        let t = self.clock;
        self.impressions += 1;
        // Exponential inter-arrival keeps the mean rate without lock-step times.
        let gap = -(1.0 - self.rng.random::<f64>()).ln() * 1_000.0 / self.cfg.event_rate.max(1e-9);
        self.clock_f += gap;
        self.clock = self.clock_f as i64;

        let ci = self.campaign_zipf.sample(&mut self.rng) - 1;
        let ai = self.ad_zipf[ci].sample(&mut self.rng) - 1;
        // Each campaign favours its own keywords: rotate the Zipf ranks.
        let kr = self.keyword_zipf.sample(&mut self.rng) - 1;
        let ki = (kr + ci * 37) % self.keywords.len();
        let user = self.user_zipf.sample(&mut self.rng) as u64 - 1;
        let (seed, share) = (self.cfg.seed, self.cfg.ipv6_share);
        let (traits, user_id) = self
            .users
            .entry(user)
            .or_insert_with(|| (user_traits(seed, user, share), format!("u-{user:07}")))
            .clone();
        let campaign = &self.campaigns[ci];
        let campaign_id = campaign.id.clone();
        let (imp_cost, click_cost, order_value) = (
            campaign.impression_cost_micros,
            campaign.click_cost_micros,
            campaign.order_value_micros,
        );
        let (base_ctr, base_cvr) = (campaign.ctr, campaign.cvr);
        let ad_id = campaign.ads[ai].clone();
        let impression_id = self.next_id("imp-");
        let mut metadata = std::collections::BTreeMap::new();
        if self.rng.random::<f64>() < 0.3 {
            metadata.insert(
                "placement".to_owned(),
                if self.rng.random::<bool>() {
                    "top"
                } else {
                    "side"
                }
                .to_owned(),
            );
        }
        let imp = Impression {
            impression_id: impression_id.clone(),
            event_time: t,
            campaign_id: campaign_id.clone(),
            ad_id,
            search_keyword: self.keywords[ki].clone(),
            user_id,
            user_ip: traits.ip.clone(),
            state: traits.state.to_owned(),
            device_type: traits.device.to_owned(),
            cost_micros: imp_cost * self.rng.random_range(80..=120) / 100,
            metadata,
        };
        self.schedule(
            t,
            GeneratedRecord {
                topic: InputTopic::Impressions,
                key: impression_id.clone(),
                payload: Payload::Impression(imp),
                label: Label::Normal,
            },
        );

        let p_click = (base_ctr * self.factor(&campaign_id, Metric::Ctr, t)).min(1.0);
        let clicks = if self.chance(p_click) {
            if self.chance(0.05) {
                2
            } else {
                1
            }
        } else {
            0
        };
        for _ in 0..clicks {
            let (delay, label) = if self.chance(self.cfg.beyond_window_rate) {
                (
                    self.cfg.click_window_ms + self.rng.random_range(1..600_000),
                    Label::BeyondWindow,
                )
            } else {
                let d = self.click_delay.sample(&mut self.rng) as i64;
                (
                    d.clamp(200, self.cfg.click_window_ms * 9 / 10),
                    Label::Normal,
                )
            };
            let ct = t + delay;
            let click_id = self.next_id("clk-");
            let user_ip = if self.chance(0.05) {
                user_traits(self.cfg.seed, user + 1, self.cfg.ipv6_share).ip
            } else {
                traits.ip.clone()
            };
            let cost_micros = click_cost * self.rng.random_range(80..=120) / 100;
            self.schedule(
                ct,
                GeneratedRecord {
                    topic: InputTopic::Clicks,
                    key: impression_id.clone(),
                    payload: Payload::Click(Click {
                        click_id: click_id.clone(),
                        impression_id: impression_id.clone(),
                        event_time: ct,
                        user_ip,
                        cost_micros,
                    }),
                    label,
                },
            );
            let p_conv =
                (base_cvr * self.factor(&campaign_id, Metric::ConversionRate, ct)).min(1.0);
            if self.chance(p_conv) {
                let (delay, label) = if self.chance(self.cfg.beyond_window_rate) {
                    (
                        self.cfg.conversion_window_ms + self.rng.random_range(1..3_600_000),
                        Label::BeyondWindow,
                    )
                } else {
                    let d = self.conversion_delay.sample(&mut self.rng) as i64;
                    (
                        d.clamp(1_000, self.cfg.conversion_window_ms * 9 / 10),
                        Label::Normal,
                    )
                };
                let vt = ct + delay;
                let kinds = ["purchase", "purchase", "purchase", "signup", "lead"];
                let conversion_type = kinds[self.rng.random_range(0..kinds.len())].to_owned();
                let conversion_id = self.next_id("cnv-");
                let revenue_micros = order_value * self.rng.random_range(50..=200) / 100;
                self.schedule(
                    vt,
                    GeneratedRecord {
                        topic: InputTopic::Conversions,
                        key: impression_id.clone(),
                        payload: Payload::Conversion(Conversion {
                            conversion_id,
                            click_id,
                            impression_id: impression_id.clone(),
                            event_time: vt,
                            conversion_type,
                            revenue_micros,
                        }),
                        label,
                    },
                );
            }
        }

        if self.chance(self.cfg.orphan_click_rate) {
            let ghost = self.next_id("imp-");
            let click = Click {
                click_id: self.next_id("clk-"),
                impression_id: ghost.clone(),
                event_time: t,
                user_ip: traits.ip.clone(),
                cost_micros: click_cost,
            };
            self.schedule(
                t,
                GeneratedRecord {
                    topic: InputTopic::Clicks,
                    key: ghost,
                    payload: Payload::Click(click),
                    label: Label::Orphan,
                },
            );
        }
        if self.chance(self.cfg.orphan_conversion_rate) {
            // A conversion of a click that never came, on a real impression.
            let conv = Conversion {
                conversion_id: self.next_id("cnv-"),
                click_id: self.next_id("clk-"),
                impression_id: impression_id.clone(),
                event_time: t + 60_000,
                conversion_type: "purchase".to_owned(),
                revenue_micros: order_value,
            };
            self.schedule(
                t + 60_000,
                GeneratedRecord {
                    topic: InputTopic::Conversions,
                    key: impression_id.clone(),
                    payload: Payload::Conversion(conv),
                    label: Label::Orphan,
                },
            );
        }
        if self.chance(self.cfg.invalid_rate) {
            let record = self.invalid_record(t, &impression_id, &campaign_id, &traits);
            self.schedule(t, record);
        }
    }

    /// An invalid record of one of several kinds; roughly half are undecodable,
    /// half decode but fail validation.
    fn invalid_record(
        &mut self,
        t: i64,
        impression_id: &str,
        campaign_id: &str,
        traits: &UserTraits,
    ) -> GeneratedRecord {
        let click = Click {
            click_id: self.next_id("clk-"),
            impression_id: impression_id.to_owned(),
            event_time: t,
            user_ip: traits.ip.clone(),
            cost_micros: 1_000,
        };
        let imp = Impression {
            impression_id: self.next_id("imp-"),
            event_time: t,
            campaign_id: campaign_id.to_owned(),
            ad_id: "ad-0000-00".to_owned(),
            search_keyword: "invalid".to_owned(),
            user_id: "u-invalid".to_owned(),
            user_ip: traits.ip.clone(),
            state: traits.state.to_owned(),
            device_type: traits.device.to_owned(),
            cost_micros: 100,
            metadata: Default::default(),
        };
        let kind = self.rng.random_range(0..9);
        let (topic, key, payload) = match kind {
            0 => (
                InputTopic::Impressions,
                impression_id.to_owned(),
                Payload::Broken(Broken::NotAvro(
                    format!("{{\"impression_id\":\"{impression_id}\",\"event_time\":{t}}}")
                        .into_bytes(),
                )),
            ),
            1 => (
                InputTopic::Clicks,
                impression_id.to_owned(),
                Payload::Broken(Broken::WrongMagicByte(Box::new(Payload::Click(click)))),
            ),
            2 => (
                InputTopic::Clicks,
                impression_id.to_owned(),
                Payload::Broken(Broken::UnknownSchemaId(Box::new(Payload::Click(click)))),
            ),
            3 => {
                let keep = self.rng.random_range(0..20);
                (
                    InputTopic::Impressions,
                    imp.impression_id.clone(),
                    Payload::Broken(Broken::Truncated {
                        payload: Box::new(Payload::Impression(imp)),
                        keep,
                    }),
                )
            }
            4 => (
                InputTopic::Impressions,
                impression_id.to_owned(),
                Payload::Broken(Broken::WrongRecord(Box::new(Payload::Click(click)))),
            ),
            // Decodable but invalid: negative cost, bad IP, unknown device, empty id.
            5 => (
                InputTopic::Impressions,
                imp.impression_id.clone(),
                Payload::Impression(Impression {
                    cost_micros: -5,
                    ..imp
                }),
            ),
            6 => (
                InputTopic::Impressions,
                imp.impression_id.clone(),
                Payload::Impression(Impression {
                    user_ip: "999.1.2.3".to_owned(),
                    ..imp
                }),
            ),
            7 => (
                InputTopic::Impressions,
                imp.impression_id.clone(),
                Payload::Impression(Impression {
                    device_type: "toaster".to_owned(),
                    ..imp
                }),
            ),
            _ => (
                InputTopic::Clicks,
                impression_id.to_owned(),
                Payload::Click(Click {
                    click_id: String::new(),
                    ..click
                }),
            ),
        };
        GeneratedRecord {
            topic,
            key,
            payload,
            label: Label::Invalid,
        }
    }

    /// Records generated so far, including ones not yet emitted.
    pub fn scheduled(&self) -> u64 {
        self.scheduled
    }
}

impl Iterator for Generator {
    type Item = GeneratedRecord;

    fn next(&mut self) -> Option<GeneratedRecord> {
        if self.limit.is_some_and(|l| self.emitted >= l) {
            return None;
        }
        loop {
            let exhausted = self.limit.is_some_and(|l| self.scheduled >= l);
            if let Some(Reverse(top)) = self.heap.peek() {
                if exhausted || top.emit_at <= self.clock {
                    let Reverse(p) = self.heap.pop().expect("peeked");
                    self.emitted += 1;
                    return Some(*p.record);
                }
            } else if exhausted {
                return None;
            }
            self.generate_impression();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn records(cfg: GeneratorConfig, n: u64) -> Vec<GeneratedRecord> {
        Generator::new(cfg, Some(n)).collect()
    }

    fn event_time(p: &Payload) -> Option<i64> {
        match p {
            Payload::Impression(i) => Some(i.event_time),
            Payload::Click(c) => Some(c.event_time),
            Payload::Conversion(c) => Some(c.event_time),
            Payload::Broken(_) => None,
        }
    }

    #[test]
    fn same_seed_same_records() {
        let a = records(GeneratorConfig::default(), 20_000);
        let b = records(GeneratorConfig::default(), 20_000);
        assert_eq!(a.len(), 20_000);
        assert_eq!(a, b);
        let c = records(
            GeneratorConfig {
                seed: 2,
                ..Default::default()
            },
            20_000,
        );
        assert_ne!(a, c);
    }

    #[test]
    fn disorder_is_bounded_except_for_late_records() {
        let cfg = GeneratorConfig {
            max_disorder_ms: 2_000,
            ..Default::default()
        };
        let mut max_seen: HashMap<InputTopic, i64> = HashMap::new();
        let mut late_beyond = 0;
        for r in records(cfg, 50_000) {
            let Some(t) = event_time(&r.payload) else {
                continue;
            };
            let m = max_seen.entry(r.topic).or_insert(i64::MIN);
            if t < m.saturating_sub(2_000) {
                assert_eq!(
                    r.label,
                    Label::Late,
                    "only late records break the bound: {r:?}"
                );
                late_beyond += 1;
            }
            *m = (*m).max(t);
        }
        assert!(late_beyond > 0, "some late records fall beyond the bound");
    }

    #[test]
    fn every_hard_case_appears() {
        let cfg = GeneratorConfig {
            duplicate_rate: 0.02,
            late_rate: 0.01,
            orphan_click_rate: 0.01,
            orphan_conversion_rate: 0.01,
            invalid_rate: 0.01,
            ..Default::default()
        };
        let mut counts: HashMap<Label, usize> = HashMap::new();
        let mut topics: HashMap<InputTopic, usize> = HashMap::new();
        for r in records(cfg, 100_000) {
            *counts.entry(r.label).or_default() += 1;
            *topics.entry(r.topic).or_default() += 1;
        }
        for label in [
            Label::Normal,
            Label::Duplicate,
            Label::Late,
            Label::Orphan,
            Label::BeyondWindow,
            Label::Invalid,
        ] {
            assert!(
                counts.get(&label).copied().unwrap_or(0) > 0,
                "{label:?} missing: {counts:?}"
            );
        }
        for t in InputTopic::ALL {
            assert!(topics.get(&t).copied().unwrap_or(0) > 0, "{t:?} missing");
        }
    }

    #[test]
    fn clicks_follow_their_impression() {
        let mut imp_time = HashMap::new();
        for r in records(
            GeneratorConfig {
                late_rate: 0.0,
                ..Default::default()
            },
            50_000,
        ) {
            match (&r.payload, r.label) {
                (Payload::Impression(i), _) => {
                    imp_time.insert(i.impression_id.clone(), i.event_time);
                }
                (Payload::Click(c), Label::Normal) => {
                    if let Some(t) = imp_time.get(&c.impression_id) {
                        assert!(c.event_time >= *t && c.event_time <= t + 30 * 60_000);
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn spike_episode_raises_ctr() {
        let base = GeneratorConfig {
            campaigns: 3,
            duplicate_rate: 0.0,
            ..Default::default()
        };
        let ep = Episode {
            campaign: "cmp-0001".to_owned(),
            metric: Metric::Ctr,
            kind: crate::scenario::Kind::Spike,
            start_ms: base.start_time_ms,
            end_ms: base.start_time_ms + 3_600_000,
            factor: 5.0,
        };
        let ctr = |cfg: GeneratorConfig| {
            let (mut imps, mut clicks) = (0.0, 0.0);
            for r in records(cfg, 60_000) {
                match &r.payload {
                    Payload::Impression(i) if i.campaign_id == "cmp-0001" => imps += 1.0,
                    Payload::Click(_) if r.label == Label::Normal && r.key.starts_with("imp-") => {
                        clicks += 1.0
                    }
                    _ => {}
                }
            }
            clicks / imps
        };
        let steady = ctr(base.clone());
        let spiked = ctr(GeneratorConfig {
            episodes: vec![ep],
            ..base
        });
        assert!(spiked > steady * 1.5, "steady {steady} spiked {spiked}");
    }

    #[test]
    fn user_traits_are_valid() {
        for u in 0..5_000 {
            let t = user_traits(7, u, 0.3);
            assert!(t.ip.parse::<std::net::IpAddr>().is_ok(), "{}", t.ip);
            assert!(STATES.contains(&t.state));
        }
    }
}
