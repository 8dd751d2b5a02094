//! Command-line helpers shared by every adstream binary.

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
