//! The processor refuses to start, with a clear message, when the input
//! topics are not co-partitioned, when the registry holds a writer schema
//! it cannot read, or when another instance already runs in its group
//! (scale-out is not built yet: two instances would write partial rollups).

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use adstream_processor::engine::EngineConfig;
use adstream_processor::metrics::Metrics;
use adstream_processor::runtime::{run, ProcessorOptions, RuntimeError, Status};
use adstream_testkit::{unique_prefix, Stack};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};

fn options(stack: &Stack, prefix: &str) -> ProcessorOptions {
    ProcessorOptions {
        bootstrap: stack.bootstrap.clone(),
        registry_url: stack.registry_url.clone(),
        overrides: vec![("session.timeout.ms".into(), "6000".into())],
        topic_prefix: prefix.to_owned(),
        group_id: format!("{prefix}processor"),
        engine: EngineConfig::default(),
        idle_timeout: Duration::from_secs(2),
        commit_interval: Duration::from_secs(1),
        instance_id: "0".into(),
        static_membership: false,
        state_url: format!(
            "file://{}",
            std::env::temp_dir().join("adstream-state").display()
        ),
        checkpoint_interval: std::time::Duration::from_secs(10),
        stop_when_idle: true,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn refuses_input_topics_that_are_not_co_partitioned() {
    let stack = Stack::from_env();
    let prefix = unique_prefix("copart");
    let admin = adstream_admin::admin_client(&stack.bootstrap, &[]).expect("admin");
    let names = ["ad-impressions", "ad-clicks", "ad-conversions"].map(|t| format!("{prefix}{t}"));
    let topics = [
        NewTopic::new(&names[0], 6, TopicReplication::Fixed(1)),
        NewTopic::new(&names[1], 4, TopicReplication::Fixed(1)),
        NewTopic::new(&names[2], 6, TopicReplication::Fixed(1)),
    ];
    runtime()
        .block_on(admin.create_topics(topics.iter(), &AdminOptions::new()))
        .expect("create");
    std::thread::sleep(Duration::from_millis(500));
    let err = run(
        &options(&stack, &prefix),
        &AtomicBool::new(false),
        &Status::default(),
        &Metrics::new(),
    )
    .expect_err("must refuse");
    assert!(matches!(err, RuntimeError::NotCoPartitioned(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("ad-clicks=4") && text.contains("co-partitioned"),
        "{text}"
    );
}

#[test]
fn refuses_a_writer_schema_it_cannot_read() {
    let stack = Stack::from_env();
    let prefix = unique_prefix("schema");
    runtime().block_on(stack.create_topics(&prefix, 2));
    // A Click whose writers dropped cost_micros, which this version needs and has no default for.
    let incompatible = r#"{"type":"record","name":"Click","namespace":"adstream.events","fields":[
        {"name":"click_id","type":"string"},{"name":"impression_id","type":"string"},
        {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"user_ip","type":"string"}]}"#;
    let body = serde_json::json!({ "schema": incompatible }).to_string();
    let url = format!(
        "{}/subjects/{prefix}ad-clicks-value/versions",
        stack.registry_url
    );
    let status = std::process::Command::new("curl")
        .args([
            "-sfo",
            "/dev/null",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/vnd.schemaregistry.v1+json",
            "--data",
            &body,
            &url,
        ])
        .status()
        .expect("curl");
    assert!(status.success(), "registering the test schema");
    let err = run(
        &options(&stack, &prefix),
        &AtomicBool::new(false),
        &Status::default(),
        &Metrics::new(),
    )
    .expect_err("must refuse");
    let text = err.to_string();
    assert!(
        text.contains(&format!("{prefix}ad-clicks-value")) && text.contains("cannot be read"),
        "{text}"
    );
}

#[test]
fn sigterm_stops_the_binary_cleanly_with_a_final_commit() {
    let stack = Stack::from_env();
    let prefix = unique_prefix("sigterm");
    runtime().block_on(stack.create_topics(&prefix, 2));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_adstream-processor"))
        .args([
            "--topic-prefix",
            &prefix,
            "--group-id",
            &format!("{prefix}g"),
            "--metrics-addr",
            "",
        ])
        .args(["-X", "session.timeout.ms=6000"])
        .env("KAFKA_BOOTSTRAP_SERVERS", &stack.bootstrap)
        .env("SCHEMA_REGISTRY_URL", &stack.registry_url)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the processor");
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        child.try_wait().expect("poll").is_none(),
        "still running before the signal"
    );
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("poll") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut log)
        .expect("read log");
    assert!(status.success(), "exit status {status}: {log}");
    assert!(log.contains("stopped cleanly"), "{log}");
}
