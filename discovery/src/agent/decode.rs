//! Strict decoding of registration bodies, with Consul's (Go's) rules.
//!
//! Consul decodes with `encoding/json` plus `DisallowUnknownFields`: keys match exactly first,
//! then ASCII-case-insensitively; only an explicit list of snake_case aliases is accepted;
//! any other key is `json: unknown field "K"`; `null` leaves the zero value; durations are Go
//! strings or nanosecond numbers. serde cannot express case-insensitive keys with an
//! unknown-field error, so the body is parsed to a `Value` and walked here by hand.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::wire::{ServiceAddress, Weights};

/// A decode failure; the text follows `Request decode failed: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub String);

type Result<T> = std::result::Result<T, DecodeError>;

/// Parses a request body as JSON with Go's messages for the common failures.
pub(crate) fn parse_body(body: &[u8]) -> Result<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError("EOF".into()));
    }
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        DecodeError(match e.classify() {
            Category::Eof => "unexpected EOF".to_string(),
            _ => {
                // Go names the offending character; serde gives a line/column instead.
                let offending = e
                    .column()
                    .checked_sub(1)
                    .and_then(|c| nth_byte_of_line(body, e.line(), c));
                match offending {
                    Some(b) => format!(
                        "invalid character '{}' looking for beginning of value",
                        char::from(b)
                    ),
                    None => e.to_string(),
                }
            }
        })
    })
}

fn nth_byte_of_line(body: &[u8], line: usize, col: usize) -> Option<u8> {
    body.split(|b| *b == b'\n')
        .nth(line.checked_sub(1)?)
        .and_then(|l| l.get(col).copied())
}

fn json_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "bool".into(),
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                "number".into()
            } else {
                format!("number {n}")
            }
        }
        Value::String(_) => "string".into(),
        Value::Array(_) => "array".into(),
        Value::Object(_) => "object".into(),
    }
}

/// A field of a Go struct: its canonical name and accepted snake_case aliases.
struct Field {
    name: &'static str,
    aliases: &'static [&'static str],
}

const fn f(name: &'static str) -> Field {
    Field { name, aliases: &[] }
}

/// Where a value sits, for Go-style type errors: `ServiceDefinition.Check.Interval`.
#[derive(Clone)]
struct Path {
    strukt: &'static str,
    field: String,
}

impl Path {
    fn root(strukt: &'static str) -> Self {
        Self {
            strukt,
            field: String::new(),
        }
    }
    fn child(&self, name: &str) -> Self {
        let field = if self.field.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.field)
        };
        Self {
            strukt: self.strukt,
            field,
        }
    }
    fn type_error(&self, v: &Value, go_type: &str) -> DecodeError {
        DecodeError(format!(
            "json: cannot unmarshal {} into Go struct field {}.{} of type {go_type}",
            json_kind(v),
            self.strukt,
            self.field
        ))
    }
}

/// Matches the keys of `obj` to `fields` the way Go does; unknown keys are an error.
fn match_fields<'a>(
    obj: &'a Map<String, Value>,
    fields: &[Field],
) -> Result<BTreeMap<&'static str, &'a Value>> {
    let mut out = BTreeMap::new();
    for (key, value) in obj {
        let field = fields
            .iter()
            .find(|fd| fd.name == key || fd.aliases.contains(&key.as_str()))
            .or_else(|| {
                fields.iter().find(|fd| {
                    fd.name.eq_ignore_ascii_case(key)
                        || fd.aliases.iter().any(|a| a.eq_ignore_ascii_case(key))
                })
            })
            .ok_or_else(|| DecodeError(format!("json: unknown field \"{key}\"")))?;
        // A later duplicate replaces an earlier one, as in Go; `null` never overwrites a value
        // an alias already set.
        if !value.is_null() || !out.contains_key(field.name) {
            out.insert(field.name, value);
        }
    }
    Ok(out)
}

fn object<'a>(v: &'a Value, path: &Path, go_type: &str) -> Result<Option<&'a Map<String, Value>>> {
    match v {
        Value::Null => Ok(None),
        Value::Object(m) => Ok(Some(m)),
        other => Err(path.type_error(other, go_type)),
    }
}

fn string(v: Option<&&Value>, path: &Path) -> Result<String> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(path.type_error(other, "string")),
    }
}

fn boolean(v: Option<&&Value>, path: &Path) -> Result<bool> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(path.type_error(other, "bool")),
    }
}

fn int(v: Option<&&Value>, path: &Path) -> Result<i64> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| path.type_error(&Value::Number(n.clone()), "int")),
        Some(other) => Err(path.type_error(other, "int")),
    }
}

fn string_list(v: Option<&&Value>, path: &Path) -> Result<Vec<String>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                Value::Null => Ok(String::new()),
                other => Err(path.type_error(other, "string")),
            })
            .collect(),
        Some(other) => Err(path.type_error(other, "[]string")),
    }
}

fn string_map(v: Option<&&Value>, path: &Path) -> Result<BTreeMap<String, String>> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let Some(m) = object(v, path, "map[string]string")? else {
        return Ok(BTreeMap::new());
    };
    m.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            Value::Null => Ok((k.clone(), String::new())),
            other => Err(path.type_error(other, "string")),
        })
        .collect()
}

/// A Go `time.Duration` field: a duration string or a number of nanoseconds.
fn duration(v: Option<&&Value>, path: &Path) -> Result<Duration> {
    match v {
        None | Some(Value::Null) => Ok(Duration::ZERO),
        Some(Value::String(s)) => crate::duration::parse(s).map_err(|e| DecodeError(e.to_string())),
        Some(Value::Number(n)) => {
            let ns = n.as_f64().unwrap_or(0.0);
            if ns <= 0.0 {
                Ok(Duration::ZERO)
            } else {
                Ok(Duration::from_nanos(ns as u64))
            }
        }
        Some(other) => Err(path.type_error(other, "time.Duration")),
    }
}

/// A registered service, decoded (`structs.ServiceDefinition`).
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceDef {
    pub kind: String,
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub address: String,
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    pub meta: BTreeMap<String, String>,
    pub port: i64,
    pub socket_path: String,
    pub weights: Option<Weights>,
    pub enable_tag_override: bool,
    /// `Check` then `Checks`, in order; empty `Check` objects are dropped as Consul does.
    pub checks: Vec<CheckDef>,
    pub proxy: Option<Value>,
    pub connect: Option<Value>,
}

/// A check definition (`structs.CheckType`, or `CheckDefinition` for `check/register`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CheckDef {
    pub id: String,
    pub name: String,
    pub notes: String,
    pub status: String,
    pub service_id: String,
    pub http: String,
    pub method: String,
    pub header: BTreeMap<String, Vec<String>>,
    pub body: String,
    pub disable_redirects: bool,
    pub tcp: String,
    pub udp: String,
    pub grpc: String,
    pub h2ping: String,
    pub alias_node: String,
    pub alias_service: String,
    pub docker_container_id: String,
    pub os_service: String,
    pub script_args: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub ttl: Duration,
    pub success_before_passing: i64,
    pub failures_before_warning: i64,
    pub failures_before_critical: i64,
    pub deregister_critical_service_after: Duration,
    pub output_max_size: i64,
    pub tls_skip_verify: bool,
    pub tls_server_name: String,
}

impl CheckDef {
    /// `CheckType.Empty()`: an all-zero check is ignored.
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub(crate) fn is_script(&self) -> bool {
        !self.script_args.is_empty()
    }

    /// Consul's `CheckType.Validate`, message without the `Invalid check: ` prefix.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        let interval_kind = !self.http.is_empty()
            || !self.tcp.is_empty()
            || !self.udp.is_empty()
            || !self.grpc.is_empty()
            || !self.h2ping.is_empty()
            || !self.os_service.is_empty()
            || !self.script_args.is_empty()
            || !self.docker_container_id.is_empty();
        let alias = !self.alias_service.is_empty() || !self.alias_node.is_empty();
        if !self.interval.is_zero() && !self.ttl.is_zero() {
            return Err("Interval and TTL cannot both be specified".into());
        }
        if interval_kind && self.interval.is_zero() {
            return Err(
                "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
                    .into(),
            );
        }
        if alias && !self.interval.is_zero() {
            return Err("Interval cannot be set for Alias checks".into());
        }
        if alias && !self.ttl.is_zero() {
            return Err("TTL must be not be set for Alias checks".into());
        }
        if !interval_kind && !alias && self.ttl.is_zero() {
            return Err("TTL must be > 0 for TTL checks".into());
        }
        if self.output_max_size < 0 {
            return Err("MaxOutputMaxSize must be positive".into());
        }
        if self.failures_before_warning > self.failures_before_critical {
            return Err("FailuresBeforeWarning can't be higher than FailuresBeforeCritical".into());
        }
        Ok(())
    }
}

const SERVICE_FIELDS: &[Field] = &[
    f("Kind"),
    f("ID"),
    f("Name"),
    f("Tags"),
    f("Address"),
    Field {
        name: "TaggedAddresses",
        aliases: &["tagged_addresses"],
    },
    f("Meta"),
    f("Port"),
    f("SocketPath"),
    f("Check"),
    f("Checks"),
    f("Weights"),
    f("Token"),
    Field {
        name: "EnableTagOverride",
        aliases: &["enable_tag_override"],
    },
    f("Proxy"),
    f("Connect"),
    f("Locality"),
];

const CHECK_TYPE_FIELDS: &[Field] = &[
    f("CheckID"),
    f("Name"),
    f("Status"),
    f("Notes"),
    Field {
        name: "ScriptArgs",
        aliases: &["args", "script_args"],
    },
    f("HTTP"),
    f("H2PING"),
    Field {
        name: "H2PingUseTLS",
        aliases: &["h2ping_use_tls"],
    },
    f("Header"),
    f("Method"),
    f("Body"),
    f("DisableRedirects"),
    f("TCP"),
    f("TCPUseTLS"),
    f("UDP"),
    f("Interval"),
    f("AliasNode"),
    f("AliasService"),
    Field {
        name: "DockerContainerID",
        aliases: &["docker_container_id"],
    },
    f("Shell"),
    f("GRPC"),
    Field {
        name: "GRPCUseTLS",
        aliases: &["grpc_use_tls"],
    },
    f("OSService"),
    Field {
        name: "TLSServerName",
        aliases: &["tls_server_name"],
    },
    Field {
        name: "TLSSkipVerify",
        aliases: &["tls_skip_verify"],
    },
    f("Timeout"),
    f("TTL"),
    f("SuccessBeforePassing"),
    f("FailuresBeforeWarning"),
    f("FailuresBeforeCritical"),
    f("ProxyHTTP"),
    f("ProxyGRPC"),
    Field {
        name: "DeregisterCriticalServiceAfter",
        aliases: &["deregister_critical_service_after"],
    },
    f("OutputMaxSize"),
    // Accepted and ignored inside a service registration.
    Field {
        name: "ServiceID",
        aliases: &["service_id"],
    },
];

/// `CheckDefinition` (body of `/v1/agent/check/register`): `ID` and `Token` instead of
/// `CheckID`, plus everything of a check type.
const CHECK_DEFINITION_EXTRA: &[Field] = &[f("ID"), f("Token")];

const WEIGHTS_FIELDS: &[Field] = &[f("Passing"), f("Warning")];
const SERVICE_ADDRESS_FIELDS: &[Field] = &[f("Address"), f("Port")];

/// Decodes a `PUT /v1/agent/service/register` body.
pub(crate) fn service_definition(body: &[u8]) -> Result<ServiceDef> {
    let v = parse_body(body)?;
    let root = Path::root("ServiceDefinition");
    let Some(obj) = object(&v, &root, "structs.ServiceDefinition")? else {
        return Ok(ServiceDef::default());
    };
    let m = match_fields(obj, SERVICE_FIELDS)?;
    let p = |n: &str| root.child(n);
    let mut def = ServiceDef {
        kind: string(m.get("Kind"), &p("Kind"))?,
        id: string(m.get("ID"), &p("ID"))?,
        name: string(m.get("Name"), &p("Name"))?,
        tags: string_list(m.get("Tags"), &p("Tags"))?,
        address: string(m.get("Address"), &p("Address"))?,
        meta: string_map(m.get("Meta"), &p("Meta"))?,
        port: int(m.get("Port"), &p("Port"))?,
        socket_path: string(m.get("SocketPath"), &p("SocketPath"))?,
        enable_tag_override: boolean(m.get("EnableTagOverride"), &p("EnableTagOverride"))?,
        ..Default::default()
    };
    let _token = string(m.get("Token"), &p("Token"))?;
    if let Some(ta) = m.get("TaggedAddresses") {
        let tp = p("TaggedAddresses");
        if let Some(ta) = object(ta, &tp, "map[string]structs.ServiceAddress")? {
            for (k, v) in ta {
                let Some(addr) = object(v, &tp, "structs.ServiceAddress")? else {
                    continue;
                };
                let am = match_fields(addr, SERVICE_ADDRESS_FIELDS)?;
                def.tagged_addresses.insert(
                    k.clone(),
                    ServiceAddress {
                        address: string(am.get("Address"), &tp.child("Address"))?,
                        port: port_of(int(am.get("Port"), &tp.child("Port"))?)?,
                    },
                );
            }
        }
    }
    if let Some(w) = m.get("Weights") {
        let wp = p("Weights");
        if let Some(w) = object(w, &wp, "structs.Weights")? {
            let wm = match_fields(w, WEIGHTS_FIELDS)?;
            def.weights = Some(Weights {
                passing: int(wm.get("Passing"), &wp.child("Passing"))?,
                warning: int(wm.get("Warning"), &wp.child("Warning"))?,
            });
        }
    }
    for key in ["Proxy", "Connect"] {
        if let Some(v) = m.get(key) {
            if !v.is_null() {
                let v = (*v).clone();
                if key == "Proxy" {
                    def.proxy = Some(v);
                } else {
                    def.connect = Some(v);
                }
            }
        }
    }
    if let Some(c) = m.get("Check") {
        if let Some(obj) = object(c, &p("Check"), "structs.CheckType")? {
            let check = check_type(obj, &p("Check"), false)?;
            if !check.is_empty() {
                def.checks.push(check);
            }
        }
    }
    if let Some(cs) = m.get("Checks") {
        match cs {
            Value::Null => {}
            Value::Array(items) => {
                for item in items {
                    if let Some(obj) = object(item, &p("Checks"), "structs.CheckType")? {
                        def.checks.push(check_type(obj, &p("Checks"), false)?);
                    }
                }
            }
            other => return Err(p("Checks").type_error(other, "structs.CheckTypes")),
        }
    }
    Ok(def)
}

/// Decodes a `PUT /v1/agent/check/register` body.
pub(crate) fn check_definition(body: &[u8]) -> Result<CheckDef> {
    let v = parse_body(body)?;
    let root = Path::root("CheckDefinition");
    let Some(obj) = object(&v, &root, "structs.CheckDefinition")? else {
        return Ok(CheckDef::default());
    };
    check_type(obj, &root, true)
}

fn port_of(p: i64) -> Result<u16> {
    u16::try_from(p).map_err(|_| DecodeError(format!("invalid port {p}: out of range 0-65535")))
}

fn check_type(obj: &Map<String, Value>, path: &Path, definition: bool) -> Result<CheckDef> {
    let fields: Vec<Field> = CHECK_TYPE_FIELDS
        .iter()
        .filter(|fd| !(definition && fd.name == "CheckID"))
        .map(|fd| Field {
            name: fd.name,
            aliases: fd.aliases,
        })
        .chain(
            CHECK_DEFINITION_EXTRA
                .iter()
                .filter(|_| definition)
                .map(|fd| Field {
                    name: fd.name,
                    aliases: fd.aliases,
                }),
        )
        .collect();
    let m = match_fields(obj, &fields)?;
    let p = |n: &str| path.child(n);
    let mut header = BTreeMap::new();
    if let Some(h) = m.get("Header") {
        if let Some(h) = object(h, &p("Header"), "map[string][]string")? {
            for (k, v) in h {
                header.insert(k.clone(), string_list(Some(&v), &p("Header"))?);
            }
        }
    }
    let id_key = if definition { "ID" } else { "CheckID" };
    let check = CheckDef {
        id: string(m.get(id_key), &p(id_key))?,
        name: string(m.get("Name"), &p("Name"))?,
        notes: string(m.get("Notes"), &p("Notes"))?,
        status: string(m.get("Status"), &p("Status"))?,
        service_id: if definition {
            string(m.get("ServiceID"), &p("ServiceID"))?
        } else {
            let _ = string(m.get("ServiceID"), &p("ServiceID"))?;
            String::new()
        },
        http: string(m.get("HTTP"), &p("HTTP"))?,
        method: string(m.get("Method"), &p("Method"))?,
        header,
        body: string(m.get("Body"), &p("Body"))?,
        disable_redirects: boolean(m.get("DisableRedirects"), &p("DisableRedirects"))?,
        tcp: string(m.get("TCP"), &p("TCP"))?,
        udp: string(m.get("UDP"), &p("UDP"))?,
        grpc: string(m.get("GRPC"), &p("GRPC"))?,
        h2ping: string(m.get("H2PING"), &p("H2PING"))?,
        alias_node: string(m.get("AliasNode"), &p("AliasNode"))?,
        alias_service: string(m.get("AliasService"), &p("AliasService"))?,
        docker_container_id: string(m.get("DockerContainerID"), &p("DockerContainerID"))?,
        os_service: string(m.get("OSService"), &p("OSService"))?,
        script_args: string_list(m.get("ScriptArgs"), &p("ScriptArgs"))?,
        interval: duration(m.get("Interval"), &p("Interval"))?,
        timeout: duration(m.get("Timeout"), &p("Timeout"))?,
        ttl: duration(m.get("TTL"), &p("TTL"))?,
        success_before_passing: int(m.get("SuccessBeforePassing"), &p("SuccessBeforePassing"))?,
        failures_before_warning: int(m.get("FailuresBeforeWarning"), &p("FailuresBeforeWarning"))?,
        failures_before_critical: int(
            m.get("FailuresBeforeCritical"),
            &p("FailuresBeforeCritical"),
        )?,
        deregister_critical_service_after: duration(
            m.get("DeregisterCriticalServiceAfter"),
            &p("DeregisterCriticalServiceAfter"),
        )?,
        output_max_size: int(m.get("OutputMaxSize"), &p("OutputMaxSize"))?,
        tls_skip_verify: boolean(m.get("TLSSkipVerify"), &p("TLSSkipVerify"))?,
        tls_server_name: string(m.get("TLSServerName"), &p("TLSServerName"))?,
    };
    // Type-check the remaining known keys even though the dev agent ignores them.
    for (key, go) in [
        ("Shell", "string"),
        ("TCPUseTLS", "bool"),
        ("GRPCUseTLS", "bool"),
        ("H2PingUseTLS", "bool"),
        ("ProxyHTTP", "string"),
        ("ProxyGRPC", "string"),
        ("Token", "string"),
    ] {
        if let Some(v) = m.get(key) {
            let ok = matches!(
                (go, v),
                (_, Value::Null) | ("string", Value::String(_)) | ("bool", Value::Bool(_))
            );
            if !ok {
                return Err(p(key).type_error(v, go));
            }
        }
    }
    Ok(check)
}

/// Port of a decoded service: Go keeps an `int`; the dev agent only stores real ports.
pub(crate) fn service_port(def: &ServiceDef) -> Result<u16> {
    port_of(def.port)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        service_definition(body.as_bytes()).unwrap_err().0
    }

    #[test]
    fn keys_are_case_insensitive_with_aliases() {
        let d = service_definition(
            br#"{"name":"web","ID":"w1","PORT":80,"enable_tag_override":true,
                 "check":{"http":"http://x/","interval":"10s","deregister_critical_service_after":"1m"},
                 "Checks":null,"Weights":null}"#,
        )
        .unwrap();
        assert_eq!(d.name, "web");
        assert_eq!(d.port, 80);
        assert!(d.enable_tag_override);
        assert_eq!(d.checks.len(), 1);
        assert_eq!(d.checks[0].interval, Duration::from_secs(10));
        assert_eq!(
            d.checks[0].deregister_critical_service_after,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn unknown_and_unaliased_snake_case_fail() {
        assert_eq!(
            err(r#"{"Name":"a","Foo":1}"#),
            "json: unknown field \"Foo\""
        );
        assert_eq!(
            err(r#"{"Name":"a","Check":{"TTL":"5s","success_before_passing":2}}"#),
            "json: unknown field \"success_before_passing\""
        );
        assert_eq!(
            err(r#"{"Name":"a","Namespace":"default"}"#),
            "json: unknown field \"Namespace\""
        );
    }

    #[test]
    fn type_errors_and_bad_durations() {
        assert_eq!(
            err(r#"{"Name":"a","Port":"80"}"#),
            "json: cannot unmarshal string into Go struct field ServiceDefinition.Port of type int"
        );
        assert_eq!(
            err(r#"{"Name":"a","Check":{"TTL":"abc"}}"#),
            "time: invalid duration \"abc\""
        );
        assert_eq!(err(""), "EOF");
        assert_eq!(err("{"), "unexpected EOF");
        assert_eq!(
            err("xyz"),
            "invalid character 'x' looking for beginning of value"
        );
    }

    #[test]
    fn nanosecond_numbers_and_empty_checks() {
        let d =
            service_definition(br#"{"Name":"a","Check":{"TTL":5000000000},"Checks":[]}"#).unwrap();
        assert_eq!(d.checks[0].ttl, Duration::from_secs(5));
        let d = service_definition(br#"{"Name":"a","Check":{}}"#).unwrap();
        assert!(d.checks.is_empty());
    }

    #[test]
    fn validation_messages() {
        let c = |s: &str| {
            let d =
                service_definition(format!(r#"{{"Name":"a","Check":{s}}}"#).as_bytes()).unwrap();
            d.checks[0].validate()
        };
        assert_eq!(
            c(r#"{"HTTP":"http://x"}"#).unwrap_err(),
            "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
        );
        assert_eq!(
            c(r#"{"Name":"x"}"#).unwrap_err(),
            "TTL must be > 0 for TTL checks"
        );
        assert_eq!(
            c(r#"{"TTL":"1s","Interval":"1s"}"#).unwrap_err(),
            "Interval and TTL cannot both be specified"
        );
        assert!(c(r#"{"TCP":"a:1","Interval":"1s"}"#).is_ok());
    }
}
