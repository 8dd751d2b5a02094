//! `recovery_s`: kill -9 of a processor holding `impressions` buffered
//! impressions → its restarted process's first committed output.
//!
//! The processor runs as its own process (the release binary next to this
//! one), so the kill is a real SIGKILL. Steps:
//! 1. produce about `impressions` impressions (with their clicks and
//!    conversions) inside 20 minutes of event time, so none leaves the
//!    30-minute click window and all stay buffered;
//! 2. run the processor until every join task has a checkpoint at the end of
//!    its input (named by its positions, so the bench can see it);
//! 3. kill it with SIGKILL, start it again under the same instance id, and
//!    produce a short tail of later events that closes windows;
//! 4. the figure is the restarted process's own "first output committed"
//!    time (process start → first committed transaction with output), which
//!    covers joining the group, loading the checkpoints and the tail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use adstream_processor::checkpoints::positions_in_name;
use adstream_processor::engine::{Engine, EngineConfig};
use adstream_producer::generator::GeneratorConfig;
use adstream_producer::{RunOptions, Target};

pub struct RecoveryFigures {
    pub recovery_s: f64,
    /// Wall time from the kill to the first committed output seen in the log.
    pub kill_to_output_s: f64,
    pub buffered_impressions: u64,
    pub checkpoint_bytes: u64,
    pub catch_up_s: f64,
    /// From the restarted process's start to its partition assignment.
    pub group_wait_s: Option<f64>,
    /// Loading every task's checkpoint ("tasks restored ... ms=").
    pub restore_s: Option<f64>,
}

fn processor_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating adstream-bench")?;
    let bin = exe
        .parent()
        .context("adstream-bench has no directory")?
        .join("adstream-processor");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build it (cargo build --release -p adstream-processor)",
        bin.display()
    );
    Ok(bin)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Run<'a> {
    kafka: &'a adstream_schemas::config::KafkaArgs,
    prefix: &'a str,
    state_dir: &'a Path,
    log_dir: &'a Path,
}

impl Run<'_> {
    fn spawn(&self, incarnation: u32) -> anyhow::Result<(Child, PathBuf)> {
        let log = self.log_dir.join(format!("processor-{incarnation}.log"));
        let file = std::fs::File::create(&log).context("processor log file")?;
        let mut cmd = Command::new(processor_binary()?);
        cmd.args(["--bootstrap-servers", &self.kafka.bootstrap_servers])
            .args(["--schema-registry-url", &self.kafka.schema_registry_url])
            .args(["--topic-prefix", self.prefix])
            .args(["--group-id", &format!("{}processor", self.prefix)])
            .args(["--instance-id", "0"])
            // Restarted in place under the same name: what --static-membership is for.
            .arg("--static-membership")
            .args([
                "--state-url",
                &format!("file://{}", self.state_dir.display()),
            ])
            .args(["--checkpoint-interval", "10s", "--commit-interval", "1s"])
            // No idleness: the buffered impressions must stay buffered.
            .args(["--idle-timeout", "3600s", "--metrics-addr", ""])
            .args(["-X", "session.timeout.ms=6000"]);
        for (k, v) in &self.kafka.rdkafka {
            cmd.args(["-X", &format!("{k}={v}")]);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting the processor")?;
        Ok((child, log))
    }

    fn produce(
        &self,
        cfg: GeneratorConfig,
        events: u64,
    ) -> anyhow::Result<adstream_producer::Summary> {
        adstream_producer::run(
            RunOptions {
                generator: cfg,
                events: Some(events),
                duration: None,
                rate: None,
                target: Target::Kafka {
                    bootstrap: self.kafka.bootstrap_servers.clone(),
                    registry_url: self.kafka.schema_registry_url.clone(),
                    overrides: self.kafka.rdkafka.clone(),
                    topic_prefix: self.prefix.to_owned(),
                },
                record: None,
                episodes_out: None,
                progress_every: Duration::from_secs(3600),
            },
            &AtomicBool::new(false),
        )
        .context("producing the recovery input")
    }
}

/// End offsets of every input partition: (topic index, partition) → offset.
fn end_offsets(
    kafka: &adstream_schemas::config::KafkaArgs,
    prefix: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<(usize, i32), i64>> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &kafka.bootstrap_servers);
    for (k, v) in &kafka.rdkafka {
        cc.set(k, v);
    }
    let c: BaseConsumer = cc.create()?;
    let mut out = BTreeMap::new();
    for (i, t) in adstream_schemas::topics::INPUTS.iter().enumerate() {
        for p in 0..partitions {
            let (_, high) =
                c.fetch_watermarks(&format!("{prefix}{t}"), p, Duration::from_secs(10))?;
            out.insert((i, p), high);
        }
    }
    Ok(out)
}

/// The size of every join task's checkpoint at `ends`, once all exist.
fn checkpoints_at_end(
    dir: &Path,
    ends: &BTreeMap<(usize, i32), i64>,
    partitions: i32,
) -> Option<u64> {
    let mut total = 0;
    for p in 0..partitions {
        let want: Vec<i64> = (0..3).map(|t| ends[&(t, p)]).collect();
        let task = dir.join(format!("join-{p:04}"));
        let found = std::fs::read_dir(&task).ok()?.flatten().find(|e| {
            e.file_name()
                .to_str()
                .and_then(positions_in_name)
                .is_some_and(|pos| pos.len() == 3 && pos.iter().zip(&want).all(|(a, b)| a >= b))
        })?;
        total += found.metadata().ok()?.len();
    }
    Some(total)
}

/// Buffered impressions in the newest checkpoint of every join task.
fn buffered_in_checkpoints(dir: &Path) -> anyhow::Result<u64> {
    let codec = adstream_producer::encode::SchemaIds::OFFLINE.offline_codec()?;
    let mut total = 0;
    for task in std::fs::read_dir(dir)?.flatten() {
        if !task.file_name().to_string_lossy().starts_with("join-") {
            continue;
        }
        let newest = std::fs::read_dir(task.path())?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "ckpt"))
            .max()
            .context("a join task without checkpoints")?;
        let bytes = std::fs::read(&newest)?;
        let engine = Engine::restore(EngineConfig::default(), codec.clone(), &bytes)
            .with_context(|| format!("decoding {}", newest.display()))?;
        total += engine.join_sizes().impressions as u64;
    }
    Ok(total)
}

/// The timestamp of the first log line containing `needle`.
fn logged_at(text: &str, needle: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let line = text.lines().find(|l| l.contains(needle))?;
    let ts = line.split_whitespace().next()?;
    chrono::DateTime::parse_from_rfc3339(ts)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Where the restarted process's time went: waiting for the group to assign
/// its partitions, and loading the checkpoints.
fn breakdown(log: &Path) -> (Option<f64>, Option<f64>) {
    let Ok(text) = std::fs::read_to_string(log) else {
        return (None, None);
    };
    let group_wait = logged_at(&text, "processor started")
        .zip(logged_at(&text, "partitions assigned"))
        .map(|(a, b)| (b - a).num_milliseconds() as f64 / 1_000.0);
    let restore = text
        .lines()
        .find(|l| l.contains("tasks restored"))
        .and_then(|l| l.split(" ms=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|ms| ms / 1_000.0);
    (group_wait, restore)
}

fn first_output_ms(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("first output committed"))?;
    let v = line.split("since_start_ms=").nth(1)?;
    v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub fn bench(
    kafka: &adstream_schemas::config::KafkaArgs,
    prefix: &str,
    partitions: i32,
    impressions: u64,
) -> anyhow::Result<RecoveryFigures> {
    let tmp = std::env::temp_dir().join(format!("adstream-recovery-{}", std::process::id()));
    // Its checkpoints take GBs: removed however the run ends.
    let _cleanup = RemoveOnDrop(tmp.clone());
    let state_dir = tmp.join("state");
    std::fs::create_dir_all(&state_dir)?;
    let run = Run {
        kafka,
        prefix,
        state_dir: &state_dir,
        log_dir: &tmp,
    };
    crate::create_topics(kafka, prefix, partitions)?;
    // 1. The buffered input: impressions are about 97 % of generated events.
    let span_s = 1_200.0;
    let events = impressions + impressions / 30;
    let base = GeneratorConfig {
        seed: 23,
        event_rate: events as f64 / span_s,
        ..Default::default()
    };
    let start_time = base.start_time_ms;
    let summary = run.produce(base, events)?;
    let ends = end_offsets(kafka, prefix, partitions)?;
    eprintln!(
        "recovery: produced {} records in {:.1} s",
        summary.records, summary.elapsed_s
    );

    // 2. Run until every join task is checkpointed at the end of its input.
    let (mut first, _) = run.spawn(1)?;
    let t0 = Instant::now();
    let checkpoint_bytes = loop {
        if let Some(bytes) = checkpoints_at_end(
            &state_dir.join(format!("{prefix}processor")),
            &ends,
            partitions,
        ) {
            break bytes;
        }
        if let Ok(Some(status)) = first.try_wait() {
            anyhow::bail!("the processor exited ({status}); log in {}", tmp.display());
        }
        if t0.elapsed() > Duration::from_secs(1_800) {
            kill(&mut first);
            anyhow::bail!("no checkpoint at the end of the input after 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let catch_up_s = t0.elapsed().as_secs_f64();
    // What the killed process held: its newest join checkpoints, loaded here.
    let t_load = Instant::now();
    let buffered = buffered_in_checkpoints(&state_dir.join(format!("{prefix}processor")))?;
    let load_s = t_load.elapsed().as_secs_f64();
    eprintln!(
        "recovery: input taken in and checkpointed in {catch_up_s:.1} s; join checkpoints {:.0} MB holding {buffered} buffered impressions (read and decoded in {load_s:.1} s)",
        checkpoint_bytes as f64 / 1e6
    );

    // 3. kill -9, restart, and a tail of later events that closes windows.
    kill(&mut first);
    let killed = Instant::now();
    let (mut second, log) = run.spawn(2)?;
    let tail = GeneratorConfig {
        seed: 29,
        start_time_ms: start_time + (span_s as i64 + 60) * 1_000,
        event_rate: 100.0,
        ..Default::default()
    };
    run.produce(tail, 30_000)?;
    let recovered = loop {
        if let Some(ms) = first_output_ms(&log) {
            break ms;
        }
        if let Ok(Some(status)) = second.try_wait() {
            anyhow::bail!(
                "the restarted processor exited ({status}); log {}",
                log.display()
            );
        }
        if killed.elapsed() > Duration::from_secs(600) {
            kill(&mut second);
            anyhow::bail!("no committed output 10 minutes after the restart");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let kill_to_output_s = killed.elapsed().as_secs_f64();
    kill(&mut second);
    let (group_wait_s, restore_s) = breakdown(&log);
    Ok(RecoveryFigures {
        recovery_s: recovered as f64 / 1_000.0,
        kill_to_output_s,
        buffered_impressions: buffered,
        checkpoint_bytes,
        catch_up_s,
        group_wait_s,
        restore_s,
    })
}
