//! `?filter=`: the subset of HashiCorp's go-bexpr that Consul's read endpoints evaluate.
//!
//! An expression is parsed once per request into an AST and evaluated against the JSON form of
//! each result item (the wire structs serialize with Consul's field names, so a selector such as
//! `Service.Meta.version` is a walk through object keys). Grammar and semantics follow go-bexpr
//! v0.1.2, the version Consul links (`consul-api.md` §1.4.1, §1.11):
//!
//! - `Sel == V`, `Sel != V`, `V in Sel`, `V not in Sel`, `Sel contains V`, `Sel not contains V`,
//!   `Sel matches V`, `Sel not matches V`, `Sel is empty`, `Sel is not empty`, combined with
//!   `not`, `and`, `or` (in rising order of looseness) and parentheses.
//! - Selectors: `Ident(.Ident | ["key"])*`, identifiers `[a-zA-Z][a-zA-Z0-9_]*`.
//! - Values: `"…"` (Go escapes, ended by the first `"`), `` `…` `` (raw), numbers
//!   `-?(0|[1-9][0-9]*)(.[0-9]+)?`, or a bare selector, which stands for its own text
//!   (`Node == dev` compares with `"dev"`).
//! - A value is coerced to the selected field's type: number fields take Go integer syntax,
//!   bool fields Go's `ParseBool`; a value that does not coerce is an error.
//! - `in`/`contains` test membership in an array, key presence in an object, and substring
//!   in a string. `is empty` tests the length of a string, array or object.
//! - A selector through an array (`Checks.Status`) matches when *any* element does, the full
//!   operator (negations included) applied per element; an empty array matches nothing.
//! - A missing key (or `null`) makes `==`, `in`, `is not empty` and `matches` false and their
//!   negations true.
//!
//! Errors read like go-bexpr's (`1:4 (3): no match found, expected: …`,
//! `rule "number": Invalid number literal`, `Invalid match operator "Equal" for selector …`)
//! behind Consul's `Failed to create boolean expression evaluator: ` prefix.
//!
//! Selectors are checked against the fields of the Go type Consul filters on each endpoint
//! (`fields`) before anything is evaluated, so an unknown field is an error even on an empty
//! result, as in Consul, and so is a value that does not coerce to an integer or bool field
//! (`Service.Port == "http"`). A key of a map (`Service.Meta.x`) may be anything, and fields the
//! wire omits when empty (`Service.Port` 0, `Kind`) are absent at evaluation. Not reproduced:
//! go-bexpr's per-type operator check (`Service.Port contains 1`) still happens per item.

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;
use serde::Serialize;
use serde_json::{Number, Value};

/// Consul's text before every filter error (`bexpr.CreateFilter`).
const PREFIX: &str = "Failed to create boolean expression evaluator";
/// Deepest nesting of parentheses and `not`; keeps hostile input off the stack.
const MAX_NESTING: usize = 100;
/// What may follow a selector that has no operator yet (go-bexpr's own list).
const AFTER_SELECTOR: &str = r#""!=", ".", "==", "[", [ \t\r\n] or [a-zA-Z0-9_]"#;

/// Why a filter could not be built or evaluated; `Display` is Consul's full message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FilterError(String);

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}: {}", self.0)
    }
}

impl std::error::Error for FilterError {}

/// One field of a filtered Go type, as go-bexpr sees it (see `fields`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field {
    /// Nothing below it: a string.
    Leaf(&'static str),
    /// An integer: a value compared with it must parse as one (Go's `ParseInt`).
    Int(&'static str),
    /// A bool: a value compared with it must parse as one (Go's `ParseBool`).
    Bool(&'static str),
    /// A struct, with its fields.
    Struct(&'static str, &'static [Field]),
    /// A slice: a selector goes on into its elements' fields (none for strings).
    List(&'static str, &'static [Field]),
    /// A map with string keys: any key, then the value's fields (none for strings).
    Map(&'static str, &'static [Field]),
    /// Anything below its name is accepted (configuration the dev agent does not model).
    Open(&'static str),
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Leaf(n) | Field::Int(n) | Field::Bool(n) | Field::Open(n) => n,
            Field::Struct(n, _) | Field::List(n, _) | Field::Map(n, _) => n,
        }
    }
}

/// A parsed `?filter=` expression.
#[derive(Debug)]
pub(crate) struct Filter {
    expr: Expr,
}

#[derive(Debug)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Match(Match),
}

#[derive(Debug)]
struct Match {
    selector: Vec<String>,
    op: Op,
    /// `None` only for `is empty` / `is not empty`.
    value: Option<MatchValue>,
}

#[derive(Debug)]
struct MatchValue {
    raw: String,
    /// Compiled once for `matches` / `not matches`.
    regex: Option<Regex>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Equal,
    NotEqual,
    In,
    NotIn,
    IsEmpty,
    IsNotEmpty,
    Matches,
    NotMatches,
}

impl Op {
    /// go-bexpr's name, as its error messages print it.
    fn name(self) -> &'static str {
        match self {
            Op::Equal => "Equal",
            Op::NotEqual => "Not Equal",
            Op::In => "In",
            Op::NotIn => "Not In",
            Op::IsEmpty => "Is Empty",
            Op::IsNotEmpty => "Is Not Empty",
            Op::Matches => "Matches",
            Op::NotMatches => "Not Matches",
        }
    }

    /// The answer for a missing key: nothing equals, contains or matches it, and it is empty.
    fn not_present(self) -> bool {
        matches!(
            self,
            Op::NotEqual | Op::NotIn | Op::IsEmpty | Op::NotMatches
        )
    }

    fn negated(self) -> bool {
        matches!(
            self,
            Op::NotEqual | Op::NotIn | Op::IsNotEmpty | Op::NotMatches
        )
    }
}

impl Filter {
    /// Parses an expression; the error is Consul's 500 text for a bad `?filter=`.
    pub(crate) fn parse(src: &str) -> Result<Self, FilterError> {
        let mut p = Parser {
            src,
            pos: 0,
            depth: 0,
        };
        p.ws();
        let expr = p.or()?;
        p.ws();
        if p.pos < src.len() {
            return Err(p.no_match(r#""and", "or", [ \t\r\n] or EOF"#));
        }
        Ok(Self { expr })
    }

    /// Parses an expression whose selectors must name fields of `fields` (the filtered
    /// type), as Consul checks them before evaluating anything.
    pub(crate) fn parse_for(src: &str, fields: &[Field]) -> Result<Self, FilterError> {
        let f = Self::parse(src)?;
        validate(&f.expr, fields).map_err(FilterError)?;
        Ok(f)
    }

    /// Whether `item`, in its JSON form, is selected.
    pub(crate) fn matches<T: Serialize>(&self, item: &T) -> Result<bool, FilterError> {
        let value = serde_json::to_value(item).map_err(|e| FilterError(e.to_string()))?;
        self.matches_value(&value)
    }

    /// Whether a JSON item is selected.
    pub(crate) fn matches_value(&self, item: &Value) -> Result<bool, FilterError> {
        eval(&self.expr, item).map_err(FilterError)
    }
}

/// The items `filter` selects, in order; all of them without a filter.
pub(crate) fn retain<T: Serialize>(
    filter: Option<&Filter>,
    items: Vec<T>,
) -> Result<Vec<T>, FilterError> {
    let Some(f) = filter else {
        return Ok(items);
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        if f.matches(&item)? {
            out.push(item);
        }
    }
    Ok(out)
}

/// The entries of a map whose *values* `filter` selects (Consul filters `agent/services` and
/// `agent/checks` by value); all of them without a filter.
pub(crate) fn retain_values<T: Serialize>(
    filter: Option<&Filter>,
    items: BTreeMap<String, T>,
) -> Result<BTreeMap<String, T>, FilterError> {
    let Some(f) = filter else {
        return Ok(items);
    };
    let mut out = BTreeMap::new();
    for (k, v) in items {
        if f.matches(&v)? {
            out.insert(k, v);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// go-bexpr's `validateRecurse`: every selector walks the type's fields; the first segment
/// that names nothing fails with the selector up to it. A value compared with an integer or
/// bool field must coerce to it, checked here too, before any item is looked at.
fn validate(expr: &Expr, fields: &[Field]) -> Result<(), String> {
    match expr {
        Expr::Or(items) | Expr::And(items) => items.iter().try_for_each(|e| validate(e, fields)),
        Expr::Not(e) => validate(e, fields),
        Expr::Match(m) => {
            let invalid = |upto: usize| {
                format!(
                    "Selector {:?} is not valid",
                    m.selector[..=upto.min(m.selector.len() - 1)].join(".")
                )
            };
            let mut level = fields;
            let mut i = 0;
            while i < m.selector.len() {
                let Some(field) = level.iter().find(|f| f.name() == m.selector[i]) else {
                    return Err(invalid(i));
                };
                match *field {
                    Field::Open(_) => return Ok(()),
                    Field::Leaf(_) => level = &[],
                    Field::Int(_) | Field::Bool(_) => {
                        if i + 1 < m.selector.len() {
                            return Err(invalid(i + 1));
                        }
                        return coerces(m, *field);
                    }
                    Field::Struct(_, sub) | Field::List(_, sub) => level = sub,
                    Field::Map(_, sub) => {
                        // The key: any.
                        i += 1;
                        level = sub;
                    }
                }
                i += 1;
                if i < m.selector.len() && level.is_empty() {
                    return Err(invalid(i));
                }
            }
            Ok(())
        }
    }
}

/// Whether the value of an equality on an integer or bool field coerces to the field's type.
fn coerces(m: &Match, field: Field) -> Result<(), String> {
    let (Some(value), Op::Equal | Op::NotEqual) = (&m.value, m.op) else {
        return Ok(());
    };
    match field {
        Field::Int(_) => parse_go_int(&value.raw)
            .map(|_| ())
            .map_err(|why| coerce_failed(m, &value.raw, "ParseInt", why)),
        Field::Bool(_) => coerce_bool(&value.raw, m).map(|_| ()),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

fn eval(expr: &Expr, item: &Value) -> Result<bool, String> {
    match expr {
        Expr::Or(items) => {
            for e in items {
                if eval(e, item)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Expr::And(items) => {
            for e in items {
                if !eval(e, item)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Expr::Not(e) => Ok(!eval(e, item)?),
        Expr::Match(m) => select(m, item, 0),
    }
}

/// Walks the selector from `depth` on; through an array, any element may match.
fn select(m: &Match, v: &Value, depth: usize) -> Result<bool, String> {
    let Some(key) = m.selector.get(depth) else {
        return apply(m, v);
    };
    match v {
        Value::Object(map) => match map.get(key) {
            Some(child) => select(m, child, depth + 1),
            None => Ok(m.op.not_present()),
        },
        Value::Array(items) => {
            for item in items {
                if select(m, item, depth)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Value::Null => Ok(m.op.not_present()),
        _ => Err(format!(
            "Selector {:?} is not valid",
            m.selector[..=depth].join(".")
        )),
    }
}

/// The operator on the selected value.
fn apply(m: &Match, v: &Value) -> Result<bool, String> {
    if v.is_null() {
        return Ok(m.op.not_present());
    }
    let raw = m.value.as_ref().map_or("", |x| x.raw.as_str());
    let positive = match m.op {
        Op::Equal | Op::NotEqual => match v {
            Value::String(s) => s == raw,
            Value::Number(n) => number_equals(n, raw, m)?,
            Value::Bool(b) => *b == coerce_bool(raw, m)?,
            _ => return Err(invalid_op(m)),
        },
        Op::In | Op::NotIn => match v {
            Value::String(s) => s.contains(raw),
            Value::Object(map) => map.contains_key(raw),
            Value::Array(items) => {
                let mut found = false;
                for item in items {
                    found |= match item {
                        Value::String(s) => s == raw,
                        // Mixed arrays: an element the value does not coerce to is skipped,
                        // as go-bexpr does for `[]interface{}`.
                        Value::Number(n) => number_equals(n, raw, m).unwrap_or(false),
                        Value::Bool(b) => parse_go_bool(raw) == Some(*b),
                        Value::Null => false,
                        Value::Array(_) | Value::Object(_) => return Err(invalid_op(m)),
                    };
                }
                found
            }
            _ => return Err(invalid_op(m)),
        },
        Op::IsEmpty | Op::IsNotEmpty => match v {
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => return Err(invalid_op(m)),
        },
        Op::Matches | Op::NotMatches => {
            match (v, m.value.as_ref().and_then(|x| x.regex.as_ref())) {
                (Value::String(s), Some(re)) => re.is_match(s),
                _ => return Err(invalid_op(m)),
            }
        }
    };
    Ok(positive != m.op.negated())
}

fn selector_text(m: &Match) -> String {
    m.selector.join(".")
}

fn invalid_op(m: &Match) -> String {
    format!(
        "Invalid match operator {:?} for selector {:?}",
        m.op.name(),
        selector_text(m)
    )
}

fn coerce_failed(m: &Match, raw: &str, func: &str, why: &str) -> String {
    format!(
        "Failed to coerce value {raw:?} for selector {:?}: strconv.{func}: parsing {raw:?}: {why}",
        selector_text(m)
    )
}

fn number_equals(n: &Number, raw: &str, m: &Match) -> Result<bool, String> {
    if let Some(i) = n
        .as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
    {
        return match parse_go_int(raw) {
            Ok(x) => Ok(x == i),
            Err(why) => Err(coerce_failed(m, raw, "ParseInt", why)),
        };
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    match raw.parse::<f64>() {
        Ok(x) => Ok(x == f),
        Err(_) => Err(coerce_failed(m, raw, "ParseFloat", "invalid syntax")),
    }
}

fn coerce_bool(raw: &str, m: &Match) -> Result<bool, String> {
    parse_go_bool(raw).ok_or_else(|| coerce_failed(m, raw, "ParseBool", "invalid syntax"))
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`: a sign, then `0x`, `0o`, `0b`, a leading `0` (octal) or
/// decimal digits, with `_` allowed between digits.
fn parse_go_int(s: &str) -> Result<i128, &'static str> {
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    // Go allows `_` only between digits (or after a base prefix).
    if digits.is_empty() || digits.ends_with('_') || digits.contains("__") {
        return Err("invalid syntax");
    }
    if digits.starts_with('_') && radix == 10 {
        return Err("invalid syntax");
    }
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if clean.is_empty() || !clean.chars().all(|c| c.is_digit(radix)) {
        return Err("invalid syntax");
    }
    let v = i128::from_str_radix(&clean, radix).map_err(|_| "value out of range")?;
    let v = if neg { -v } else { v };
    if v < i128::from(i64::MIN) || v > i128::from(i64::MAX) {
        return Err("value out of range");
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Parsing: a recursive-descent reading of go-bexpr's PEG grammar
// ---------------------------------------------------------------------------------------------

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic()
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    /// Skips whitespace; whether there was any.
    fn ws(&mut self) -> bool {
        let start = self.pos;
        while let Some(c) = self
            .peek()
            .filter(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))
        {
            self.pos += c.len_utf8();
        }
        self.pos > start
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    /// A keyword: the word, not followed by an identifier character.
    fn keyword(&mut self, kw: &str) -> bool {
        let rest = self.rest();
        if rest.starts_with(kw) && !rest[kw.len()..].chars().next().is_some_and(is_ident_char) {
            self.pos += kw.len();
            true
        } else {
            false
        }
    }

    /// pigeon's position prefix: `line:col (offset)`, col counted in characters.
    fn position(&self, at: usize) -> String {
        let before = &self.src[..at];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.src[line_start..at].chars().count() + 1;
        format!("{line}:{col} ({at})")
    }

    fn error_at(&self, at: usize, msg: &str) -> FilterError {
        FilterError(format!("{}: {msg}", self.position(at)))
    }

    fn no_match(&self, expected: &str) -> FilterError {
        self.error_at(self.pos, &format!("no match found, expected: {expected}"))
    }

    fn rule_error(&self, at: usize, rule: &str, msg: &str) -> FilterError {
        self.error_at(at, &format!("rule {rule:?}: {msg}"))
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        self.joined("or", Self::and, Expr::Or)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        self.joined("and", Self::unary, Expr::And)
    }

    /// `operand (keyword operand)*`: one operand stays as it is, several become `join(list)`.
    fn joined(
        &mut self,
        keyword: &str,
        operand: fn(&mut Self) -> Result<Expr, FilterError>,
        join: fn(Vec<Expr>) -> Expr,
    ) -> Result<Expr, FilterError> {
        let mut items = vec![operand(self)?];
        loop {
            let save = self.pos;
            if self.ws() && self.keyword(keyword) && self.ws() {
                items.push(operand(self)?);
            } else {
                self.pos = save;
                break;
            }
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            join(items)
        })
    }

    fn nest(&mut self) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.error_at(
                self.pos,
                &format!("expression nested more than {MAX_NESTING} levels deep"),
            ));
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        let save = self.pos;
        if self.keyword("not") && self.ws() {
            self.nest()?;
            let inner = self.unary()?;
            self.depth -= 1;
            // `not not x` is `x`, as go-bexpr folds it.
            return Ok(match inner {
                Expr::Not(e) => *e,
                e => Expr::Not(Box::new(e)),
            });
        }
        self.pos = save;
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, FilterError> {
        if self.eat("(") {
            self.nest()?;
            self.ws();
            let inner = self.or()?;
            self.ws();
            if !self.eat(")") {
                return Err(self.rule_error(self.pos, "grouping", "Unmatched parentheses"));
            }
            self.depth -= 1;
            return Ok(inner);
        }
        self.match_expr().map(Expr::Match)
    }

    fn match_expr(&mut self) -> Result<Match, FilterError> {
        match self.peek() {
            Some(c) if is_ident_start(c) => {
                let selector = self.selector()?;
                self.selector_tail(selector)
            }
            Some('"' | '`') => {
                let raw = self.string()?;
                self.value_in(raw)
            }
            Some(c) if c == '-' || c.is_ascii_digit() => {
                let raw = self.number()?;
                self.value_in(raw)
            }
            _ => Err(self.no_match(r#""(", "-", "0", "\"", "`", "not", [1-9] or [a-zA-Z]"#)),
        }
    }

    fn ident(&mut self) -> String {
        let start = self.pos;
        let len = self
            .rest()
            .char_indices()
            .find(|(i, c)| {
                !(if *i == 0 {
                    is_ident_start(*c)
                } else {
                    is_ident_char(*c)
                })
            })
            .map_or(self.rest().len(), |(i, _)| i);
        self.pos += len;
        self.src[start..self.pos].to_string()
    }

    /// `Ident ( "." Ident | "[" string "]" )*`; the caller saw an identifier start.
    fn selector(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.ident()];
        loop {
            let rest = self.rest();
            if rest.starts_with('.') && rest[1..].chars().next().is_some_and(is_ident_start) {
                self.pos += 1;
                path.push(self.ident());
            } else if rest.starts_with('[') {
                self.pos += 1;
                self.ws();
                if !matches!(self.peek(), Some('"' | '`')) {
                    return Err(self.rule_error(self.pos, "index", "Invalid index"));
                }
                path.push(self.string()?);
                self.ws();
                if !self.eat("]") {
                    return Err(self.rule_error(self.pos, "index", "Unclosed index expression"));
                }
            } else {
                return Ok(path);
            }
        }
    }

    /// The operator and value after a selector.
    fn selector_tail(&mut self, selector: Vec<String>) -> Result<Match, FilterError> {
        let spaced = self.ws();
        let op = if self.eat("==") {
            Op::Equal
        } else if self.eat("!=") {
            Op::NotEqual
        } else if !spaced {
            return Err(self.no_match(AFTER_SELECTOR));
        } else if self.keyword("contains") {
            Op::In
        } else if self.keyword("matches") {
            Op::Matches
        } else if self.keyword("is") {
            self.ws();
            if self.keyword("empty") {
                return Ok(Match {
                    selector,
                    op: Op::IsEmpty,
                    value: None,
                });
            }
            if self.keyword("not") && self.ws() && self.keyword("empty") {
                return Ok(Match {
                    selector,
                    op: Op::IsNotEmpty,
                    value: None,
                });
            }
            return Err(self.no_match(r#""empty" or "not""#));
        } else if self.keyword("in") {
            // The selector was a bare value: `dev in Node.Meta`.
            return self.in_selector(selector.join("."), Op::In);
        } else if self.keyword("not") {
            self.ws();
            if self.keyword("contains") {
                Op::NotIn
            } else if self.keyword("matches") {
                Op::NotMatches
            } else if self.keyword("in") {
                return self.in_selector(selector.join("."), Op::NotIn);
            } else {
                return Err(self.no_match(r#""contains", "in" or "matches""#));
            }
        } else {
            return Err(self.no_match(r#""!=", "==", "contains", "in", "is", "matches" or "not""#));
        };
        self.ws();
        let raw = self.value()?;
        let regex = if matches!(op, Op::Matches | Op::NotMatches) {
            Some(compile(&raw).map_err(FilterError)?)
        } else {
            None
        };
        Ok(Match {
            selector,
            op,
            value: Some(MatchValue { raw, regex }),
        })
    }

    /// `in` / `not in` after a literal value.
    fn value_in(&mut self, raw: String) -> Result<Match, FilterError> {
        let save = self.pos;
        if self.ws() {
            if self.keyword("in") {
                return self.in_selector(raw, Op::In);
            }
            if self.keyword("not") && self.ws() && self.keyword("in") {
                return self.in_selector(raw, Op::NotIn);
            }
        }
        self.pos = save;
        Err(self.no_match(r#""in", "not" or [ \t\r\n]"#))
    }

    /// The selector after `in` / `not in`.
    fn in_selector(&mut self, raw: String, op: Op) -> Result<Match, FilterError> {
        let spaced = self.ws();
        if !spaced || !self.peek().is_some_and(is_ident_start) {
            return Err(self.rule_error(self.pos, "match", "Invalid selector"));
        }
        let selector = self.selector()?;
        Ok(Match {
            selector,
            op,
            value: Some(MatchValue { raw, regex: None }),
        })
    }

    /// A value: a bare selector (its text), a number or a string.
    fn value(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some(c) if is_ident_start(c) => Ok(self.selector()?.join(".")),
            Some('"' | '`') => self.string(),
            Some(c) if c == '-' || c.is_ascii_digit() => self.number(),
            _ => Err(self.no_match(r#""-", "0", "\"", "`", [1-9] or [a-zA-Z]"#)),
        }
    }

    /// `-?(0|[1-9][0-9]*)(.[0-9]+)?`, which must end at whitespace, `)` or the end.
    fn number(&mut self) -> Result<String, FilterError> {
        let start = self.pos;
        self.eat("-");
        let digits = |p: &mut Self| {
            let n = p.rest().bytes().take_while(u8::is_ascii_digit).count();
            p.pos += n;
            n
        };
        if !self.eat("0") {
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(self.no_match(r#""0" or [1-9]"#));
            }
            digits(self);
        }
        if self.rest().starts_with('.')
            && self.rest()[1..].starts_with(|c: char| c.is_ascii_digit())
        {
            self.pos += 1;
            digits(self);
        }
        if !matches!(self.peek(), None | Some(' ' | '\t' | '\r' | '\n' | ')')) {
            return Err(self.rule_error(self.pos, "number", "Invalid number literal"));
        }
        Ok(self.src[start..self.pos].to_string())
    }

    /// A `"…"` or `` `…` `` literal, unquoted like Go's `strconv.Unquote`.
    fn string(&mut self) -> Result<String, FilterError> {
        let start = self.pos;
        let Some(quote) = self.peek() else {
            return Err(self.no_match(r#""\"" or "`""#));
        };
        self.pos += 1;
        let Some(len) = self.rest().find(quote) else {
            self.pos = self.src.len();
            return Err(self.rule_error(self.pos, "string", "Unterminated string literal"));
        };
        let body = &self.src[self.pos..self.pos + len];
        self.pos += len + 1;
        if quote == '`' {
            // Go drops carriage returns from raw strings.
            return Ok(body.replace('\r', ""));
        }
        unquote(body).ok_or_else(|| self.rule_error(start, "string", "invalid syntax"))
    }
}

/// The escapes of a Go double-quoted string (the body between the quotes).
fn unquote(body: &str) -> Option<String> {
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '\n' {
            return None;
        }
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let e = chars.next()?;
        let simple = match e {
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0b),
            '\\' => Some(b'\\'),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        let mut take = |n: usize, radix: u32| -> Option<u32> {
            let s: String = (0..n).filter_map(|_| chars.next()).collect();
            if s.chars().count() != n {
                return None;
            }
            u32::from_str_radix(&s, radix).ok()
        };
        match e {
            'x' => out.push(u8::try_from(take(2, 16)?).ok()?),
            '0'..='7' => {
                let rest = take(2, 8)?;
                let v = e.to_digit(8)? * 64 + rest;
                out.push(u8::try_from(v).ok()?);
            }
            'u' | 'U' => {
                let c = char::from_u32(take(if e == 'u' { 4 } else { 8 }, 16)?)?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            _ => return None,
        }
    }
    // Go strings may hold any bytes; ours are UTF-8, so a stray `\xff` becomes U+FFFD.
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Compiles a `matches` value, with go-bexpr's message on failure.
fn compile(raw: &str) -> Result<Regex, String> {
    Regex::new(raw).map_err(|e| {
        // The regex crate's message spans several lines with a caret; keep the reason.
        let text = e.to_string();
        let reason = text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or(text.trim())
            .to_string();
        format!("Failed to compile regular expression {raw:?}: error parsing regexp: {reason}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Value {
        json!({
            "Node": {"Node": "dev", "Address": "127.0.0.1", "Meta": {"consul-version": "1.21.0"}},
            "Service": {
                "ID": "web-1", "Service": "web", "Tags": ["v1", "primary"],
                "Meta": {"version": "2", "env": "prod"}, "Port": 8080,
                "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
                "Proxy": {"Expose": {}},
            },
            "Checks": [
                {"CheckID": "serfHealth", "Status": "passing", "ServiceTags": []},
                {"CheckID": "service:web-1", "Status": "critical", "ServiceTags": ["v1"]},
            ],
            "Locality": null,
        })
    }

    fn eval_on(src: &str, item: &Value) -> Result<bool, String> {
        let f = Filter::parse(src).map_err(|e| e.to_string())?;
        f.matches_value(item).map_err(|e| e.to_string())
    }

    fn is(src: &str) -> bool {
        eval_on(src, &entry()).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    fn parse_err(src: &str) -> String {
        match Filter::parse(src) {
            Ok(f) => panic!("{src} parsed: {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn equality_on_strings_numbers_and_bools() {
        assert!(is(r#"Service.ID == "web-1""#));
        assert!(is(r#"Service.ID != "web-2""#));
        assert!(!is(r#"Service.ID == "web""#));
        assert!(is("Service.ID == `web-1`"));
        // A bare selector as the value stands for its text.
        assert!(is("Node.Node == dev"));
        assert!(is("Service.Port == 8080"));
        assert!(
            is(r#"Service.Port == "8080""#),
            "values coerce to the field"
        );
        assert!(is(r#"Service.Port == "0x1f90""#), "Go integer syntax");
        assert!(parse_err("Service.Port == 0x1f90").contains("Invalid number literal"));
        assert!(is("Service.Port != 80"));
        assert!(is("Service.Weights.Passing == 1"));
        assert!(is("Service.EnableTagOverride == false"));
        assert!(is("Service.EnableTagOverride == F"));
        assert!(is("Service.EnableTagOverride != true"));
        assert!(is(r#"Service.Meta.version == "2""#));
        assert!(is(r#"Service.Meta["version"] == "2""#));
        assert!(is(r#"Service.Meta[ `env` ] == prod"#));
        assert!(is(r#"Node.Meta["consul-version"] == "1.21.0""#));
    }

    #[test]
    fn membership_substring_and_keys() {
        assert!(is(r#""v1" in Service.Tags"#));
        assert!(is(r#"v1 in Service.Tags"#));
        assert!(!is(r#""v2" in Service.Tags"#));
        assert!(is(r#""v2" not in Service.Tags"#));
        assert!(is(r#"Service.Tags contains "primary""#));
        assert!(is(r#"Service.Tags not contains "canary""#));
        assert!(is(r#""eb-" in Service.ID"#), "substring in a string");
        assert!(is(r#"Service.ID contains "web""#));
        assert!(is(r#""env" in Service.Meta"#), "key presence in a map");
        assert!(!is(r#""zone" in Service.Meta"#));
    }

    #[test]
    fn regex_matching_is_unanchored() {
        assert!(is(r#"Service.ID matches "^web-[0-9]+$""#));
        assert!(is(r#"Service.ID matches "eb""#));
        assert!(is(r#"Service.ID not matches "^api""#));
        assert!(is(r#"Service.Meta.env matches "pro?d""#));
        assert!(
            !is(r#"Service.Meta.zone matches ".*""#),
            "missing: no match"
        );
        assert!(is(r#"Service.Meta.zone not matches ".*""#));
    }

    #[test]
    fn emptiness() {
        assert!(is("Service.Tags is not empty"));
        assert!(is("Checks is not empty"));
        assert!(is("Service.Proxy.Expose is empty"));
        assert!(is("Service.Meta.zone is empty"), "a missing key is empty");
        assert!(!is("Service.Meta.zone is not empty"));
        assert!(is("Locality is empty"), "null is absent");
        assert!(is("Service.Meta.env is not empty"));
    }

    #[test]
    fn a_selector_through_an_array_matches_any_element() {
        assert!(is(r#"Checks.Status == "passing""#));
        assert!(is(r#"Checks.Status == "critical""#));
        assert!(!is(r#"Checks.Status == "warning""#));
        // The operator, negations included, applies per element.
        assert!(is(r#"Checks.Status != "passing""#));
        assert!(!is(r#"not (Checks.Status != "passing")"#));
        assert!(is(r#"Checks.CheckID contains "web-1""#));
        assert!(is(r#""v1" in Checks.ServiceTags"#));
        assert!(is("Checks.ServiceTags is empty"));
        let none = json!({"Checks": []});
        for src in [
            r#"Checks.Status == "passing""#,
            r#"Checks.Status != "passing""#,
            "Checks.Status is empty",
        ] {
            assert_eq!(eval_on(src, &none), Ok(false), "{src}: nothing matches");
        }
    }

    #[test]
    fn missing_keys_follow_go_bexpr() {
        for (src, want) in [
            (r#"Service.Meta.zone == "a""#, false),
            (r#"Service.Meta.zone != "a""#, true),
            (r#""a" in Service.Meta.zone"#, false),
            (r#""a" not in Service.Meta.zone"#, true),
            (r#"Nope.Deeper == "a""#, false),
            (r#"Nope.Deeper != "a""#, true),
        ] {
            assert_eq!(is(src), want, "{src}");
        }
    }

    #[test]
    fn logic_precedence_and_parentheses() {
        assert!(is(r#"Service.ID == "web-1" and "v1" in Service.Tags"#));
        assert!(!is(r#"Service.ID == "x" and "v1" in Service.Tags"#));
        assert!(is(r#"Service.ID == "x" or "v1" in Service.Tags"#));
        assert!(is(r#"not Service.ID == "x""#));
        assert!(is(r#"not not Service.ID == "web-1""#));
        // `and` binds tighter than `or`; `not` tighter than both.
        assert!(is(
            r#"Service.ID == "web-1" or Service.ID == "x" and Service.ID == "y""#
        ));
        assert!(!is(
            r#"(Service.ID == "web-1" or Service.ID == "x") and Service.ID == "y""#
        ));
        assert!(!is(r#"not Service.ID == "web-1" or Service.ID == "x""#));
        assert!(is(
            "  ( Service.Port == 8080 )\n\tand\r\n(Service.Meta.env == prod)  "
        ));
        assert!(is(r#"((("v1" in Service.Tags)))"#));
    }

    #[test]
    fn go_string_escapes() {
        let item = json!({"A": "a\"b", "B": "tab\there", "C": "é", "D": "x\\y"});
        assert_eq!(eval_on(r#"B == "tab\there""#, &item), Ok(true));
        assert_eq!(eval_on(r#"C == "\u00e9""#, &item), Ok(true));
        assert_eq!(eval_on(r#"C == "\xc3\xa9""#, &item), Ok(true));
        assert_eq!(eval_on(r#"C == "\303\251""#, &item), Ok(true));
        assert_eq!(eval_on(r#"D == "x\\y""#, &item), Ok(true));
        assert_eq!(eval_on(r#"D == `x\y`"#, &item), Ok(true));
        assert_eq!(eval_on("A == `a\"b`", &item), Ok(true));
        // The literal ends at the first quote, so `\"` cannot be written.
        assert_eq!(
            parse_err(r#"A == "a\"b""#),
            format!(r#"{PREFIX}: 1:6 (5): rule "string": invalid syntax"#)
        );
        assert_eq!(
            parse_err(r#"A == "bad\q""#),
            format!(r#"{PREFIX}: 1:6 (5): rule "string": invalid syntax"#)
        );
    }

    #[test]
    fn parse_errors_read_like_go_bexpr() {
        // Consul issue #7338 shows this exact text for `foo`.
        assert_eq!(
            parse_err("foo"),
            format!(
                r#"{PREFIX}: 1:4 (3): no match found, expected: "!=", ".", "==", "[", [ \t\r\n] or [a-zA-Z0-9_]"#
            )
        );
        // Consul issue #9441 shows this one for an unquoted IP address.
        assert_eq!(
            parse_err("Address == 10.10.10.10 "),
            format!(r#"{PREFIX}: 1:17 (16): rule "number": Invalid number literal"#)
        );
        assert_eq!(
            parse_err(r#"Service.ID == "web"#),
            format!(r#"{PREFIX}: 1:19 (18): rule "string": Unterminated string literal"#)
        );
        assert_eq!(
            parse_err(r#"(Service.ID == "a""#),
            format!(r#"{PREFIX}: 1:19 (18): rule "grouping": Unmatched parentheses"#)
        );
        assert_eq!(
            parse_err(r#""a" in "b""#),
            format!(r#"{PREFIX}: 1:8 (7): rule "match": Invalid selector"#)
        );
        assert_eq!(
            parse_err("Meta[x] == 1"),
            format!(r#"{PREFIX}: 1:6 (5): rule "index": Invalid index"#)
        );
        assert_eq!(
            parse_err(r#"Meta["x" == 1"#),
            format!(r#"{PREFIX}: 1:10 (9): rule "index": Unclosed index expression"#)
        );
        for src in [
            "",
            "   ",
            r#"Service.ID == "a")"#,
            r#"Service.ID = "a""#,
            r#"Service.ID == "a" and"#,
            r#"Service.ID == "a" xor Service.ID == "b""#,
            "Service.Tags is full",
            r#""a" == Service.ID"#,
            r#"Service.ID ==="#,
            "Service. == 1",
            "== 1",
        ] {
            let e = parse_err(src);
            assert!(e.starts_with(PREFIX), "{src}: {e}");
            assert!(e.contains("no match found"), "{src}: {e}");
        }
        let e = parse_err("Service.Port == 1\n and Service.ID ==");
        assert!(e.contains(": 2:19 (36): "), "line and column: {e}");
    }

    #[test]
    fn bad_regular_expressions_fail_to_parse() {
        let e = parse_err(r#"Service.ID matches "(""#);
        assert!(
            e.starts_with(&format!(
                r#"{PREFIX}: Failed to compile regular expression "(": error parsing regexp: "#
            )),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!(
            "{}Service.ID == \"a\"{}",
            "(".repeat(5000),
            ")".repeat(5000)
        );
        assert!(parse_err(&deep).contains("nested more than"));
        let nots = format!("{}Service.ID == \"a\"", "not ".repeat(5000));
        assert!(parse_err(&nots).contains("nested more than"));
        let fine = format!(
            "{}Service.ID == \"web-1\"{}",
            "(".repeat(50),
            ")".repeat(50)
        );
        assert!(is(&fine));
        // Long flat chains are not nesting.
        let chain = vec![r#"Service.ID == "x""#; 2000].join(" or ");
        assert!(!is(&chain));
    }

    #[test]
    fn type_errors_are_reported_at_evaluation() {
        for (src, want) in [
            (
                r#"Service.Port == "http""#,
                r#"Failed to coerce value "http" for selector "Service.Port": strconv.ParseInt: parsing "http": invalid syntax"#,
            ),
            (
                "Service.EnableTagOverride == yes",
                r#"Failed to coerce value "yes" for selector "Service.EnableTagOverride": strconv.ParseBool: parsing "yes": invalid syntax"#,
            ),
            (
                r#"Service.Tags == "v1""#,
                r#"Invalid match operator "Equal" for selector "Service.Tags""#,
            ),
            (
                r#"Service.Meta != "x""#,
                r#"Invalid match operator "Not Equal" for selector "Service.Meta""#,
            ),
            (
                r#"Service.Port matches "80""#,
                r#"Invalid match operator "Matches" for selector "Service.Port""#,
            ),
            (
                "Service.Port is empty",
                r#"Invalid match operator "Is Empty" for selector "Service.Port""#,
            ),
            (
                r#""x" in Checks"#,
                r#"Invalid match operator "In" for selector "Checks""#,
            ),
            (
                r#"Service.ID.Deeper == "x""#,
                r#"Selector "Service.ID.Deeper" is not valid"#,
            ),
        ] {
            assert_eq!(
                eval_on(src, &entry()),
                Err(format!("{PREFIX}: {want}")),
                "{src}"
            );
        }
    }

    #[test]
    fn go_integers() {
        assert_eq!(parse_go_int("42"), Ok(42));
        assert_eq!(parse_go_int("-42"), Ok(-42));
        assert_eq!(parse_go_int("+7"), Ok(7));
        assert_eq!(parse_go_int("0x1F"), Ok(31));
        assert_eq!(parse_go_int("0o17"), Ok(15));
        assert_eq!(parse_go_int("017"), Ok(15));
        assert_eq!(parse_go_int("0b101"), Ok(5));
        assert_eq!(parse_go_int("1_000"), Ok(1000));
        assert_eq!(parse_go_int("0"), Ok(0));
        for bad in ["", "-", "1.5", "abc", "08", "1__0", "_1", "1_"] {
            assert_eq!(parse_go_int(bad), Err("invalid syntax"), "{bad}");
        }
        assert_eq!(
            parse_go_int("9223372036854775808"),
            Err("value out of range")
        );
        assert_eq!(
            parse_go_int("-9223372036854775808"),
            Ok(i128::from(i64::MIN))
        );
    }

    #[test]
    fn selectors_must_name_fields_of_the_filtered_type() {
        use crate::agent::fields::SERVICE_ENTRY;
        let check = |src: &str| {
            Filter::parse_for(src, SERVICE_ENTRY)
                .map(|_| ())
                .map_err(|e| e.0)
        };
        for ok in [
            r#"Service.Meta.anything == "1""#,
            r#"Service.Meta["any key"] is empty"#,
            "Service.TaggedAddresses.lan_ipv4.Port == 80",
            r#""v1" in Service.Tags"#,
            r#"Checks.Status == "passing""#,
            r#"Node.Meta is not empty and Service.PeerName == """#,
            r#"Service.Proxy.Upstreams.DestinationName == "db""#,
            "Node.Locality.Zone == a",
            r#"Service.Port == 80 and Checks.CreateIndex != "0x10""#,
            "Service.EnableTagOverride == true",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("Nope == 1", r#"Selector "Nope" is not valid"#),
            (
                "Service.Nope == 1",
                r#"Selector "Service.Nope" is not valid"#,
            ),
            (
                "not (Checks.Nope == 1)",
                r#"Selector "Checks.Nope" is not valid"#,
            ),
            (
                "Service.Port.X == 1",
                r#"Selector "Service.Port.X" is not valid"#,
            ),
            (
                "Service.Meta.k.x == 1",
                r#"Selector "Service.Meta.k.x" is not valid"#,
            ),
            (
                r#""a" in Service.Tags.x"#,
                r#"Selector "Service.Tags.x" is not valid"#,
            ),
            ("service.ID == x", r#"Selector "service" is not valid"#),
            (
                "Service.Port.X == 1",
                r#"Selector "Service.Port.X" is not valid"#,
            ),
            (
                r#"Service.Port == "http""#,
                r#"Failed to coerce value "http" for selector "Service.Port": strconv.ParseInt: parsing "http": invalid syntax"#,
            ),
            (
                "Service.EnableTagOverride != maybe",
                r#"Failed to coerce value "maybe" for selector "Service.EnableTagOverride": strconv.ParseBool: parsing "maybe": invalid syntax"#,
            ),
        ] {
            assert_eq!(check(bad), Err(why.to_string()), "{bad}");
        }
    }

    #[test]
    fn retain_keeps_order_and_passes_everything_without_a_filter() {
        let items = vec![json!({"A": 1}), json!({"A": 2}), json!({"A": 1})];
        assert_eq!(retain(None, items.clone()), Ok(items.clone()));
        let f = Filter::parse("A == 1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            retain(Some(&f), items),
            Ok(vec![json!({"A": 1}), json!({"A": 1})])
        );
        let map: BTreeMap<String, Value> = [("x", 1), ("y", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!({ "A": v })))
            .collect();
        let kept = retain_values(Some(&f), map).unwrap_or_default();
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["x"]);
        let bad = Filter::parse(r#"A == "one""#).unwrap_or_else(|e| panic!("{e}"));
        assert!(retain(Some(&bad), vec![json!({"A": 1})]).is_err());
    }
}
