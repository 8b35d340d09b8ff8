//! The decision core, free of Python types: settings validation, per-node
//! health, writer and reader selection, and the scheduler that probes every
//! node and publishes what it decided.

pub mod config;
pub mod events;
pub mod node;
pub mod reads;
pub mod schedule;
pub mod script;
pub mod select;
pub mod state;
pub mod value;

pub use schedule::{Checker, NetworkProber, NodeProber, Prober, Route, Snapshot};
