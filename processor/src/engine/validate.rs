//! Validation of decoded input records. A record that fails goes to the dead
//! letter topic with the reason; the rules are documented in README.md
//! ("Validation") and mirrored independently by the oracle.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use adstream_schemas::records::{ClickView, ConversionView, ImpressionView};

/// The device types CONTRACT.md allows (`impression` checks these).
pub const DEVICE_TYPES: [&str; 5] = ["desktop", "mobile", "tablet", "ctv", "other"];

/// Why a decodable record is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0} is empty")]
    EmptyField(&'static str),
    #[error("{field} is negative ({value})")]
    Negative { field: &'static str, value: i64 },
    #[error("user_ip {0:?} is not an IPv4 or IPv6 address")]
    BadIp(String),
    #[error("device_type {0:?} is not one of desktop, mobile, tablet, ctv, other")]
    BadDevice(String),
    #[error("event_time {0} is not a positive epoch-millisecond time")]
    BadEventTime(i64),
    #[error("record key does not equal impression_id {0:?} (breaks co-partitioning)")]
    KeyMismatch(String),
}

impl Invalid {
    /// Short reason code for headers and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Invalid::EmptyField(_) => "empty-field",
            Invalid::Negative { .. } => "negative-amount",
            Invalid::BadIp(_) => "bad-ip",
            Invalid::BadDevice(_) => "bad-device-type",
            Invalid::BadEventTime(_) => "bad-event-time",
            Invalid::KeyMismatch(_) => "key-mismatch",
        }
    }
}

fn non_empty(field: &'static str, v: &str) -> Result<(), Invalid> {
    if v.is_empty() {
        Err(Invalid::EmptyField(field))
    } else {
        Ok(())
    }
}

fn non_negative(field: &'static str, v: i64) -> Result<(), Invalid> {
    if v < 0 {
        Err(Invalid::Negative { field, value: v })
    } else {
        Ok(())
    }
}

/// Parses an address as the contract allows (no zone ids).
pub fn parse_ip(s: &str) -> Result<IpAddr, Invalid> {
    if let Some(v4) = parse_v4(s.as_bytes()) {
        return Ok(IpAddr::V4(v4));
    }
    if let Some(v6) = parse_v6(s.as_bytes()) {
        return Ok(IpAddr::V6(v6));
    }
    // Not IPv4 as std reads it either (the fast path agrees), so std's
    // IPv4 attempt can be skipped. std reads what the one-pass reader
    // leaves (embedded IPv4, zone ids rejected, ...).
    s.parse::<Ipv6Addr>()
        .map(IpAddr::V6)
        .map_err(|_| Invalid::BadIp(s.to_owned()))
}

/// Dotted-quad IPv4 text as std reads it (four decimal octets of one to
/// three digits, no leading zeros, each at most 255), in one pass and
/// without std's general address parser; `None` for anything else, which
/// std then reads (IPv6) or rejects.
fn parse_v4(s: &[u8]) -> Option<Ipv4Addr> {
    // An octet at a time, not a byte at a time: a third of the branches.
    let digit = |i: usize| s.get(i).map(|&b| b.wrapping_sub(b'0')).filter(|&d| d < 10);
    let mut octets = [0u8; 4];
    let mut i = 0;
    for (k, octet) in octets.iter_mut().enumerate() {
        if k > 0 {
            if s.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let mut value = u32::from(digit(i)?);
        i += 1;
        if let Some(d) = digit(i) {
            if value == 0 {
                return None; // a leading zero
            }
            value = value * 10 + u32::from(d);
            i += 1;
            if let Some(d) = digit(i) {
                value = value * 10 + u32::from(d);
                i += 1;
                if value > 255 {
                    return None;
                }
            }
        }
        *octet = value as u8;
    }
    (i == s.len()).then_some(Ipv4Addr::from(octets))
}

/// IPv6 text of hex groups (one to four digits each, colon-separated, at
/// most one `::` standing for at least one zero group), in one pass and
/// without std's general parser, which tries an embedded IPv4 address at
/// every group; `None` for anything else, which std then reads or rejects.
fn parse_v6(s: &[u8]) -> Option<Ipv6Addr> {
    let mut groups = [0u16; 8];
    let (mut n, mut i) = (0usize, 0usize);
    // Groups read before the `::`, if there is one.
    let mut gap: Option<usize> = None;
    if s.starts_with(b"::") {
        gap = Some(0);
        i = 2;
    }
    while i < s.len() {
        let start = i;
        let mut value = 0u32;
        while let Some(d) = s.get(i).and_then(|&b| (b as char).to_digit(16)) {
            value = (value << 4) | d;
            i += 1;
            if i - start > 4 {
                return None;
            }
        }
        if i == start || n == 8 {
            return None;
        }
        groups[n] = value as u16;
        n += 1;
        match &s[i..] {
            [] => break,
            [b':', b':', ..] if gap.is_none() => {
                gap = Some(n);
                i += 2;
            }
            [b':', _, ..] => i += 1,
            _ => return None,
        }
    }
    match gap {
        None if n == 8 => {}
        Some(head) if n < 8 => {
            let tail = n - head;
            groups.copy_within(head..n, 8 - tail);
            groups[head..8 - tail].fill(0);
        }
        _ => return None,
    }
    Some(Ipv6Addr::from(groups))
}

fn time(t: i64) -> Result<(), Invalid> {
    if t > 0 {
        Ok(())
    } else {
        Err(Invalid::BadEventTime(t))
    }
}

fn key_matches(key: Option<&[u8]>, impression_id: &str) -> Result<(), Invalid> {
    if key == Some(impression_id.as_bytes()) {
        Ok(())
    } else {
        Err(Invalid::KeyMismatch(impression_id.to_owned()))
    }
}

pub fn impression(r: &ImpressionView, key: Option<&[u8]>) -> Result<IpAddr, Invalid> {
    non_empty("impression_id", r.impression_id)?;
    non_empty("campaign_id", r.campaign_id)?;
    non_empty("ad_id", r.ad_id)?;
    non_negative("cost_micros", r.cost_micros)?;
    time(r.event_time)?;
    // A match compiles to a length switch and one compare, not five.
    if !matches!(
        r.device_type,
        "desktop" | "mobile" | "tablet" | "ctv" | "other"
    ) {
        return Err(Invalid::BadDevice(r.device_type.to_owned()));
    }
    let ip = parse_ip(r.user_ip)?;
    key_matches(key, r.impression_id)?;
    Ok(ip)
}

pub fn click(r: &ClickView, key: Option<&[u8]>) -> Result<(), Invalid> {
    non_empty("click_id", r.click_id)?;
    non_empty("impression_id", r.impression_id)?;
    non_negative("cost_micros", r.cost_micros)?;
    time(r.event_time)?;
    parse_ip(r.user_ip)?;
    key_matches(key, r.impression_id)
}

pub fn conversion(r: &ConversionView, key: Option<&[u8]>) -> Result<(), Invalid> {
    non_empty("conversion_id", r.conversion_id)?;
    non_empty("click_id", r.click_id)?;
    non_empty("impression_id", r.impression_id)?;
    non_negative("revenue_micros", r.revenue_micros)?;
    time(r.event_time)?;
    key_matches(key, r.impression_id)
}

/// `ip` masked to /24 (IPv4) or /48 (IPv6), as network address text with prefix.
pub fn ip_range(ip: IpAddr) -> String {
    let mut out = String::new();
    ip_range_into(ip, &mut out);
    out
}

/// [`ip_range`] written into `out` (cleared first), so the hot path can
/// reuse one buffer.
pub fn ip_range_into(ip: IpAddr, out: &mut String) {
    out.clear();
    match ip {
        IpAddr::V4(v4) => super::ids::write_v4_range_of(v4, out),
        IpAddr::V6(v6) => write_v6_range(v6, out),
    }
}

/// The /48 network of `v6` in RFC 5952 text, as `Ipv6Addr`'s `Display`
/// writes it, without the formatting machinery (a fifth of users are on
/// IPv6, and this ran once per impression). Only the first three groups
/// can be non-zero, so the zeros after the last non-zero one (at least
/// five groups) are the longest run and become `::`; any zero group before
/// it is written `0`, as a run of at most two must not be compressed
/// then.
fn write_v6_range(v6: Ipv6Addr, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let g = v6.segments();
    let Some(last) = g[..3].iter().rposition(|&x| x != 0) else {
        out.push_str("::/48");
        return;
    };
    // Built in a local buffer and appended once: at most three groups of
    // four digits, two colons and "::/48".
    let mut buf = [0u8; 19];
    let mut n = 0;
    for (k, &group) in g[..=last].iter().enumerate() {
        if k > 0 {
            buf[n] = b':';
            n += 1;
        }
        let digits = (16 - group.leading_zeros()).div_ceil(4).max(1);
        for d in (0..digits).rev() {
            buf[n] = HEX[usize::from((group >> (4 * d)) & 0xf)];
            n += 1;
        }
    }
    buf[n..n + 5].copy_from_slice(b"::/48");
    n += 5;
    debug_assert!(buf[..n].is_ascii());
    // SAFETY: the buffer holds only hex digits, colons and "/48", which are
    // ASCII and so UTF-8.
    out.push_str(unsafe { std::str::from_utf8_unchecked(&buf[..n]) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ranges() {
        assert_eq!(ip_range("10.1.2.3".parse().expect("ip")), "10.1.2.0/24");
        assert_eq!(
            ip_range("2001:db8:1:2::5".parse().expect("ip")),
            "2001:db8:1::/48"
        );
        assert_eq!(
            ip_range("2001:db8::1".parse().expect("ip")),
            "2001:db8::/48"
        );
        assert_eq!(ip_range("::1".parse().expect("ip")), "::/48");
        assert_eq!(ip_range("0.9.10.255".parse().expect("ip")), "0.9.10.0/24");
        assert_eq!(
            ip_range("100.199.255.1".parse().expect("ip")),
            "100.199.255.0/24"
        );
        assert_eq!(ip_range("2001:0:0:1::".parse().expect("ip")), "2001::/48");
    }

    #[test]
    fn device_check_is_the_listed_types() {
        let r = |device_type| ImpressionView {
            impression_id: "i",
            event_time: 1,
            campaign_id: "c",
            ad_id: "a",
            search_keyword: "k",
            user_id: Default::default(),
            user_ip: "10.0.0.1",
            state: "s",
            device_type,
            cost_micros: 0,
            metadata: Default::default(),
        };
        for d in DEVICE_TYPES {
            assert!(impression(&r(d), Some(b"i")).is_ok(), "{d}");
        }
        for d in ["", "Mobile", "tv", "desktop ", "others"] {
            assert!(
                matches!(impression(&r(d), Some(b"i")), Err(Invalid::BadDevice(_))),
                "{d}"
            );
        }
    }

    #[test]
    fn bad_values() {
        assert!(parse_ip("999.1.2.3").is_err());
        assert!(parse_ip("fe80::1%eth0").is_err());
        assert!(parse_ip("10.0.0.1").is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        /// The one-pass IPv4 reader accepts only what std reads as that
        /// same IPv4 address, and everything std reads as IPv4.
        #[test]
        fn ipv4_fast_path_agrees_with_std(s in "[0-9.:a]{0,17}|[0-9]{1,3}(\\.[0-9]{1,4}){2,4}") {
            let by_std = s.parse::<IpAddr>().ok();
            match parse_v4(s.as_bytes()) {
                Some(v4) => proptest::prop_assert_eq!(by_std, Some(IpAddr::V4(v4))),
                None => proptest::prop_assert!(!matches!(by_std, Some(IpAddr::V4(_))), "{s}"),
            }
            proptest::prop_assert_eq!(parse_ip(&s).ok(), by_std);
        }

        /// The one-pass IPv6 reader accepts only what std reads as that
        /// same address (what it leaves, std still reads: `parse_ip`
        /// agrees with std on everything).
        #[test]
        fn ipv6_fast_path_agrees_with_std(
            s in "[0-9a-fA-F:.%]{0,41}|:{0,2}([0-9a-fA-F]{0,5}:{1,2}){0,9}[0-9a-fA-F]{0,5}|([0-9a-f]{1,4}:){1,7}(:[0-9a-f]{1,4}){0,7}:?|::([0-9a-f]{1,4}:){0,8}[0-9.]{0,16}"
        ) {
            let by_std = s.parse::<IpAddr>().ok();
            if let Some(v6) = parse_v6(s.as_bytes()) {
                proptest::prop_assert_eq!(by_std, Some(IpAddr::V6(v6)), "{}", s);
            }
            proptest::prop_assert_eq!(parse_ip(&s).ok(), by_std);
        }

        /// The /48 text is `Display`'s, for every address and for those
        /// with zero groups among the first three.
        #[test]
        fn ipv6_range_text_is_displays(bits: u128, zeros in 0u8..8) {
            let mut bits = bits;
            for k in 0..3 {
                if zeros & (1 << k) != 0 {
                    bits &= !(0xffffu128 << (112 - 16 * k));
                }
            }
            let v6 = Ipv6Addr::from(bits);
            let masked = Ipv6Addr::from(bits & !((1u128 << 80) - 1));
            let mut out = String::new();
            write_v6_range(v6, &mut out);
            proptest::prop_assert_eq!(out, format!("{masked}/48"));
        }
    }
}
