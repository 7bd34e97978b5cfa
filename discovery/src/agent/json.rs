//! The agent's JSON encoding: Consul's dev-mode format, and arrays assembled from elements
//! encoded ahead of time, so that a large answer (every check of the node) costs a copy of its
//! rows' bytes rather than a clone and an encoding of every row.

use bytes::Bytes;
use serde::Serialize;

/// Consul in dev mode pretty-prints with four spaces and a trailing newline, and Go's
/// encoder escapes `<`, `>` and `&` inside strings.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Serializing our own wire types into memory cannot fail: no maps with non-string keys.
    if value.serialize(&mut ser).is_err() {
        return b"null\n".to_vec();
    }
    out.push(b'\n');
    if !out.iter().any(|b| matches!(b, b'<' | b'>' | b'&')) {
        return out;
    }
    let mut escaped = Vec::with_capacity(out.len() + 16);
    for b in out {
        match b {
            b'<' => escaped.extend_from_slice(b"\\u003c"),
            b'>' => escaped.extend_from_slice(b"\\u003e"),
            b'&' => escaped.extend_from_slice(b"\\u0026"),
            b => escaped.push(b),
        }
    }
    escaped
}

/// What [`encode`] writes for `value` as an element of a top-level array: its lines indented
/// one level, without the separator. Cut out of the encoding of a one-element array, so it is
/// the serializer's own output and not a copy of its format. Escaping `<`, `>` and `&` per
/// element is the same as escaping the whole array: the array's own bytes hold none of them.
pub(crate) fn array_element<T: Serialize>(value: &T) -> Bytes {
    let whole = encode(&[value]);
    match whole
        .strip_prefix(b"[\n")
        .and_then(|e| e.strip_suffix(b"\n]\n"))
    {
        // A copy, not a slice of `whole`: elements are kept, and `whole` has spare capacity.
        Some(element) => Bytes::copy_from_slice(element),
        // `encode` gave up (`null`); our wire types never get here.
        None => Bytes::from_static(b"    null"),
    }
}

/// A top-level array of elements from [`array_element`]: encodes to the same bytes as
/// [`encode`] of the elements' values.
#[derive(Debug, Default)]
pub(crate) struct Elements(pub Vec<Bytes>);

impl Elements {
    pub(crate) fn encode(&self) -> Vec<u8> {
        if self.0.is_empty() {
            return b"[]\n".to_vec();
        }
        let len = self.0.iter().map(|e| e.len() + 2).sum::<usize>() + 3;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(b"[\n");
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b",\n");
            }
            out.extend_from_slice(e);
        }
        out.extend_from_slice(b"\n]\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_is_pretty_and_html_escaped() {
        let out = String::from_utf8(encode(&json!({"a": "<b>&"}))).unwrap_or_default();
        assert_eq!(out, "{\n    \"a\": \"\\u003cb\\u003e\\u0026\"\n}\n");
    }

    #[test]
    fn elements_encode_as_the_array_of_their_values() {
        let values = [
            json!({"a": "x\ny\"<&>", "b": [1, {"c": {}}], "d": []}),
            json!("s"),
            json!(null),
            json!({}),
        ];
        for n in 0..=values.len() {
            let elements = Elements(values[..n].iter().map(array_element).collect());
            assert_eq!(elements.encode(), encode(&values[..n]), "{n} elements");
        }
    }
}
