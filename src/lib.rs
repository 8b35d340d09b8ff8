//! django-dbha: database high availability for Django, as a Rust health
//! checker behind a Python extension module.
//!
//! Layers, each using only those above it in this list:
//! - [`net`]: deadline-bounded sockets, TLS, failures;
//! - [`engines`]: the PostgreSQL and MySQL/MariaDB protocols on top;
//! - [`checker`]: the pure decision core (settings, health, selection,
//!   scheduler), with no Python types;
//! - `binding`: the `_core` Python module over the checker.

pub mod checker;
pub mod engines;
pub mod net;

mod binding;
