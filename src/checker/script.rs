//! Scripted answers in place of real probes, per alias: what `dbha.testing`
//! uses to make a node go down, hang, come back or be promoted without a
//! server, so that an application's own tests can exercise its failover.
//! Everything else (RISE/FALL, writer selection, fencing, reads) runs as in
//! production.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::config::Node;
use super::schedule::{NodeProber, Prober};
use crate::engines::Observation;
use crate::net::Failure;

/// What a scripted node answers every probe.
pub type Answer = Result<Observation, Failure>;

/// The scripted answers, by alias. Lock-free to read: probe threads read it,
/// and a forked child must never find it locked.
#[derive(Default)]
pub struct Script {
    answers: ArcSwap<HashMap<String, Answer>>,
}

impl Script {
    /// Scripts `alias` (`None`: probe it for real again).
    pub fn set(&self, alias: &str, answer: Option<&Answer>) {
        self.answers.rcu(|answers| {
            let mut answers = HashMap::clone(answers);
            match answer {
                Some(answer) => answers.insert(alias.to_owned(), answer.clone()),
                None => answers.remove(alias),
            };
            answers
        });
    }

    /// Every alias is probed for real again.
    pub fn clear(&self) {
        self.answers.store(Arc::default());
    }

    pub fn answer(&self, alias: &str) -> Option<Answer> {
        self.answers.load().get(alias).cloned()
    }

    fn is_scripted(&self, alias: &str) -> bool {
        self.answers.load().contains_key(alias)
    }
}

/// `inner`, except for the aliases the script answers for.
pub struct ScriptedProber<P> {
    pub inner: P,
    pub script: Arc<Script>,
}

impl<P: Prober> Prober for ScriptedProber<P> {
    fn for_node(&self, node: &Node) -> Box<dyn NodeProber> {
        Box::new(ScriptedNode {
            alias: node.alias.clone(),
            script: Arc::clone(&self.script),
            inner: self.inner.for_node(node),
        })
    }
}

struct ScriptedNode {
    alias: String,
    script: Arc<Script>,
    inner: Box<dyn NodeProber>,
}

impl NodeProber for ScriptedNode {
    fn probe(&mut self, timeout: Duration, check_new_sessions: bool) -> Answer {
        match self.script.answer(&self.alias) {
            Some(answer) => answer,
            None => self.inner.probe(timeout, check_new_sessions),
        }
    }

    fn watched_socket(&self) -> Option<RawFd> {
        // A real session kept from before the script says nothing now.
        if self.script.is_scripted(&self.alias) {
            None
        } else {
            self.inner.watched_socket()
        }
    }

    fn on_readable(&mut self, timeout: Duration) -> Option<Answer> {
        if self.script.is_scripted(&self.alias) {
            None
        } else {
            self.inner.on_readable(timeout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::config::Config;
    use crate::checker::value::Value;
    use crate::engines::Role;

    /// Answers "refused" for real, so a scripted answer is told apart.
    struct Real;

    impl Prober for Real {
        fn for_node(&self, _: &Node) -> Box<dyn NodeProber> {
            Box::new(Real)
        }
    }

    impl NodeProber for Real {
        fn probe(&mut self, _: Duration, _: bool) -> Answer {
            Err(Failure::Refused)
        }

        fn watched_socket(&self) -> Option<RawFd> {
            Some(7)
        }
    }

    #[test]
    fn a_script_stands_in_for_the_probes_of_its_aliases_only() {
        let entry = |port| {
            Value::Map(vec![
                ("ENGINE".into(), Value::str("django.db.backends.postgresql")),
                ("PORT".into(), Value::Int(port)),
            ])
        };
        let databases = Value::Map(vec![("a".into(), entry(1)), ("b".into(), entry(2))]);
        let config = Config::from_settings(&databases, &Value::None).unwrap();
        let script = Arc::new(Script::default());
        let prober = ScriptedProber {
            inner: Real,
            script: Arc::clone(&script),
        };
        let (mut a, mut b) = (
            prober.for_node(&config.nodes[0]),
            prober.for_node(&config.nodes[1]),
        );
        let primary = Observation {
            role: Some(Role::Primary),
            ..Observation::default()
        };
        script.set("a", Some(&Ok(primary)));
        assert_eq!(a.probe(Duration::ZERO, true), Ok(primary));
        assert_eq!(a.watched_socket(), None, "a real session says nothing now");
        assert_eq!(b.probe(Duration::ZERO, true), Err(Failure::Refused));
        assert_eq!(b.watched_socket(), Some(7));
        script.set("a", None);
        assert_eq!(a.probe(Duration::ZERO, true), Err(Failure::Refused));
        script.set("b", Some(&Err(Failure::Timeout)));
        script.clear();
        assert_eq!(b.probe(Duration::ZERO, true), Err(Failure::Refused));
    }
}
