//! Command-line helpers shared by every adstream binary.

/// The Kafka and schema-registry settings every binary takes, with the
/// environment fallbacks of the README.
#[derive(clap::Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub bootstrap_servers: String,
    /// Confluent-compatible schema registry URL.
    #[arg(
        long,
        env = "SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: String,
    /// librdkafka setting passed through as is (repeatable), e.g. -X security.protocol=SASL_SSL.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub rdkafka: Vec<(String, String)>,
    /// Prefix for every topic name (for isolated runs).
    #[arg(long, env = "ADSTREAM_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Parses one `-X key=value` librdkafka passthrough setting.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// The full topic name for a contract topic under an optional test prefix.
pub fn prefixed(prefix: &str, topic: &str) -> String {
    format!("{prefix}{topic}")
}

/// Serves the text `render` returns (OpenMetrics) to every HTTP request on
/// `addr`, from a background thread; returns the bound address. Scrapes are
/// rare and tiny, so one blocking thread is enough.
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let body = render();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    body
                );
            }
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value() {
        assert_eq!(
            parse_key_value("security.protocol=SASL_SSL").expect("ok"),
            ("security.protocol".to_owned(), "SASL_SSL".to_owned())
        );
        assert_eq!(parse_key_value("a=b=c").expect("ok").1, "b=c");
        assert!(parse_key_value("nokey").is_err());
        assert!(parse_key_value("=v").is_err());
    }
}
