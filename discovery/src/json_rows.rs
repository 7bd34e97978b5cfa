//! The elements of a JSON array, one at a time, as its bytes arrive.
//!
//! A `health/state/any` answer over 10,000 checks is 5.5 MB. Collected whole and decoded into
//! rows it costs a reader the body, the rows and their growth copies at once (tens of MB of
//! peak memory for a few numbers kept per service). [`ArrayRows`] instead finds where each
//! element of the top-level array begins and ends in the chunks as they come, and hands each
//! element's bytes to the caller, who decodes it alone (with `serde_json`) and keeps what it
//! needs. Only an element cut by a chunk boundary is copied.
//!
//! It checks the array's structure (brackets, strings, commas), not the elements' grammar:
//! that is the element decoder's job.

use std::fmt;

/// The largest single element accepted: a check row is under 1 KB unless its output is large
/// (Consul caps check output at 4 KB by default).
pub const MAX_ROW: usize = 1024 * 1024;

/// Why the bytes are not a JSON array of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowsError(pub String);

impl fmt::Display for RowsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a JSON array of rows: {}", self.0)
    }
}

impl std::error::Error for RowsError {}

impl From<RowsError> for crate::Error {
    fn from(e: RowsError) -> Self {
        crate::Error::Decode(serde::de::Error::custom(e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Before the opening `[`.
    Start,
    /// Between elements: a `,` or the closing `]` may come (or the first element).
    Between { expect_element: bool, first: bool },
    /// Inside an element.
    Element,
    /// After the closing `]`.
    Done,
}

/// Splits a top-level JSON array into its elements; see the module docs.
#[derive(Debug)]
pub struct ArrayRows {
    place: Place,
    /// Nesting depth inside the current element (`{`/`[` opened and not closed).
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The start of an element cut by a chunk boundary.
    carry: Vec<u8>,
    rows: usize,
}

impl Default for ArrayRows {
    fn default() -> Self {
        Self {
            place: Place::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            carry: Vec::new(),
            rows: 0,
        }
    }
}

impl ArrayRows {
    /// Feeds the next bytes; `row` gets every element they complete. An error from `row`
    /// stops the feed and is returned as it is.
    pub fn feed<E: From<RowsError>>(
        &mut self,
        chunk: &[u8],
        mut row: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        // Where the current element starts in this chunk (it may have started in an earlier
        // one, then its start is in `carry`).
        let mut start = 0;
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            match self.place {
                Place::Start => match b {
                    b'[' => {
                        self.place = Place::Between {
                            expect_element: true,
                            first: true,
                        }
                    }
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    _ => return Err(RowsError(format!("starts with {:?}", char::from(b))).into()),
                },
                Place::Between {
                    expect_element,
                    first,
                } => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b']' if !expect_element || first => self.place = Place::Done,
                    b',' if !expect_element => {
                        self.place = Place::Between {
                            expect_element: true,
                            first: false,
                        }
                    }
                    b']' | b',' => {
                        return Err(RowsError(format!("unexpected {:?}", char::from(b))).into())
                    }
                    _ if expect_element => {
                        self.place = Place::Element;
                        start = i;
                        // Seen again as the element's first byte.
                        continue;
                    }
                    _ => return Err(RowsError("missing comma between elements".into()).into()),
                },
                // Most of a row's bytes are inside strings: skip to the next quote or
                // backslash at once.
                Place::Element if self.in_string => {
                    if self.escaped {
                        self.escaped = false;
                    } else {
                        match memchr::memchr2(b'"', b'\\', &chunk[i..]) {
                            None => break,
                            Some(k) => {
                                i += k;
                                if chunk[i] == b'"' {
                                    self.in_string = false;
                                } else {
                                    self.escaped = true;
                                }
                            }
                        }
                    }
                }
                Place::Element => match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' if self.depth > 0 => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            self.end_row(&chunk[start..=i], &mut row)?;
                        }
                    }
                    // A scalar element ends where the array goes on or ends.
                    b',' | b']' if self.depth == 0 => {
                        self.end_row(&chunk[start..i], &mut row)?;
                        continue;
                    }
                    _ => {}
                },
                Place::Done => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    _ => return Err(RowsError("bytes after the array".into()).into()),
                },
            }
            i += 1;
        }
        if self.place == Place::Element {
            if self.carry.len() + (chunk.len() - start) > MAX_ROW {
                return Err(RowsError(format!("an element longer than {MAX_ROW} bytes")).into());
            }
            self.carry.extend_from_slice(&chunk[start..]);
        }
        Ok(())
    }

    /// Ends the current element with `tail` (its bytes in this chunk).
    fn end_row<E: From<RowsError>>(
        &mut self,
        tail: &[u8],
        row: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.place = Place::Between {
            expect_element: false,
            first: false,
        };
        self.rows += 1;
        if self.carry.is_empty() {
            return row(tail);
        }
        if self.carry.len() + tail.len() > MAX_ROW {
            return Err(RowsError(format!("an element longer than {MAX_ROW} bytes")).into());
        }
        self.carry.extend_from_slice(tail);
        let r = row(&self.carry);
        self.carry.clear();
        r
    }

    /// After the last chunk: the number of elements, or an error when the array is not
    /// closed.
    pub fn finish(&self) -> Result<usize, RowsError> {
        match self.place {
            Place::Done => Ok(self.rows),
            _ => Err(RowsError("the answer ended inside the array".into())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The elements of `json` fed in chunks of `size` bytes.
    fn split(json: &str, size: usize) -> Result<Vec<String>, RowsError> {
        let mut rows = ArrayRows::default();
        let mut out = Vec::new();
        for chunk in json.as_bytes().chunks(size.max(1)) {
            rows.feed(chunk, |r: &[u8]| {
                out.push(String::from_utf8(r.to_vec()).unwrap());
                Ok::<_, RowsError>(())
            })?;
        }
        let n = rows.finish()?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    #[test]
    fn every_chunking_gives_the_same_elements() {
        let json = r#" [ {"a":"x,]}\"{","b":[1,{"c":2}]} , {"d":null},{} ,"s\\",12 , [] ] "#;
        let whole = split(json, json.len()).unwrap();
        assert_eq!(
            whole,
            [
                r#"{"a":"x,]}\"{","b":[1,{"c":2}]}"#,
                r#"{"d":null}"#,
                "{}",
                r#""s\\""#,
                "12 ",
                "[]"
            ]
        );
        for size in 1..json.len() {
            assert_eq!(split(json, size).unwrap(), whole, "chunks of {size}");
        }
        // Each element decodes alone.
        for e in &whole {
            serde_json::from_str::<serde_json::Value>(e).unwrap();
        }
    }

    #[test]
    fn empty_arrays() {
        assert!(split("[]", 1).unwrap().is_empty());
        assert!(split(" [ \n ] ", 2).unwrap().is_empty());
    }

    #[test]
    fn structure_errors() {
        for bad in [
            "", "{}", "[", "[{}", "[{},", "[,{}]", "[{},]", "[{}{}]", "[{}] x", "[{}]]", "null",
        ] {
            for size in [1, 3, 64] {
                assert!(split(bad, size).is_err(), "{bad:?} in chunks of {size}");
            }
        }
    }

    #[test]
    fn an_oversized_element_is_refused() {
        let big = format!("[{{\"a\":\"{}\"}}]", "x".repeat(MAX_ROW));
        assert!(split(&big, 4096).is_err());
    }
}
