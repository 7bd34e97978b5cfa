//! Bounds on what a registration may hold, so that every row stays small and addressable:
//! an ID must fit in the URL that deregisters it, and one registration must not be able to
//! make every read of the catalog megabytes long. Consul itself bounds only service meta
//! (64 pairs, keys of 128 and values of 512 characters, checked in `http::validate_meta`);
//! the bounds here are the dev agent's own, far above what real services use, and refused
//! with a 400 in the same style (`Invalid service: ...`, `Invalid check: ...`).
//!
//! "Characters" are bytes, as in Consul's meta messages (Go's `len` of a string).

use super::decode::{CheckDef, ServiceDef};

/// Service `Name` and `ID`, check `CheckID`/`ID`, `Name` and `ServiceID`.
pub(crate) const MAX_NAME: usize = 512;
/// Tags of one service, and the length of each.
pub(crate) const MAX_TAGS: usize = 256;
pub(crate) const MAX_TAG: usize = 512;
/// `Address`, `SocketPath`, tagged addresses' `Address`, `TCP`, `TLSServerName`.
pub(crate) const MAX_ADDRESS: usize = 512;
/// `TaggedAddresses` entries, and their keys.
pub(crate) const MAX_TAGGED_ADDRESSES: usize = 16;
pub(crate) const MAX_TAGGED_KEY: usize = 128;
/// Checks in one service registration (`Check` plus `Checks`).
pub(crate) const MAX_CHECKS: usize = 32;
/// A check's `Notes` and `HTTP` URL.
pub(crate) const MAX_TEXT: usize = 4096;
/// An HTTP check's `Method`.
pub(crate) const MAX_METHOD: usize = 64;
/// An HTTP check's `Header`: names, and the bytes of all names and values together.
pub(crate) const MAX_HEADERS: usize = 64;
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// An HTTP check's `Body`.
pub(crate) const MAX_CHECK_BODY: usize = 64 * 1024;

fn too_long(field: &str, value: &str, limit: usize) -> Result<(), String> {
    if value.len() > limit {
        return Err(format!("{field} is too long (limit: {limit} characters)"));
    }
    Ok(())
}

fn too_many(what: &str, n: usize, limit: usize) -> Result<(), String> {
    if n > limit {
        return Err(format!("too many {what} (limit: {limit})"));
    }
    Ok(())
}

/// A service's own fields (its meta is Consul's `validateMetadata`; its checks
/// [`check`]); the message goes after `Invalid service: `.
pub(crate) fn service(def: &ServiceDef) -> Result<(), String> {
    too_long("Name", &def.name, MAX_NAME)?;
    too_long("ID", &def.id, MAX_NAME)?;
    too_long("Address", &def.address, MAX_ADDRESS)?;
    too_long("SocketPath", &def.socket_path, MAX_ADDRESS)?;
    too_many("Tags", def.tags.len(), MAX_TAGS)?;
    for tag in &def.tags {
        too_long("Tag", tag, MAX_TAG)?;
    }
    too_many(
        "TaggedAddresses",
        def.tagged_addresses.len(),
        MAX_TAGGED_ADDRESSES,
    )?;
    for (key, a) in &def.tagged_addresses {
        too_long("TaggedAddresses key", key, MAX_TAGGED_KEY)?;
        too_long("TaggedAddresses Address", &a.address, MAX_ADDRESS)?;
    }
    too_many("checks", def.checks.len(), MAX_CHECKS)
}

/// A check's fields; the message goes after `Invalid check: `.
pub(crate) fn check(def: &CheckDef) -> Result<(), String> {
    too_long("CheckID", &def.id, MAX_NAME)?;
    too_long("Name", &def.name, MAX_NAME)?;
    too_long("ServiceID", &def.service_id, MAX_NAME)?;
    too_long("Notes", &def.notes, MAX_TEXT)?;
    too_long("HTTP", &def.http, MAX_TEXT)?;
    too_long("Method", &def.method, MAX_METHOD)?;
    too_long("Body", &def.body, MAX_CHECK_BODY)?;
    too_long("TCP", &def.tcp, MAX_ADDRESS)?;
    too_long("TLSServerName", &def.tls_server_name, MAX_ADDRESS)?;
    too_many("Header names", def.header.len(), MAX_HEADERS)?;
    let header_bytes: usize = def
        .header
        .iter()
        .map(|(k, vs)| k.len() + vs.iter().map(String::len).sum::<usize>())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(format!(
            "Header is too long (limit: {MAX_HEADER_BYTES} characters in all)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_inclusive_and_name_the_field() {
        let mut def = ServiceDef {
            name: "n".repeat(MAX_NAME),
            ..Default::default()
        };
        assert_eq!(service(&def), Ok(()));
        def.name.push('n');
        assert_eq!(
            service(&def),
            Err("Name is too long (limit: 512 characters)".into())
        );
        def.name = "web".into();
        def.tags = vec!["t".into(); MAX_TAGS + 1];
        assert_eq!(service(&def), Err("too many Tags (limit: 256)".into()));
        let mut c = CheckDef {
            id: "c".repeat(MAX_NAME + 1),
            ..Default::default()
        };
        assert_eq!(
            check(&c),
            Err("CheckID is too long (limit: 512 characters)".into())
        );
        c.id = "c".into();
        c.header
            .insert("X".into(), vec!["v".repeat(MAX_HEADER_BYTES)]);
        assert!(check(&c).is_err_and(|e| e.starts_with("Header is too long")));
    }
}
