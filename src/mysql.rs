//! The MySQL `role` probe session (to be written).

use std::time::Instant;

use crate::config::Node;
use crate::probe::{Failure, Session};

pub fn connect(node: &Node, deadline: Instant) -> Result<Box<dyn Session>, Failure> {
    let _ = (node, deadline);
    Err(Failure::Internal("not implemented".into()))
}
