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
            Self::Float(x) => write!(f, "{x:?}"),
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

fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("'")?;
    for c in s.chars() {
        match c {
            '\'' => f.write_str("\\'")?,
            '\\' => f.write_str("\\\\")?,
            c if c.is_control() => write!(f, "{}", c.escape_default())?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("'")
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
            r"{'A': ['x\'y', 3], 'B': 1.0, 'C': True, 'D': None}"
        );
    }

    #[test]
    fn unset_means_absent_none_or_empty() {
        assert!(Value::None.is_unset());
        assert!(Value::str("").is_unset());
        assert!(!Value::str("x").is_unset());
        assert!(!Value::Int(0).is_unset());
    }
}
