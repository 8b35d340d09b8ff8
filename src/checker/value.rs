//! Settings values as Django holds them: loosely typed, quoted back in
//! error messages the way Python would print them.

use std::fmt;

/// A Python settings value, kept just precise enough to validate it and to
/// quote it back to the user.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    /// A dict, in insertion order (order matters: groups and aliases are
    /// priorities).
    Map(Vec<(String, Value)>),
    /// Anything else, as its Python `repr()`.
    Other(String),
}

impl Value {
    pub fn str(s: &str) -> Self {
        Self::Str(s.to_owned())
    }

    /// `Some(v)` for the key in a map, `None` when absent or not a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Self::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Absent, `None` and `""` all mean "not set" in Django settings.
    pub fn is_unset(&self) -> bool {
        matches!(self, Self::None) || matches!(self, Self::Str(s) if s.is_empty())
    }
}

/// Python's `repr()`, close enough for messages.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Bool(true) => f.write_str("True"),
            Self::Bool(false) => f.write_str("False"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Float(x) => f.write_str(&python_float(*x)),
            Self::Str(s) => write_quoted(f, s),
            Self::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Self::Map(entries) => {
                f.write_str("{")?;
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write_quoted(f, key)?;
                    write!(f, ": {value}")?;
                }
                f.write_str("}")
            }
            Self::Other(repr) => f.write_str(repr),
        }
    }
}

/// A float as Python's `repr()` writes it: Rust's shortest round-trip
/// digits with the same switch to exponents, but `1e-09` and `1e+16`
/// rather than `1e-9` and `1e16`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let digits = format!("{x:?}");
    let Some((mantissa, exponent)) = digits.split_once('e') else {
        return digits;
    };
    let (sign, magnitude) = match exponent.strip_prefix('-') {
        Some(magnitude) => ('-', magnitude),
        None => ('+', exponent),
    };
    format!("{mantissa}e{sign}{magnitude:0>2}")
}

/// A string as Python's `repr()` writes it: single quotes unless it holds
/// a single quote and no double one, and unprintable characters escaped
/// (`\n`, `\x90`, `\u2028`).
fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    write!(f, "{quote}")?;
    for c in s.chars() {
        match c {
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if c == quote => write!(f, "\\{c}")?,
            c if !is_printable(c) => match u32::from(c) {
                n if n < 0x100 => write!(f, "\\x{n:02x}")?,
                n if n < 0x1_0000 => write!(f, "\\u{n:04x}")?,
                n => write!(f, "\\U{n:08x}")?,
            },
            c => write!(f, "{c}")?,
        }
    }
    write!(f, "{quote}")
}

/// Python's `str.isprintable()`, close enough for messages: control and
/// format characters and the separators other than the space are not.
fn is_printable(c: char) -> bool {
    !(c.is_control()
        || matches!(
            c,
            '\u{a0}' | '\u{ad}' | '\u{2028}' | '\u{2029}' | '\u{feff}'
        )
        || ('\u{2000}'..='\u{200f}').contains(&c)
        || ('\u{2060}'..='\u{2064}').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_python_repr() {
        let value = Value::Map(vec![
            (
                "A".into(),
                Value::List(vec![Value::str("x'y"), Value::Int(3)]),
            ),
            ("B".into(), Value::Float(1.0)),
            ("C".into(), Value::Bool(true)),
            ("D".into(), Value::None),
        ]);
        assert_eq!(
            value.to_string(),
            r#"{'A': ["x'y", 3], 'B': 1.0, 'C': True, 'D': None}"#
        );
    }

    #[test]
    fn strings_as_python_writes_them() {
        for (text, repr) in [
            ("plain", "'plain'"),
            ("it's", r#""it's""#),
            (r#"'"both"'"#, r#"'\'"both"\''"#),
            ("a\nb\tc\\", r"'a\nb\tc\\'"),
            ("\u{90}\u{0}", r"'\x90\x00'"),
            ("\u{2028}é", r"'\u2028é'"),
        ] {
            assert_eq!(Value::str(text).to_string(), repr, "{text:?}");
        }
    }

    #[test]
    fn floats_as_python_writes_them() {
        for (x, repr) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-9, "1e-09"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.234_567_890_123_456_8e17, "1.2345678901234568e+17"),
            (-2.5e-300, "-2.5e-300"),
            (f64::INFINITY, "inf"),
            (f64::NAN, "nan"),
        ] {
            assert_eq!(Value::Float(x).to_string(), repr);
        }
    }

    #[test]
    fn unset_means_absent_none_or_empty() {
        assert!(Value::None.is_unset());
        assert!(Value::str("").is_unset());
        assert!(!Value::str("x").is_unset());
        assert!(!Value::Int(0).is_unset());
    }
}
