//! Converts Django settings (Python objects) into the core's [`Value`].

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};

use crate::checker::value::Value;

/// Deep enough for `DBHA` and `DATABASES`; stops self-referencing lists.
const MAX_DEPTH: usize = 8;
/// More items than any setting has: a list that never ends is cut here.
const MAX_ITEMS: usize = 10_000;

pub fn to_value(obj: &Bound<'_, PyAny>) -> Value {
    convert(obj, 0)
}

fn convert(obj: &Bound<'_, PyAny>, depth: usize) -> Value {
    if obj.is_none() {
        return Value::None;
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Value::Bool(b.is_true());
    }
    if obj.is_instance_of::<PyInt>() {
        return obj.extract::<i64>().map_or_else(|_| repr(obj), Value::Int);
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Value::Float(f.value());
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Value::Str(s.to_string_lossy().into_owned());
    }
    if depth >= MAX_DEPTH {
        return repr(obj);
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        // A copy of the items: converting a value runs its `repr()`, which
        // may change the dict (iterating it then would panic).
        return Value::Map(
            dict.items()
                .iter()
                .take(MAX_ITEMS)
                .filter_map(|item| item.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>().ok())
                .map(|(key, value)| (key_text(&key), convert(&value, depth + 1)))
                .collect(),
        );
    }
    // Other mappings (`MappingProxyType`, a `UserDict`), in their order.
    if let Ok(mapping) = obj.cast::<PyMapping>() {
        if let Ok(items) = mapping.items() {
            return Value::Map(
                items
                    .iter()
                    .take(MAX_ITEMS)
                    .filter_map(|item| item.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>().ok())
                    .map(|(key, value)| (key_text(&key), convert(&value, depth + 1)))
                    .collect(),
            );
        }
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        if let Ok(items) = obj.try_iter() {
            // A subclass may iterate as it likes: stop at its first error,
            // and after more items than any setting has.
            return Value::List(
                items
                    .map_while(Result::ok)
                    .take(MAX_ITEMS)
                    .map(|item| convert(&item, depth + 1))
                    .collect(),
            );
        }
    }
    repr(obj)
}

fn key_text(key: &Bound<'_, PyAny>) -> String {
    match key.cast::<PyString>() {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => repr(key).to_string(),
    }
}

/// The first key of `databases` (a mapping) that is not valid text (a lone
/// surrogate): it cannot be an alias dbha hands back unchanged.
pub fn invalid_alias(databases: &Bound<'_, PyAny>) -> Option<String> {
    let keys = databases.cast::<PyMapping>().ok()?.keys().ok()?;
    keys.iter().find_map(|key| {
        let text = key.cast::<PyString>().ok()?;
        text.to_str().is_err().then(|| repr(&key).to_string())
    })
}

fn repr(obj: &Bound<'_, PyAny>) -> Value {
    Value::Other(obj.repr().map_or_else(
        |_| "<object>".to_owned(),
        |r| r.to_string_lossy().into_owned(),
    ))
}
