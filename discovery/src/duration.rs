//! Go `time.Duration` text: the format Consul uses on the wire for intervals, timeouts and `wait`.
//!
//! Consul parses durations with Go's `time.ParseDuration` and prints them with
//! `Duration.String()`, so both directions must follow Go exactly: clients send `120000ms`,
//! `1m30s` or `.5s`, and reads show `10s`, `1m0s`, `1h0m0s`.

use std::fmt;
use std::time::Duration;

/// Why a duration string was rejected; `Display` is Go's own error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseDurationError {
    /// Not a duration at all (`time: invalid duration "x"`).
    Invalid(String),
    /// A number without a unit, other than a lone `0`.
    MissingUnit(String),
    /// A unit Go does not know.
    UnknownUnit { unit: String, input: String },
}

impl fmt::Display for ParseDurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(s) => write!(f, "time: invalid duration {}", go_quote(s)),
            Self::MissingUnit(s) => write!(f, "time: missing unit in duration {}", go_quote(s)),
            Self::UnknownUnit { unit, input } => write!(
                f,
                "time: unknown unit {} in duration {}",
                go_quote(unit),
                go_quote(input)
            ),
        }
    }
}

impl std::error::Error for ParseDurationError {}

fn go_quote(s: &str) -> String {
    // Go's strconv.Quote; the inputs here are short user strings, so escaping quotes and
    // backslashes (and control characters via the debug form) is what matters.
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&c.escape_default().to_string()),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Parses a Go duration string. Negative durations are rejected as invalid, because nothing in
/// the Consul subset accepts them and `Duration` cannot hold them.
pub fn parse(input: &str) -> Result<Duration, ParseDurationError> {
    let invalid = || ParseDurationError::Invalid(input.to_string());
    let mut s = input;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0; // nanoseconds
    while !s.is_empty() {
        // Leading integer part.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(int_len);
        s = rest;
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(invalid());
            }
        } else if int_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(s.len(), |(i, _)| i);
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        if unit.is_empty() {
            return Err(ParseDurationError::MissingUnit(input.to_string()));
        }
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(ParseDurationError::UnknownUnit {
                    unit: unit.to_string(),
                    input: input.to_string(),
                })
            }
        };
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut value = whole.checked_mul(scale).ok_or_else(invalid)?;
        if !frac_part.is_empty() {
            // Go keeps as many fractional digits as fit; nanosecond precision is plenty.
            let mut frac_ns: u128 = 0;
            let mut div: u128 = 1;
            for d in frac_part.bytes().take(20) {
                frac_ns = frac_ns * 10 + u128::from(d - b'0');
                div *= 10;
            }
            // Checked: absurd inputs (`?wait=` is user input) must be an error, not overflow.
            value = frac_ns
                .checked_mul(scale)
                .map(|v| v / div)
                .and_then(|f| value.checked_add(f))
                .ok_or_else(invalid)?;
        }
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > i64::MAX as u128 {
            return Err(invalid());
        }
    }
    if negative && total != 0 {
        return Err(invalid());
    }
    let secs = (total / 1_000_000_000) as u64;
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Formats like Go's `Duration.String()`: `0s`, `250ms`, `1.5s`, `1m30s`, `1h0m0s`.
pub fn format(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_string();
    }
    if ns < 1_000_000_000 {
        // Sub-second: the largest unit that keeps the integer part non-zero.
        let (unit, scale) = if ns < 1_000 {
            ("ns", 1)
        } else if ns < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", frac(ns, scale));
    }
    let hours = ns / 3_600_000_000_000;
    let rem = ns % 3_600_000_000_000;
    let mins = rem / 60_000_000_000;
    let sec_ns = rem % 60_000_000_000;
    let secs = frac(sec_ns, 1_000_000_000);
    if hours > 0 {
        format!("{hours}h{mins}m{secs}s")
    } else if mins > 0 {
        format!("{mins}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// `value / scale` as a decimal without trailing zeros (`1500, 1000` → `1.5`).
fn frac(value: u128, scale: u128) -> String {
    let whole = value / scale;
    let rest = value % scale;
    if rest == 0 {
        return whole.to_string();
    }
    let width = scale.to_string().len() - 1;
    let digits = format!("{rest:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_clients_send() {
        assert_eq!(parse("120000ms"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse("10µs"), Ok(Duration::from_micros(10)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("+3s"), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn rejects_with_go_messages() {
        assert_eq!(
            parse("abc").unwrap_err().to_string(),
            "time: invalid duration \"abc\""
        );
        assert_eq!(
            parse("10").unwrap_err().to_string(),
            "time: missing unit in duration \"10\""
        );
        assert_eq!(
            parse("10x").unwrap_err().to_string(),
            "time: unknown unit \"x\" in duration \"10x\""
        );
        assert!(parse("").is_err());
        assert!(parse(".s").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("340282366920938463463374607431.9s").is_err());
        assert!(parse("99999999999999999999.99999999999999999999h").is_err());
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_secs(10)), "10s");
        assert_eq!(format(Duration::from_secs(60)), "1m0s");
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        assert_eq!(format(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format(Duration::from_micros(3)), "3µs");
    }

    #[test]
    fn round_trips() {
        for ms in [
            1u64, 999, 1000, 1001, 59_999, 60_000, 3_599_999, 3_600_000, 86_400_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse(&format(d)), Ok(d), "{ms} ms");
        }
    }
}
