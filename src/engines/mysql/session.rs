//! The MySQL/MariaDB `role` probe's session: `read_only`, the replica lag,
//! and (MariaDB) the GTID positions that order promotions and tell whether
//! a replica has a given commit.

use std::time::{Duration, Instant};

use super::packets::{Conn, ResultSet};
use crate::engines::{Observation, Role};
use crate::net::Failure;

/// Works on MySQL and MariaDB (which has no `super_read_only`, and alone has
/// the `gtid_*_pos` variables) and needs no privilege.
pub const ROLE_SQL: &str = "SHOW GLOBAL VARIABLES WHERE Variable_name IN \
     ('read_only', 'super_read_only', 'gtid_binlog_pos', 'gtid_slave_pos')";

const ER_PARSE_ERROR: u16 = 1064;
/// Missing privilege for the replica status query.
const NO_PRIVILEGE: [u16; 3] = [1044, 1142, 1227];

/// Which statement reads the replica status on this server, learned once
/// per session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LagQuery {
    /// MariaDB ≥ 10.5, MySQL ≥ 8.0.22.
    Replica,
    Slave,
    /// The probe user may not read it: lag stays unknown, and we stop asking.
    Forbidden,
}

pub struct MySqlSession {
    pub conn: Conn,
    pub lag_query: LagQuery,
    pub endpoint: String,
}

impl MySqlSession {
    pub fn observe(&mut self, deadline: Instant) -> Result<Observation, Failure> {
        let variables = self
            .conn
            .query(ROLE_SQL, deadline)?
            .map_err(|e| Failure::ServerError(e.to_string()))?;
        let role = role_from(&variables)?;
        let (timeline, position) = gtid_order(&variables, role);
        // Only a standby's lag matters to routing; a primary gets one query
        // per round.
        let lag = match role {
            Role::Standby => self.replica_lag(deadline)?,
            Role::Primary => None,
        };
        Ok(Observation {
            role: Some(role),
            lag,
            timeline,
            position,
            upstream_timeline: None,
        })
    }

    fn replica_lag(&mut self, deadline: Instant) -> Result<Option<Duration>, Failure> {
        loop {
            let sql = match self.lag_query {
                LagQuery::Replica => "SHOW REPLICA STATUS",
                LagQuery::Slave => "SHOW SLAVE STATUS",
                LagQuery::Forbidden => return Ok(None),
            };
            match self.conn.query(sql, deadline)? {
                Ok(status) => return Ok(lag_from(&status)),
                Err(e) if e.code == ER_PARSE_ERROR && self.lag_query == LagQuery::Replica => {
                    self.lag_query = LagQuery::Slave;
                }
                Err(e) if NO_PRIVILEGE.contains(&e.code) => {
                    log::info!("{}: replica lag unknown: {}", self.endpoint, e.message);
                    self.lag_query = LagQuery::Forbidden;
                    return Ok(None);
                }
                // Lag is extra information: its absence must not fail the probe.
                Err(_) => return Ok(None),
            }
        }
    }
}

/// The row of a variable, if the server has it: its value may be NULL.
fn variable<'a>(variables: &'a ResultSet, wanted: &str) -> Option<&'a Option<String>> {
    variables.rows.iter().find_map(|row| match row.as_slice() {
        [Some(name), value] if name.eq_ignore_ascii_case(wanted) => Some(value),
        _ => None,
    })
}

pub fn role_from(variables: &ResultSet) -> Result<Role, Failure> {
    // Newer MariaDB has values beyond ON/OFF (NO_LOCK...): all are read-only.
    let on = |value: &Option<String>| {
        value
            .as_deref()
            .is_some_and(|v| !v.eq_ignore_ascii_case("OFF") && v != "0")
    };
    let Some(read_only) = variable(variables, "read_only") else {
        return Err(Failure::BadHandshake(
            "the server did not report read_only".into(),
        ));
    };
    let super_read_only = variable(variables, "super_read_only").is_some_and(on);
    Ok(if on(read_only) || super_read_only {
        Role::Standby
    } else {
        Role::Primary
    })
}

/// MariaDB's promotion order and data position, from its GTID variables
/// (`domain-server-sequence`, one per replication domain). `None` where
/// the server has no such variable (MySQL) or they cannot be compared.
///
/// - Timeline, on a primary: the highest sequence number in
///   `gtid_slave_pos`, the last transaction it applied as a replica. A
///   replica promoted from the current primary carries that primary's
///   sequence numbers up to its promotion; a primary that never replicated
///   has 0. So of two writable servers, the one promoted later has the
///   higher value, as with PostgreSQL's timelines.
/// - Position: on a primary the sequence number of its last binlogged
///   transaction (`gtid_binlog_pos`), on a replica the last one it applied
///   (`gtid_slave_pos`); with one replication domain they count the same
///   transactions.
pub fn gtid_order(variables: &ResultSet, role: Role) -> (Option<u64>, Option<u64>) {
    let text = |name| variable(variables, name).map(|v| v.as_deref().unwrap_or(""));
    let slave_pos = text("gtid_slave_pos");
    let binlog_pos = text("gtid_binlog_pos");
    let timeline = match (role, slave_pos) {
        (Role::Primary, Some(text)) => sequences(text).map(|s| s.into_iter().max().unwrap_or(0)),
        _ => None,
    };
    let own = match role {
        Role::Primary => binlog_pos,
        Role::Standby => slave_pos,
    };
    let position = own.and_then(sequences).and_then(|s| match s.as_slice() {
        [one] => Some(*one),
        _ => None,
    });
    (timeline, position)
}

/// The sequence numbers of a GTID list such as `0-1-100,1-2-7`; `None` if
/// it is not one.
fn sequences(list: &str) -> Option<Vec<u64>> {
    list.split(',')
        .map(str::trim)
        .filter(|gtid| !gtid.is_empty())
        .map(|gtid| {
            let mut parts = gtid.split('-');
            let (_domain, _server, sequence) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() {
                return None;
            }
            sequence.parse().ok()
        })
        .collect()
}

/// The largest lag over the replication channels; unknown if any channel's
/// is (SQL thread stopped) or if the server replicates from no one.
pub fn lag_from(status: &ResultSet) -> Option<Duration> {
    let column = status
        .columns
        .iter()
        .position(|c| c == "Seconds_Behind_Source" || c == "Seconds_Behind_Master")?;
    let mut lag = None;
    for row in &status.rows {
        let seconds: u64 = row.get(column)?.as_deref()?.trim().parse().ok()?;
        lag = lag.max(Some(Duration::from_secs(seconds)));
    }
    lag
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variables(pairs: &[(&str, &str)]) -> ResultSet {
        ResultSet {
            columns: vec!["Variable_name".into(), "Value".into()],
            rows: pairs
                .iter()
                .map(|(n, v)| vec![Some((*n).to_owned()), Some((*v).to_owned())])
                .collect(),
        }
    }

    #[test]
    fn role_from_read_only_and_super_read_only() {
        let role = |pairs: &[(&str, &str)]| role_from(&variables(pairs));
        assert_eq!(role(&[("read_only", "OFF")]), Ok(Role::Primary));
        assert_eq!(role(&[("read_only", "ON")]), Ok(Role::Standby));
        assert_eq!(role(&[("read_only", "NO_LOCK")]), Ok(Role::Standby));
        assert_eq!(
            role(&[("read_only", "OFF"), ("super_read_only", "OFF")]),
            Ok(Role::Primary)
        );
        assert_eq!(
            role(&[("super_read_only", "ON"), ("read_only", "OFF")]),
            Ok(Role::Standby)
        );
        assert!(matches!(role(&[]), Err(Failure::BadHandshake(_))));
    }

    #[test]
    fn gtid_timelines_and_positions() {
        let order = |pairs: &[(&str, &str)], role| gtid_order(&variables(pairs), role);
        // The original primary: never a replica.
        let original = [("gtid_binlog_pos", "0-1-500"), ("gtid_slave_pos", "")];
        assert_eq!(order(&original, Role::Primary), (Some(0), Some(500)));
        // Promoted after applying the original primary's 0-1-100.
        let promoted = [
            ("gtid_binlog_pos", "0-2-130"),
            ("gtid_slave_pos", "0-1-100"),
        ];
        assert_eq!(order(&promoted, Role::Primary), (Some(100), Some(130)));
        // A replica: its position is what it applied.
        assert_eq!(order(&promoted, Role::Standby), (None, Some(100)));
        // Several domains: positions are not comparable; timelines still are.
        let domains = [
            ("gtid_binlog_pos", "0-1-5,1-1-9"),
            ("gtid_slave_pos", "0-2-3,1-2-4"),
        ];
        assert_eq!(order(&domains, Role::Primary), (Some(4), None));
        // MySQL: no such variables.
        assert_eq!(order(&[("read_only", "OFF")], Role::Primary), (None, None));
        assert_eq!(
            order(&[("gtid_slave_pos", "junk")], Role::Primary),
            (None, None)
        );
    }

    #[test]
    fn lag_from_replica_status() {
        let status = |column: &str, values: &[Option<&str>]| ResultSet {
            columns: vec!["Replica_IO_State".into(), column.into()],
            rows: values
                .iter()
                .map(|v| vec![Some(String::new()), v.map(str::to_owned)])
                .collect(),
        };
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            lag_from(&status("Seconds_Behind_Source", &[Some("0")])),
            secs(0)
        );
        assert_eq!(
            lag_from(&status("Seconds_Behind_Master", &[Some("12")])),
            secs(12)
        );
        assert_eq!(
            lag_from(&status("Seconds_Behind_Source", &[Some("3"), Some("9")])),
            secs(9)
        );
        assert_eq!(lag_from(&status("Seconds_Behind_Master", &[None])), None);
        assert_eq!(
            lag_from(&status("Seconds_Behind_Master", &[Some("1"), None])),
            None
        );
        assert_eq!(lag_from(&status("Seconds_Behind_Master", &[])), None);
        assert_eq!(lag_from(&ResultSet::default()), None);
    }
}
