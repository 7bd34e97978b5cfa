//! The validated configuration of a worker, and the identity it derives once its port is bound.
//!
//! The CLI ([`crate::cli`]) converts flags into a [`Config`] once; [`crate::run`] only sees typed
//! values. Everything Consul would reject (bad meta keys, an "any" address) is rejected here,
//! before binding, so a typo ends the process with a clear message instead of a registration
//! retry loop that never succeeds.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use discovery::register::LeaveMode;
use discovery::ClientConfig;

use crate::Error;

/// Default service name.
pub const DEFAULT_SERVICE: &str = "web";
/// Default listen address (the first worker of the local demo).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9001";
/// Default text shown by `GET /`.
pub const DEFAULT_MESSAGE: &str = "hello";
/// Default period of Consul's HTTP check.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Default per-probe timeout of Consul's HTTP check.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `DeregisterCriticalServiceAfter`: how long a crashed worker lingers in Consul.
/// Consul raises anything below one minute to one minute.
pub const DEFAULT_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// Default time between leaving Consul and closing the listener: long enough for balancers
/// watching with blocking queries to see the change and stop sending new requests.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(2);
/// Default deadline for in-flight requests once the listener is closed.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Largest delay `/delay?ms=` and `--delay` accept, so a request cannot park a task forever.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// The default admin port is the service port plus this: 9001 → 10001, 9002 → 10002, so
/// several workers on one host get distinct, predictable admin ports without extra flags.
pub const ADMIN_PORT_OFFSET: u16 = 1000;

/// Consul's limits on service metadata (`structs.validateMetadata`), checked up front because
/// the agent answers a bad pair with a 400 that retrying can never fix.
const META_MAX_PAIRS: usize = 64;
const META_MAX_KEY: usize = 128;
const META_MAX_VALUE: usize = 512;

/// The address registered in Consul: a host (IP literal or DNS name) and, optionally, a port
/// that differs from the bound one (behind NAT or a port mapping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertise {
    /// IP literal (without brackets) or host name; never an "any" address.
    pub host: String,
    /// Port to register; the bound port when `None`.
    pub port: Option<u16>,
}

impl FromStr for Advertise {
    type Err = String;

    /// Accepts `10.0.0.5`, `10.0.0.5:9001`, `::1`, `[::1]`, `[::1]:9001`, `worker-1.local`,
    /// `worker-1.local:9001`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("the advertise address is empty".into());
        }
        let (host, port) = if let Ok(ip) = s.parse::<IpAddr>() {
            (ip.to_string(), None)
        } else if let Ok(sa) = s.parse::<SocketAddr>() {
            (sa.ip().to_string(), Some(sa.port()))
        } else if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            let ip: IpAddr = inner
                .parse()
                .map_err(|_| format!("{s:?} is not an IP address"))?;
            (ip.to_string(), None)
        } else if let Some((host, port)) = s.split_once(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
            (host.to_string(), Some(port))
        } else {
            (s.to_string(), None)
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            if ip.is_unspecified() {
                // Consul rejects it too ("Invalid service address"), and nobody can connect to it.
                return Err(format!(
                    "{s:?} is an \"any\" address; advertise an address other hosts can reach"
                ));
            }
        } else if !is_host_name(&host) {
            return Err(format!("{s:?} is neither an IP address nor a host name"));
        }
        if port == Some(0) {
            return Err(format!("{s:?}: port 0 cannot be advertised"));
        }
        Ok(Self { host, port })
    }
}

impl fmt::Display for Advertise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => f.write_str(&authority(&self.host, p)),
            None => f.write_str(&self.host),
        }
    }
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `host:port` for a URL authority; IPv6 literals get brackets.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `--admin`: where the control endpoint (`/admin/health`) listens, apart from the service.
///
/// It never shares the service port: a request relayed by a proxy on the same host arrives
/// from loopback, so the service port cannot tell an operator from a client of the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAddr {
    /// Loopback (of the service address's family) at the service port + [`ADMIN_PORT_OFFSET`];
    /// an ephemeral port when the service port is 0.
    Default,
    /// No admin listener: the health switch is unavailable.
    Off,
    /// This loopback address.
    At(SocketAddr),
}

impl FromStr for AdminAddr {
    type Err = String;

    /// Accepts `off` or `host:port` with a loopback IP (`127.0.0.1:10001`, `[::1]:0`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| format!("{s:?} is neither off nor an address like 127.0.0.1:10001"))?;
        if !addr.ip().to_canonical().is_loopback() {
            // Remote peers are refused by the handler anyway; binding there would only expose
            // the port.
            return Err(format!(
                "{addr} is not a loopback address; the admin listener serves this host only \
                 (use 127.0.0.1 or [::1])"
            ));
        }
        Ok(Self::At(addr))
    }
}

impl AdminAddr {
    /// The address to bind for a worker whose service listens on `listen`; `None` when off.
    pub fn resolve(self, listen: SocketAddr) -> Result<Option<SocketAddr>, Error> {
        let addr = match self {
            Self::Off => return Ok(None),
            Self::At(addr) => addr,
            Self::Default => {
                let ip = match listen.ip() {
                    IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                };
                let port = match listen.port() {
                    0 => 0,
                    p => p.checked_add(ADMIN_PORT_OFFSET).ok_or_else(|| {
                        Error::Config(format!(
                            "the default admin port is the service port + {ADMIN_PORT_OFFSET}, \
                             past 65535 for {listen}; pass --admin ADDR or --admin off"
                        ))
                    })?,
                };
                SocketAddr::new(ip, port)
            }
        };
        let same_ip = addr.ip() == listen.ip() || listen.ip().is_unspecified();
        if addr.port() != 0 && addr.port() == listen.port() && same_ip {
            return Err(Error::Config(format!(
                "--admin {addr} would share the service port of --listen {listen}; the admin \
                 listener needs a port of its own"
            )));
        }
        Ok(Some(addr))
    }
}

/// Settings of the HTTP check Consul runs against `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSettings {
    /// How often the agent probes.
    pub interval: Duration,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// `DeregisterCriticalServiceAfter`: cleans up after a worker that crashed.
    pub deregister_after: Duration,
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self {
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            deregister_after: DEFAULT_DEREGISTER_AFTER,
        }
    }
}

/// Everything [`crate::run`] needs besides the listener, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Service name registered in Consul.
    pub service: String,
    /// Instance ID; `<service>-<advertise host>-<port>` when `None`, computed once the port is
    /// bound (so port 0 works).
    pub id: Option<String>,
    /// Address registered in Consul; the listen IP when `None`, which must then not be an
    /// "any" address.
    pub advertise: Option<Advertise>,
    /// Consul tags.
    pub tags: Vec<String>,
    /// Consul service metadata.
    pub meta: BTreeMap<String, String>,
    /// Text shown by `GET /`.
    pub message: String,
    /// The Consul agent to register with; `None` serves without registering.
    pub consul: Option<ClientConfig>,
    /// The HTTP check registered with the service.
    pub check: CheckSettings,
    /// How to leave Consul on shutdown.
    pub leave: LeaveMode,
    /// Time between leaving Consul and closing the listener.
    pub drain_delay: Duration,
    /// Deadline for in-flight requests after the listener closed.
    pub shutdown_grace: Duration,
    /// When set, `PUT /admin/health` on the admin listener also needs this value in
    /// `X-Admin-Token`.
    pub admin_token: Option<String>,
    /// Fixed latency added to every request except `/health` and `/admin/health`.
    pub delay: Duration,
}

impl Default for Config {
    /// The CLI defaults, without Consul: a library user opts in to registration explicitly.
    fn default() -> Self {
        Self {
            service: DEFAULT_SERVICE.to_string(),
            id: None,
            advertise: None,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            message: DEFAULT_MESSAGE.to_string(),
            consul: None,
            check: CheckSettings::default(),
            leave: LeaveMode::default(),
            drain_delay: DEFAULT_DRAIN_DELAY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            admin_token: None,
            delay: Duration::ZERO,
        }
    }
}

impl Config {
    /// Checks everything that does not depend on the bound port. `listen` is the address about
    /// to be bound (its port may be 0).
    pub fn validate(&self, listen: SocketAddr) -> Result<(), Error> {
        validate_name("service name", &self.service)?;
        if let Some(id) = &self.id {
            validate_name("instance ID", id)?;
        }
        for tag in &self.tags {
            if tag.is_empty() || tag.chars().any(char::is_control) {
                return Err(Error::Config(format!("invalid tag {tag:?}")));
            }
        }
        validate_meta(&self.meta)?;
        if self.check.interval.is_zero() {
            return Err(Error::Config("the check interval must be > 0".into()));
        }
        if self.check.timeout.is_zero() {
            return Err(Error::Config("the check timeout must be > 0".into()));
        }
        if self.check.deregister_after.is_zero() {
            return Err(Error::Config(
                "the deregister-critical-service-after time must be > 0".into(),
            ));
        }
        if self.delay > MAX_DELAY {
            return Err(Error::Config(format!(
                "the fixed delay must be at most {}",
                discovery::duration::format(MAX_DELAY)
            )));
        }
        if self.admin_token.as_deref() == Some("") {
            return Err(Error::Config("the admin token is empty".into()));
        }
        advertise_host(self.advertise.as_ref(), listen).map(drop)
    }

    /// The identity registered and shown, once the listener is bound to `bound`.
    pub fn identity(&self, bound: SocketAddr) -> Result<Identity, Error> {
        self.validate(bound)?;
        let host = advertise_host(self.advertise.as_ref(), bound)?;
        let port = self
            .advertise
            .as_ref()
            .and_then(|a| a.port)
            .unwrap_or(bound.port());
        if port == 0 {
            return Err(Error::Config(
                "the listener is bound to port 0; bind it before computing the identity".into(),
            ));
        }
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("{}-{host}-{port}", self.service));
        Ok(Identity {
            service: self.service.clone(),
            id,
            host,
            port,
        })
    }
}

/// The host to register: the advertise host, else the listen IP unless it is "any".
fn advertise_host(advertise: Option<&Advertise>, listen: SocketAddr) -> Result<String, Error> {
    match advertise {
        Some(a) => Ok(a.host.clone()),
        None if listen.ip().is_unspecified() => Err(Error::Config(format!(
            "listening on {listen} needs --advertise: Consul must be given an address other \
             hosts can reach, never {}",
            listen.ip()
        ))),
        None => Ok(listen.ip().to_string()),
    }
}

fn validate_name(what: &str, s: &str) -> Result<(), Error> {
    if s.trim().is_empty() {
        return Err(Error::Config(format!("the {what} is empty")));
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(Error::Config(format!(
            "the {what} {s:?} contains whitespace, control characters or '/'"
        )));
    }
    Ok(())
}

/// Consul's metadata rules, with the same reasons the agent would give.
pub(crate) fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), Error> {
    if meta.len() > META_MAX_PAIRS {
        return Err(Error::Config(format!(
            "at most {META_MAX_PAIRS} meta pairs are allowed, got {}",
            meta.len()
        )));
    }
    for (k, v) in meta {
        let reason = if k.is_empty() {
            Some("key cannot be blank".to_string())
        } else if !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            Some("key may contain only letters, digits, '_' and '-'".to_string())
        } else if k.len() > META_MAX_KEY {
            Some(format!("key is longer than {META_MAX_KEY} characters"))
        } else if k.starts_with("consul-") {
            Some("key prefix 'consul-' is reserved for Consul".to_string())
        } else if v.len() > META_MAX_VALUE {
            Some(format!("value is longer than {META_MAX_VALUE} characters"))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::Config(format!("invalid meta {k:?}={v:?}: {reason}")));
        }
    }
    Ok(())
}

/// Who this instance is: fixed once the port is bound, shown by `GET /` and registered in Consul.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Service name.
    pub service: String,
    /// Instance (Consul service) ID.
    pub id: String,
    /// Registered host (IP literal or name).
    pub host: String,
    /// Registered port.
    pub port: u16,
}

impl Identity {
    /// `host:port`, with brackets for IPv6.
    pub fn address(&self) -> String {
        authority(&self.host, self.port)
    }

    /// The URL Consul probes.
    pub fn health_url(&self) -> String {
        format!("http://{}/health", self.address())
    }

    /// ID of the registered HTTP check.
    pub fn check_id(&self) -> String {
        format!("{}:http", self.id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_advertise_forms() {
        let a = |s: &str| s.parse::<Advertise>();
        assert_eq!(
            a("10.0.0.5").unwrap(),
            Advertise {
                host: "10.0.0.5".into(),
                port: None
            }
        );
        assert_eq!(a("10.0.0.5:9001").unwrap().port, Some(9001));
        assert_eq!(a("::1").unwrap().host, "::1");
        assert_eq!(a("[::1]").unwrap().host, "::1");
        assert_eq!(a("[::1]:80").unwrap(), a("[::1]:80").unwrap());
        assert_eq!(a("[::1]:80").unwrap().port, Some(80));
        assert_eq!(a("worker-1.local").unwrap().host, "worker-1.local");
        assert_eq!(a("worker-1.local:8080").unwrap().port, Some(8080));
        assert!(a("0.0.0.0").is_err());
        assert!(a("0.0.0.0:9001").is_err());
        assert!(a("::").is_err());
        assert!(a("[::]:1").is_err());
        assert!(a("").is_err());
        assert!(a("host:0").is_err());
        assert!(a("host:http").is_err());
        assert!(a("bad host").is_err());
        assert!(a("http://x").is_err());
    }

    #[test]
    fn any_address_needs_advertise() {
        let cfg = Config::default();
        assert!(cfg.validate(sa("0.0.0.0:9001")).is_err());
        assert!(cfg.validate(sa("[::]:9001")).is_err());
        assert!(cfg.validate(sa("127.0.0.1:9001")).is_ok());
        let cfg = Config {
            advertise: Some("10.0.0.5".parse().unwrap()),
            ..Config::default()
        };
        let id = cfg.identity(sa("0.0.0.0:9001")).unwrap();
        assert_eq!(id.host, "10.0.0.5");
        assert_eq!(id.port, 9001);
    }

    #[test]
    fn default_identity_uses_bound_port() {
        let id = Config::default().identity(sa("127.0.0.1:40123")).unwrap();
        assert_eq!(id.id, "web-127.0.0.1-40123");
        assert_eq!(id.check_id(), "web-127.0.0.1-40123:http");
        assert_eq!(id.health_url(), "http://127.0.0.1:40123/health");
        let v6 = Config::default().identity(sa("[::1]:80")).unwrap();
        assert_eq!(v6.health_url(), "http://[::1]:80/health");
        // An advertised port wins over the bound one (port mapping).
        let cfg = Config {
            advertise: Some("10.0.0.5:8080".parse().unwrap()),
            id: Some("w1".into()),
            ..Config::default()
        };
        let id = cfg.identity(sa("0.0.0.0:9001")).unwrap();
        assert_eq!(
            (id.id.as_str(), id.address().as_str()),
            ("w1", "10.0.0.5:8080")
        );
    }

    #[test]
    fn rejects_what_consul_would() {
        let meta = |k: &str, v: &str| {
            let mut m = BTreeMap::new();
            m.insert(k.to_string(), v.to_string());
            validate_meta(&m)
        };
        assert!(meta("version", "1.2.3").is_ok());
        assert!(meta("", "x").is_err());
        assert!(meta("a.b", "x").is_err());
        assert!(meta("consul-x", "x").is_err());
        assert!(meta(&"k".repeat(129), "x").is_err());
        assert!(meta("k", &"v".repeat(513)).is_err());
        let bad = |cfg: Config| cfg.validate(sa("127.0.0.1:1")).is_err();
        assert!(bad(Config {
            service: String::new(),
            ..Config::default()
        }));
        assert!(bad(Config {
            id: Some("a b".into()),
            ..Config::default()
        }));
        assert!(bad(Config {
            tags: vec![String::new()],
            ..Config::default()
        }));
        assert!(bad(Config {
            delay: MAX_DELAY + Duration::from_millis(1),
            ..Config::default()
        }));
        assert!(bad(Config {
            check: CheckSettings {
                interval: Duration::ZERO,
                ..CheckSettings::default()
            },
            ..Config::default()
        }));
    }
}
