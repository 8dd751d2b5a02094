//! Chaos (issue 7): exactly-once under kill -9, scale-out and a paused
//! (zombie) instance, through processor and sink.
//!
//! Seeded events are produced once. Processor *processes* (the real binary)
//! run in one consumer group and one `adstream-sink all` process loads the
//! results into PostgreSQL and every topic into object storage. At random
//! moments the test kills (SIGKILL) a random processor or sink instance and
//! restarts it (a processor under the same instance id), scales the
//! processors 1 → 3 → 1, and pauses one processor with SIGSTOP past its
//! session timeout (the zombie: it must refuse to commit when resumed).
//! Once, it also closes every client's connections to the broker (`ss -K`,
//! as a broker restart would): no instance may stop on that.
//! At the end:
//! - the result and side-output topics, read with `read_committed`, hold
//!   exactly the oracle's rows and records (which also shows no input record
//!   was lost or counted twice: the counts inside the rows and the late,
//!   unmatched and dead-letter sets all match);
//! - PostgreSQL holds exactly the oracle's rows;
//! - storage holds every Kafka record of the six topics exactly once.
//!
//! It prints the recovery time of every kill (restart → next committed output).
//!
//! Scale-in kills instances 1 and 2 for good. Their open transactions hold
//! back the last stable offset until the broker aborts them after
//! `transaction.timeout.ms`; tansu did not (measured: every `read_committed`
//! reader stalled for minutes), so the test then fences the two dead
//! transactional ids, as a replacement instance would.
//!
//! tansu can also freeze for good: with several instances committing
//! transactions that share partitions (every instance writes every partials
//! partition), its EndTxn can acknowledge a commit and leave the
//! transaction unfinished (a race between one EndTxn's marker writes and
//! another's completion, read in its source, `dynostore.rs` `txn_end`). The
//! group's offsets then stop moving and `read_committed` readers of those
//! partitions see nothing more, whatever the clients do (a fresh
//! InitProducerId does not clear it). Seen in one of six local runs on 2026-11-27.
//! When the end of a run stalls with that signature (`broker_froze`), the
//! test says so and runs the whole scenario once more on new topics; any
//! other stall, or a second freeze, fails.
//!
//! On Apache Kafka (`ADSTREAM_BROKER_FENCES=1`, and a probe confirms the
//! broker hides aborted records) every (window, key) must appear once in the
//! topics. tansu neither fences a stale member's transactional offset commit
//! nor hides aborted records (STACK.md), so there the test proves what it
//! can: the distinct rows and side outputs equal the oracle's, every extra
//! copy is byte-identical to the first (a deterministic replay), and it
//! reports how many extra copies it saw.
//!
//! Sizes: `ADSTREAM_CHAOS_EVENTS` (default 200 000), produced at an even
//! pace over `ADSTREAM_CHAOS_PRODUCE_SECS` (default 90) while the faults
//! happen, and `ADSTREAM_CHAOS_KILLS` (default 8); `make chaos` runs 1 000 000 events
//! and 24 kills. The processor binary must be built (`make test` and
//! `make chaos` build it).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adstream_producer::generator::GeneratorConfig;
use std::sync::atomic::AtomicBool;

use adstream_producer::{parse_time_ms, run as run_producer, RunOptions, Target};
use adstream_testkit::{read_all, unique_prefix, Consumed, Stack};
use common::{
    check_storage, committed_past_all, connect, count_rows, fresh_database, metric_key,
    object_store_url, pg_ad_metrics, pg_campaigns, stored_topics,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("sink/ has a parent")
}

/// The processor binary next to this test's profile directory
/// (target/<profile>/adstream-processor).
fn processor_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("adstream-processor");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p adstream-processor, same profile)",
        bin.display()
    );
    bin
}

/// The last `lines` lines of an instance's log, for a failure message: the
/// log lives in a temporary directory that is gone once the test has failed.
fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("(unreadable: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The id the sink instance has among the cluster's instances.
const SINK: usize = 100;

/// A small deterministic random source (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Instance {
    id: usize,
    child: Child,
    log: PathBuf,
    started: Instant,
}

struct Cluster {
    stack: Stack,
    prefix: String,
    dir: PathBuf,
    db_url: String,
    store_url: String,
    live: BTreeMap<usize, Instance>,
    incarnations: usize,
}

impl Cluster {
    fn spawn_sink(&mut self) {
        self.incarnations += 1;
        let log = self.dir.join(format!("sink-{}.log", self.incarnations));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_adstream-sink"))
            .args(["--metrics-addr", "127.0.0.1:0", "all"])
            .args(["--topic-prefix", &self.prefix])
            .args(["--batch-size", "2000", "--linger", "200ms"])
            .args(["--group", &format!("{}s3", self.prefix)])
            .args(["--max-records", "20000", "--max-open", "2s"])
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.stack.bootstrap)
            .env("SCHEMA_REGISTRY_URL", &self.stack.registry_url)
            .env("DATABASE_URL", &self.db_url)
            .env("OBJECT_STORE_URL", &self.store_url)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("sink binary runs");
        self.live.insert(
            SINK,
            Instance {
                id: SINK,
                child,
                log,
                started: Instant::now(),
            },
        );
    }

    fn spawn(&mut self, id: usize) {
        if id == SINK {
            return self.spawn_sink();
        }
        self.incarnations += 1;
        let log = self
            .dir
            .join(format!("processor-{id}-{}.log", self.incarnations));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(processor_binary())
            .args(["--bootstrap-servers", &self.stack.bootstrap])
            .args(["--schema-registry-url", &self.stack.registry_url])
            .args(["--topic-prefix", &self.prefix])
            .args(["--group-id", &format!("{}processor", self.prefix)])
            .args(["--instance-id", &id.to_string()])
            .args([
                "--state-url",
                &format!("file://{}", self.dir.join("state").display()),
            ])
            .args(["--checkpoint-interval", "3s", "--commit-interval", "1s"])
            // Idleness is wall-clock (CONTRACT.md): a low-rate partition (conversions)
            // quiet for the idle timeout stops holding the watermark back, and its
            // next record may find its window emitted (late), which the oracle
            // cannot model. Input here arrives paced, so the timeout must exceed
            // any gap in it; only the end of the input is meant to be idle.
            .args(["--idle-timeout", "20s", "--metrics-addr", ""])
            .args(["-X", "session.timeout.ms=6000"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("processor binary runs");
        self.live.insert(
            id,
            Instance {
                id,
                child,
                log,
                started: Instant::now(),
            },
        );
    }

    fn kill(&mut self, id: usize) -> Option<Instance> {
        let mut inst = self.live.remove(&id)?;
        let _ = inst.child.kill();
        let _ = inst.child.wait();
        Some(inst)
    }
}

/// A failed or abandoned run leaves no processes behind.
impl Drop for Cluster {
    fn drop(&mut self) {
        for id in self.live.keys().copied().collect::<Vec<_>>() {
            self.kill(id);
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Time from start to the first committed output, from an instance's log.
fn recovery_ms(log: &Path) -> Option<u64> {
    let raw = std::fs::read_to_string(log).ok()?;
    // Drop ANSI colour sequences (ESC '[' ... 'm').
    let mut text = String::with_capacity(raw.len());
    let mut in_escape = false;
    for c in raw.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => text.push(c),
        }
    }
    let line = text
        .lines()
        .find(|l| l.contains("first output committed"))?;
    let v = line.split("since_start_ms=").nth(1)?;
    v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Does this broker hide records of aborted transactions from read_committed readers?
fn broker_hides_aborted(stack: &Stack, prefix: &str) -> bool {
    let probe_topic = format!("{prefix}adstream-processor-state");
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &stack.bootstrap)
        .set("transactional.id", format!("{prefix}probe"))
        .create()
        .expect("producer");
    p.init_transactions(Duration::from_secs(30)).expect("init");
    p.begin_transaction().expect("begin");
    p.send(BaseRecord::<[u8], [u8]>::to(&probe_topic).payload(b"aborted"))
        .map_err(|(e, _)| e)
        .expect("send");
    p.flush(Duration::from_secs(10)).expect("flush");
    p.abort_transaction(Duration::from_secs(30)).expect("abort");
    p.begin_transaction().expect("begin");
    p.send(BaseRecord::<[u8], [u8]>::to(&probe_topic).payload(b"committed"))
        .map_err(|(e, _)| e)
        .expect("send");
    p.commit_transaction(Duration::from_secs(30))
        .expect("commit");
    let seen = read_all(
        &stack.bootstrap,
        &[probe_topic],
        None,
        Duration::from_secs(3),
    );
    !seen
        .iter()
        .any(|r| r.value.as_deref() == Some(&b"aborted"[..]))
}

/// How long after a kill its replacement starts (or, at scale-in, the dead
/// ids are fenced). Requests the killed process had already sent may still
/// be queued in the broker: a replacement that starts before they are
/// handled can be overtaken by them. Apache Kafka rejects them (their
/// producer epoch is fenced); tansu seemed to append them after the abort
/// marker as a transaction nobody ends, which froze the last stable offset
/// of a partials partition for good in one run under load (a hypothesis
/// from that run's logs, not proven). Real replacements take seconds.
const REPLACEMENT_DELAY: Duration = Duration::from_secs(2);

/// Closes every TCP connection to and from the broker's port (`ss -K`), as
/// a broker restart or a network fault does; returns how many sockets it
/// closed.
fn drop_broker_connections(bootstrap: &str) -> usize {
    let port = bootstrap
        .rsplit(':')
        .next()
        .expect("bootstrap is host:port");
    let out = Command::new("ss")
        .args(["-K", "-t", "-n", "-H"])
        .arg(format!("( sport = :{port} or dport = :{port} )"))
        .output()
        .expect("ss (iproute2) runs: scripts/bootstrap.sh installs it");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ESTAB"))
        .count()
}

/// Aborts whatever transaction the processor instances `ids` left open, as a
/// replacement instance under the same id does when it starts
/// (InitProducerId fences the old epoch and aborts its transaction).
fn fence_instances(stack: &Stack, group: &str, ids: &[usize]) {
    for id in ids {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &stack.bootstrap)
            .set("transactional.id", format!("{group}-{id}"))
            .create()
            .expect("producer");
        p.init_transactions(Duration::from_secs(60))
            .expect("fencing a dead instance's transactional id");
    }
}

#[derive(serde::Deserialize)]
struct OracleOut {
    side_outputs: BTreeMap<String, Vec<(String, i64, i64)>>,
    ad_metrics: Vec<adstream_schemas::AdMetric>,
    campaign_ctr: Vec<adstream_schemas::CampaignCtr>,
}

fn header<'a>(c: &'a Consumed, name: &str) -> &'a str {
    c.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).expect("utf-8 header"))
        .unwrap_or_else(|| panic!("side output without header {name}"))
}

/// Groups records by `key`; every copy of a key must be byte-identical.
/// Returns the distinct records and the number of extra copies.
fn distinct<K: Ord + std::fmt::Debug>(
    name: &str,
    records: Vec<Consumed>,
    key: impl Fn(&Consumed) -> K,
) -> (BTreeMap<K, Consumed>, usize) {
    let mut out: BTreeMap<K, Consumed> = BTreeMap::new();
    let mut extra = 0;
    for r in records {
        let k = key(&r);
        if let Some(first) = out.get(&k) {
            assert_eq!(
                first.value, r.value,
                "{name}: two different records for {k:?}"
            );
            extra += 1;
        } else {
            out.insert(k, r);
        }
    }
    (out, extra)
}

#[test]
fn kills_scale_out_and_a_zombie_leave_results_exact() {
    let seed = env_or(
        "ADSTREAM_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1),
    );
    // A run the broker froze proves nothing either way about the processor:
    // it gets one more go, on new topics, and the output says so. Every
    // other failure fails at once.
    if let Err(froze) = scenario(seed) {
        eprintln!(
            "THE BROKER FROZE (not a processor failure): {froze}\n\
             running the whole scenario once more on new topics, seed {}",
            seed + 1
        );
        if let Err(again) = scenario(seed + 1) {
            panic!("the broker froze in two runs in a row: {again}");
        }
    }
}

/// How long the end of the run may go without a new result before the
/// test looks for a frozen broker.
const STALL: Duration = Duration::from_secs(240);

/// The signature of tansu's transaction-completion race (see the module
/// doc): the broker acknowledged a transaction's commit (EndTxn) but never
/// applied its offsets, so the processor reports, after its last restore,
/// that the broker's committed offsets differ from those it committed, and
/// `read_committed` readers stall for good. On Apache Kafka an acknowledged
/// commit is applied, and an open transaction is aborted after
/// `transaction.timeout.ms`, so this cannot last. Returns the evidence.
fn broker_froze(cluster: &Cluster) -> Option<String> {
    const DIFFER: &str = "the broker's committed offsets differ";
    for inst in cluster.live.values().filter(|i| i.id != SINK) {
        let text = std::fs::read_to_string(&inst.log).unwrap_or_default();
        let since_restore = text
            .rfind("tasks restored")
            .map_or(text.as_str(), |at| &text[at..]);
        if let Some(line) = since_restore.lines().rev().find(|l| l.contains(DIFFER)) {
            return Some(format!(
                "no new result for {} s, and processor {} last logged: {line}",
                STALL.as_secs(),
                inst.id
            ));
        }
    }
    None
}

/// One whole fault run; `Err` only when the broker froze (`broker_froze`).
fn scenario(seed: u64) -> Result<(), String> {
    let n = env_or("ADSTREAM_CHAOS_EVENTS", 200_000);
    let kills = env_or("ADSTREAM_CHAOS_KILLS", 8) as usize;
    eprintln!("chaos: {n} events, {kills} kills, seed {seed}");
    let mut rng = Rng(seed);
    let stack = Stack::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let prefix = unique_prefix("chaos");
    rt.block_on(stack.create_topics(&prefix, 6));
    let hides_aborted = broker_hides_aborted(&stack, &prefix);
    // Exactly once in the topics needs the broker to hide aborted records and
    // to fence a stale member's transactional offset commit (KIP-447). The
    // first is probed; the second is not observable from a client without a
    // rebalance race, so it is declared: ADSTREAM_BROKER_FENCES=1 on Apache Kafka.
    let strict = hides_aborted && std::env::var("ADSTREAM_BROKER_FENCES").is_ok_and(|v| v == "1");
    eprintln!("broker hides aborted transactions from read_committed readers: {hides_aborted}; strict exactly-once check: {strict}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let recording = dir.join("sent.jsonl");
    let start_time = parse_time_ms("2026-03-01T00:00:00Z").expect("time");
    // Input arrives while the faults happen (paced over ADSTREAM_CHAOS_PRODUCE_SECS),
    // so restarted instances have new output to commit.
    let produce_secs = env_or("ADSTREAM_CHAOS_PRODUCE_SECS", 90).max(1);
    let producer = {
        let (stack, prefix, recording) = (stack.clone(), prefix.clone(), recording.clone());
        std::thread::spawn(move || {
            run_producer(
                RunOptions {
                    generator: GeneratorConfig {
                        seed: 4242,
                        start_time_ms: start_time,
                        event_rate: 60.0,
                        duplicate_rate: 0.01,
                        late_rate: 0.002,
                        invalid_rate: 0.001,
                        orphan_click_rate: 0.002,
                        orphan_conversion_rate: 0.001,
                        ..Default::default()
                    },
                    events: Some(n),
                    duration: None,
                    rate: Some(n as f64 / produce_secs as f64),
                    target: Target::Kafka {
                        bootstrap: stack.bootstrap.clone(),
                        registry_url: stack.registry_url.clone(),
                        overrides: Vec::new(),
                        topic_prefix: prefix.clone(),
                    },
                    record: Some(recording),
                    episodes_out: None,
                    progress_every: Duration::from_secs(3600),
                },
                &AtomicBool::new(false),
            )
            .expect("producer")
        })
    };

    let db_url = rt.block_on(fresh_database(&prefix));
    let store_url = object_store_url(&prefix);
    let mut cluster = Cluster {
        stack: stack.clone(),
        prefix: prefix.clone(),
        dir: dir.clone(),
        db_url: db_url.clone(),
        store_url: store_url.clone(),
        live: BTreeMap::new(),
        incarnations: 0,
    };
    cluster.spawn(0);
    cluster.spawn_sink();
    let client = rt.block_on(connect(&db_url));
    let loaded = || {
        rt.block_on(client.query_one(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets",
            &[],
        ))
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
    };
    // (instance, log of the restarted incarnation) per kill
    let mut restarted: Vec<(usize, PathBuf)> = Vec::new();
    let mut sink_recoveries: Vec<u64> = Vec::new();
    let mut kills_done = 0;
    let mut zombie_log = None;
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(800 + rng.below(2_200)));
        if i == kills / 3 {
            eprintln!("scale out: 1 -> 3 instances");
            cluster.spawn(1);
            cluster.spawn(2);
            // The zombie must be a member with partitions and an open
            // transaction when it is paused: wait for its first commit.
            let z = cluster.live.get(&2).expect("instance 2");
            let t_spawn = Instant::now();
            while recovery_ms(&z.log).is_none() {
                assert!(
                    t_spawn.elapsed() < Duration::from_secs(120),
                    "instance 2 committed nothing within 120 s of its start: {}",
                    std::fs::read_to_string(&z.log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(Duration::from_secs(2));
            // The zombie: paused past its session timeout while the group moves on.
            eprintln!("zombie: SIGSTOP instance 2 for 12 s");
            signal(&z.child, "-STOP");
            std::thread::sleep(Duration::from_secs(12));
            signal(&z.child, "-CONT");
            zombie_log = Some(z.log.clone());
            std::thread::sleep(Duration::from_secs(4));
        }
        if i == kills / 2 {
            // A broker restart or network blip: every client, processor and
            // sink alike, sees its connections fail and must reconnect, not
            // stop. The kill of this round still follows.
            let dropped = drop_broker_connections(&stack.bootstrap);
            eprintln!("network blip: dropped {dropped} broker connections");
            assert!(
                dropped > 0,
                "ss -K closed no connection to the broker: this test needs root \
                 (CAP_NET_ADMIN) and a kernel built with CONFIG_INET_DIAG_DESTROY"
            );
            std::thread::sleep(Duration::from_secs(2));
        }
        if i == 2 * kills / 3 {
            eprintln!("scale in: 3 -> 1 instances (kill -9 instances 1 and 2)");
            for id in [1, 2] {
                if cluster.kill(id).is_some() {
                    kills_done += 1;
                }
            }
            // Their open transactions hold back the last stable offset of
            // the partitions they wrote until the broker aborts them: after
            // the processor's transaction.timeout.ms (30 s) on Apache Kafka.
            // tansu did not within minutes (measured: read_committed readers
            // of the sink and the rollups stalled), so the test fences the
            // dead ids as a replacement instance would.
            std::thread::sleep(REPLACEMENT_DELAY);
            fence_instances(&stack, &format!("{prefix}processor"), &[1, 2]);
            continue;
        }
        let ids: Vec<usize> = cluster.live.keys().copied().collect();
        let id = ids[rng.below(ids.len() as u64) as usize];
        let inst = cluster.kill(id).expect("live instance");
        kills_done += 1;
        eprintln!(
            "kill -9 {} after {:.1}s",
            if inst.id == SINK {
                "the sink".to_owned()
            } else {
                format!("processor {}", inst.id)
            },
            inst.started.elapsed().as_secs_f64()
        );
        let before = loaded();
        std::thread::sleep(REPLACEMENT_DELAY);
        let t_restart = Instant::now();
        cluster.spawn(id);
        let log = cluster.live[&id].log.clone();
        // Let it recover (or give up after 20 s: with the input done there is
        // no new output to commit), so every kill gets a recovery time.
        while t_restart.elapsed() < Duration::from_secs(20) {
            if id == SINK && loaded() > before {
                sink_recoveries.push(t_restart.elapsed().as_millis() as u64);
                break;
            }
            if id != SINK && recovery_ms(&log).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if id != SINK {
            restarted.push((id, log));
        }
    }
    assert_eq!(
        cluster.live.keys().copied().collect::<Vec<_>>(),
        vec![0, SINK],
        "scaled back to one processor (plus the sink)"
    );

    let summary = producer.join().expect("producer thread");
    assert_eq!(summary.records, n);
    let oracle_out = dir.join("oracle.json");
    let oracle = Command::new("python3")
        .arg(repo_root().join("oracle/oracle.py"))
        .arg(&recording)
        .arg("--out")
        .arg(&oracle_out)
        .status()
        .expect("python3 runs the oracle");
    assert!(oracle.success(), "oracle failed");
    let expected: OracleOut = serde_json::from_reader(std::io::BufReader::new(
        std::fs::File::open(&oracle_out).expect("oracle output"),
    ))
    .expect("oracle JSON");

    // Wait until every campaign window is out, then a little longer for the tail.
    let topic = |t: &str| vec![format!("{prefix}{t}")];
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut progress = ((0, 0), Instant::now());
    loop {
        let got = read_all(
            &stack.bootstrap,
            &topic("campaign-ctr"),
            None,
            Duration::from_secs(2),
        );
        let keys: BTreeSet<(Vec<u8>, i64)> = got
            .iter()
            .map(|r| (r.key.clone().unwrap_or_default(), r.timestamp.unwrap_or(0)))
            .collect();
        // Unmatched records are the last outputs (they need the final watermark).
        let unmatched: BTreeSet<(String, String, String)> = read_all(
            &stack.bootstrap,
            &topic("ad-unmatched"),
            None,
            Duration::from_secs(2),
        )
        .iter()
        .map(|c| {
            (
                header(c, "source_topic").to_owned(),
                header(c, "source_partition").to_owned(),
                header(c, "source_offset").to_owned(),
            )
        })
        .collect();
        if keys.len() >= expected.campaign_ctr.len()
            && unmatched.len() >= expected.side_outputs["unmatched"].len()
        {
            break;
        }
        if (keys.len(), unmatched.len()) != progress.0 {
            progress = ((keys.len(), unmatched.len()), Instant::now());
        } else if progress.1.elapsed() >= STALL {
            if let Some(evidence) = broker_froze(&cluster) {
                return Err(evidence);
            }
        }
        assert!(
            Instant::now() < deadline,
            "campaign windows: {} of {}",
            keys.len(),
            expected.campaign_ctr.len()
        );
        for inst in cluster.live.values_mut() {
            assert!(
                inst.child.try_wait().expect("wait").is_none(),
                "instance {} exited; the end of its log {}:\n{}",
                inst.id,
                inst.log.display(),
                log_tail(&inst.log, 40)
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    std::thread::sleep(Duration::from_secs(4));
    for id in cluster.live.keys().copied().collect::<Vec<_>>() {
        if id != SINK {
            cluster.kill(id);
        }
    }
    // The sink finishes loading what the topics now hold.
    let kafka = stored_topics(&stack, &prefix);
    let s3_group = format!("{prefix}s3");
    let t0 = Instant::now();
    while count_rows(&rt, &client, "ad_metrics") < expected.ad_metrics.len() as i64
        || count_rows(&rt, &client, "campaign_ctr") < expected.campaign_ctr.len() as i64
        || !committed_past_all(&stack.bootstrap, &s3_group, &prefix, &kafka)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the sink did not finish loading"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(1));
    cluster.kill(SINK);

    // Compare with the oracle.
    let idle = Duration::from_secs(5);
    let codec = adstream_schemas::Codec::new(&stack.registry_url).expect("codec");
    let decode_metric = |v: &[u8]| -> serde_json::Value {
        let m: adstream_schemas::AdMetric = rt.block_on(codec.decode(v)).expect("AdMetric");
        serde_json::to_value(m).expect("json")
    };
    let decode_campaign = |v: &[u8]| -> serde_json::Value {
        let m: adstream_schemas::CampaignCtr = rt.block_on(codec.decode(v)).expect("CampaignCtr");
        serde_json::to_value(m).expect("json")
    };
    let as_json = |v: serde_json::Value| v.to_string();
    let want_metrics: Vec<String> = expected
        .ad_metrics
        .iter()
        .map(|m| as_json(serde_json::to_value(m).expect("json")))
        .collect();
    let want_campaigns: Vec<String> = expected
        .campaign_ctr
        .iter()
        .map(|m| as_json(serde_json::to_value(m).expect("json")))
        .collect();
    let mut total_extra = 0;
    for (name, t, want, decode) in [
        (
            "ad-metrics",
            "ad-metrics",
            &want_metrics,
            &decode_metric as &dyn Fn(&[u8]) -> serde_json::Value,
        ),
        (
            "campaign-ctr",
            "campaign-ctr",
            &want_campaigns,
            &decode_campaign,
        ),
    ] {
        let records = read_all(&stack.bootstrap, &topic(t), None, idle);
        let read = records.len();
        let (rows, extra) = distinct(name, records, |r| {
            decode(r.value.as_deref().expect("value")).to_string()
        });
        let got: BTreeSet<String> = rows.keys().cloned().collect();
        let want: BTreeSet<String> = want.iter().cloned().collect();
        let missing = want.difference(&got).count();
        let unexpected = got.difference(&want).count();
        eprintln!("{name}: read {read}, distinct {}, oracle {}, missing {missing}, unexpected {unexpected}, extra copies {extra}", got.len(), want.len());
        assert_eq!(missing + unexpected, 0, "{name} differs from the oracle");
        total_extra += extra;
    }
    for (name, t, key) in [
        ("late", "ad-late-events", "late"),
        ("unmatched", "ad-unmatched", "unmatched"),
        ("dead letter", "ad-dead-letter", "dead_letter"),
    ] {
        let want: BTreeSet<(String, i64, i64)> =
            expected.side_outputs[key].iter().cloned().collect();
        let records = read_all(&stack.bootstrap, &topic(t), None, idle);
        let (rows, extra) = distinct(name, records, |c| {
            let topic = header(c, "source_topic")
                .strip_prefix(prefix.as_str())
                .expect("prefixed")
                .to_owned();
            let p: i64 = header(c, "source_partition").parse().expect("partition");
            let o: i64 = header(c, "source_offset").parse().expect("offset");
            (topic, p, o)
        });
        let got: BTreeSet<(String, i64, i64)> = rows.into_keys().collect();
        eprintln!(
            "{name}: distinct {}, oracle {}, extra copies {extra}",
            got.len(),
            want.len()
        );
        assert_eq!(got, want, "{name} records are the oracle's");
        total_extra += extra;
    }
    if strict {
        assert_eq!(total_extra, 0, "each (window, key) exactly once");
    } else {
        eprintln!(
            "{total_extra} extra copies, each byte-identical to the first: records of aborted \
             transactions (shown to read_committed readers: {}) or of a commit the broker did \
             not fence",
            !hides_aborted
        );
    }

    let got = pg_ad_metrics(&rt, &client);
    let mut want = expected.ad_metrics.clone();
    want.sort_by_key(metric_key);
    assert_eq!(got.len(), want.len(), "ad_metrics row count in PostgreSQL");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "ad_metrics row {i} in PostgreSQL");
    }
    let got_campaigns = pg_campaigns(&rt, &client);
    let mut want_c = expected.campaign_ctr.clone();
    want_c.sort_by_key(|m| (m.window_start, m.campaign_id.clone()));
    assert_eq!(got_campaigns, want_c, "campaign_ctr rows in PostgreSQL");
    eprintln!(
        "PostgreSQL: {} ad_metrics and {} campaign_ctr rows equal to the oracle's",
        got.len(),
        got_campaigns.len()
    );
    let (objects, records) = check_storage(&rt, &store_url, &kafka);
    eprintln!("storage: {objects} objects hold all {records} Kafka records exactly once");

    let zombie =
        std::fs::read_to_string(zombie_log.expect("zombie phase ran")).expect("zombie log");
    assert!(
        zombie.contains("paused past the session timeout"),
        "the resumed zombie refused to commit: {zombie}"
    );
    let mut times: Vec<u64> = Vec::new();
    for (id, log) in &restarted {
        match recovery_ms(log) {
            Some(ms) => {
                eprintln!("instance {id}: restart -> first committed output {ms} ms");
                times.push(ms);
            }
            None => eprintln!("instance {id}: no committed output within 20 s of its restart (nothing new to emit, or killed again)"),
        }
    }
    times.sort_unstable();
    eprintln!(
        "kills: {kills_done}; processor recovery (restart -> next committed output): median {} ms, max {} ms over {} measured",
        times.get(times.len() / 2).copied().unwrap_or(0),
        times.last().copied().unwrap_or(0),
        times.len()
    );
    for ms in &sink_recoveries {
        eprintln!("sink: restart -> next committed load {ms} ms");
    }
    assert!(kills_done >= kills, "every scheduled kill happened");
    assert!(!times.is_empty(), "at least one recovery measured");
    Ok(())
}
