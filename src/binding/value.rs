//! Converts Django settings (Python objects) into the core's [`Value`].

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::checker::value::Value;

/// Deep enough for `DBHA` and `DATABASES`; stops self-referencing lists.
const MAX_DEPTH: usize = 8;

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
        return Value::Map(
            dict.iter()
                .map(|(key, value)| {
                    let key = match key.cast::<PyString>() {
                        Ok(s) => s.to_string_lossy().into_owned(),
                        Err(_) => repr(&key).to_string(),
                    };
                    (key, convert(&value, depth + 1))
                })
                .collect(),
        );
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        if let Ok(items) = obj.try_iter() {
            return Value::List(
                items
                    .flatten()
                    .map(|item| convert(&item, depth + 1))
                    .collect(),
            );
        }
    }
    repr(obj)
}

fn repr(obj: &Bound<'_, PyAny>) -> Value {
    Value::Other(obj.repr().map_or_else(
        |_| "<object>".to_owned(),
        |r| r.to_string_lossy().into_owned(),
    ))
}
