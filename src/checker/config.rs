//! The validated configuration: which aliases form which failover groups, how
//! each server is reached and probed, and the checker's timing.
//!
//! Input is Django's `DATABASES` and the optional `DBHA` dict as loosely typed
//! [`Value`]s; every problem becomes a [`ConfigError`] naming the setting key
//! and the offending value (never a password: only the keys read here are
//! ever quoted).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use super::value::Value;
use crate::engines::patroni::Api;
use crate::engines::{Engine, Login, Secret, Server};
use crate::net::{Endpoint, SslMode, Tls};

/// The database PostgreSQL's `role` probe logs into.
const MAINTENANCE_DATABASE: &str = "postgres";

/// The group `DBHA["DATABASES"]` (or the default) defines.
pub const DEFAULT_GROUP: &str = "default";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// A TCP (or unix socket) connect: sees a dead host, not a hung server.
    Tcp,
    /// Connect and a protocol exchange the server itself must answer.
    Handshake,
    /// Log in over one persistent connection and ask the server its role
    /// (primary or standby) and replication lag.
    Role,
    /// Ask the node's Patroni (REST API) whether it holds the leader lock.
    Patroni,
    /// Both `Patroni` and `Role`: writable only when they agree.
    PatroniAndRole,
}

impl ProbeKind {
    fn parse(value: &Value) -> Option<Self> {
        let name = |value: &Value| match value {
            Value::Str(name) => Some(name.clone()),
            _ => None,
        };
        match value {
            Value::Str(name) => match name.as_str() {
                "tcp" => Some(Self::Tcp),
                "handshake" => Some(Self::Handshake),
                "role" => Some(Self::Role),
                "patroni" => Some(Self::Patroni),
                _ => None,
            },
            Value::List(names) => {
                let mut names: Vec<String> = names.iter().map(name).collect::<Option<_>>()?;
                names.sort();
                (names == ["patroni", "role"]).then_some(Self::PatroniAndRole)
            }
            _ => None,
        }
    }

    /// Whether it tells a primary from a standby.
    pub fn knows_roles(self) -> bool {
        matches!(self, Self::Role | Self::Patroni | Self::PatroniAndRole)
    }

    fn name(self) -> Value {
        match self {
            Self::Tcp => Value::str("tcp"),
            Self::Handshake => Value::str("handshake"),
            Self::Role => Value::str("role"),
            Self::Patroni => Value::str("patroni"),
            Self::PatroniAndRole => Value::List(vec![Value::str("patroni"), Value::str("role")]),
        }
    }
}

/// Where reads go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Reads follow writes.
    Writer,
    /// Healthy standbys within `MAX_REPLICA_LAG`, else the writer.
    Replicas,
    /// Those standbys and the writer.
    Any,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    Random,
    /// The reader with the lowest latency in the last probe.
    Latency,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Reads {
    pub mode: ReadMode,
    pub max_lag: Duration,
    pub balance: Balance,
    /// Lower-cased `"app_label"` or `"app_label.modelname"` whose reads stay
    /// on the writer whatever `mode` says (sessions, auth).
    pub writer_only: Vec<String>,
    /// After a write, reads in the same context go only to standbys that
    /// have it (`READ_YOUR_WRITES`).
    pub read_your_writes: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnAllDown {
    /// Answer the last writer (or the first alias) and let Django raise its
    /// own connection error.
    Last,
    /// Raise `dbha.NoHealthyDatabase`.
    Raise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failback {
    /// Writes stay on the node they moved to while it is up.
    Sticky,
    /// Writes return to the highest-priority node as soon as it is up.
    Auto,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub alias: String,
    pub group: usize,
    pub engine: Engine,
    pub probe: ProbeKind,
    /// How to reach it and log in (the `role` probe).
    pub server: Server,
    /// Its Patroni REST API (the `patroni` probe).
    pub patroni: Option<Api>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    /// Indexes into [`Config::nodes`], in priority order.
    pub members: Range<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub check_interval: Duration,
    /// The hard deadline of one probe, name resolution to last byte.
    pub connect_timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Fraction of `check_interval` by which each round start is randomised,
    /// so that many processes do not probe in lockstep.
    pub jitter: f64,
    /// Between the rounds of a group that has no writer, or whose writer is
    /// suspect (`fastinter` in `HAProxy`).
    pub fast_interval: Duration,
    /// How often the writer must also accept a fresh connection; `None`
    /// only when the application reports a failure.
    pub listener_check_interval: Option<Duration>,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            jitter: 0.1,
            fast_interval: Duration::from_millis(100),
            listener_check_interval: Some(Duration::from_secs(10)),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Every probed server, grouped by group, each group in priority order.
    pub nodes: Vec<Node>,
    pub groups: Vec<Group>,
    /// Lower-cased `"app_label"` or `"app_label.modelname"` to group index.
    pub routes: HashMap<String, usize>,
    pub timing: Timing,
    pub on_all_down: OnAllDown,
    pub failback: Failback,
    pub reads: Reads,
    /// Settings that work but are likely mistakes (system check warnings).
    pub warnings: Vec<ConfigError>,
}

/// The shortest interval or deadline: anything shorter is a typo, and would
/// turn the checker into a load generator.
const MIN_TIMING: Duration = Duration::from_millis(10);

/// The most nodes in one group: the read routes are a 64-bit mask.
pub const MAX_GROUP_SIZE: usize = 64;

/// What is wrong with a setting: each kind has a stable Django system
/// check id, documented in the README.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// An unknown `DBHA` key.
    UnknownKey,
    /// A value of the wrong type.
    WrongType,
    /// A value of the right type but out of range, or not a known choice.
    BadValue,
    /// An alias or group name that does not exist.
    UnknownName,
    /// An alias in two groups, or twice in one.
    DuplicateAlias,
    /// SQLite in a group: there is no server to probe.
    Sqlite,
    /// A libpq multi-host `HOST`.
    MultiHost,
    /// A `DATABASES` entry dbha cannot probe (`ENGINE`, `PORT`, `HOST`, TLS).
    BadDatabase,
    /// A `PROBE_CREDENTIALS` entry without its own `PASSWORD`.
    MissingPassword,
    /// Two aliases of a group point at the same server.
    SameServer,
    /// A server dbha can only probe with `tcp` (warning).
    TcpOnly,
    /// Replica reads asked for, but no group has a node that could be one
    /// (warning).
    NoReplicas,
    /// A probe may take longer than the interval between rounds (warning).
    SlowProbe,
}

impl Problem {
    /// The Django system check id.
    pub fn check_id(self) -> &'static str {
        match self {
            Self::UnknownKey => "dbha.E001",
            Self::WrongType => "dbha.E002",
            Self::BadValue => "dbha.E003",
            Self::UnknownName => "dbha.E004",
            Self::DuplicateAlias => "dbha.E005",
            Self::Sqlite => "dbha.E006",
            Self::MultiHost => "dbha.E007",
            Self::BadDatabase => "dbha.E008",
            Self::MissingPassword => "dbha.E009",
            Self::SameServer => "dbha.E010",
            Self::TcpOnly => "dbha.W001",
            Self::NoReplicas => "dbha.W003",
            Self::SlowProbe => "dbha.W004",
        }
    }
}

/// A setting that cannot be used (or, from [`Config::warnings`], one that
/// works but is likely a mistake), with the key and value to quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub code: Problem,
    pub key: String,
    pub value: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.problem)
    }
}

impl std::error::Error for ConfigError {}

const KNOWN_KEYS: &[&str] = &[
    "DATABASES",
    "GROUPS",
    "ROUTES",
    "CHECK_INTERVAL",
    "CONNECT_TIMEOUT",
    "RISE",
    "FALL",
    "JITTER",
    "PROBE",
    "ON_ALL_DOWN",
    "FAILBACK",
    "PROBE_CREDENTIALS",
    "READS",
    "MAX_REPLICA_LAG",
    "LOAD_BALANCE",
    "WRITER_READS",
    "READ_YOUR_WRITES",
    "FAST_INTERVAL",
    "LISTENER_CHECK_INTERVAL",
    "PATRONI",
    // Read by the Python side alone (its system checks validate it).
    "HEALTH_VIEW_ACCESS",
];

fn dbha_key(key: &str) -> String {
    format!("DBHA[\"{key}\"]")
}

fn error(code: Problem, key: String, value: &Value, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        code,
        key,
        value: value.to_string(),
        problem: problem.into(),
    }
}

impl Config {
    /// Validates `settings.DATABASES` and `settings.DBHA` (`Value::None` when
    /// the project has none), knowing each engine by its name.
    pub fn from_settings(databases: &Value, dbha: &Value) -> Result<Self, ConfigError> {
        Self::from_django(databases, dbha, &Value::None)
    }

    /// Like [`Config::from_settings`], with each alias's backend `vendor`
    /// (`{"default": "postgresql"}`) as Django reports it: so that wrappers
    /// whose names say nothing (PostGIS, connection pools, metrics
    /// wrappers) are probed as the server they speak to.
    pub fn from_django(
        databases: &Value,
        dbha: &Value,
        vendors: &Value,
    ) -> Result<Self, ConfigError> {
        let dbha = Settings::new(dbha)?;
        let Value::Map(database_entries) = databases else {
            return Err(error(
                Problem::WrongType,
                "DATABASES".into(),
                &redacted(databases),
                "must be a dict of aliases",
            ));
        };
        let groups = dbha.groups(database_entries)?;
        let probe_kinds = dbha.probe_kinds(database_entries)?;
        dbha.check_credentials(&groups)?;
        dbha.check_patroni(database_entries)?;

        let mut nodes = Vec::new();
        let mut group_list = Vec::new();
        let mut warnings = Vec::new();
        for (group, (name, aliases)) in groups.into_iter().enumerate() {
            let start = nodes.len();
            let group_key = match dbha.get("GROUPS") {
                Some(_) => format!("{}[\"{name}\"]", dbha_key("GROUPS")),
                None if dbha.get("DATABASES").is_some() => dbha_key("DATABASES"),
                None => "DATABASES".to_owned(),
            };
            for alias in aliases {
                let entry = database_entries
                    .iter()
                    .find(|(a, _)| *a == alias)
                    .map_or(&Value::None, |(_, entry)| entry);
                let vendor = match vendors.get(&alias) {
                    Some(Value::Str(vendor)) => Some(vendor.as_str()),
                    _ => None,
                };
                let node = dbha.node(alias, group, entry, vendor, &probe_kinds, &mut warnings)?;
                if let Some(twin) = nodes[start..]
                    .iter()
                    .find(|n: &&Node| n.server.endpoint == node.server.endpoint)
                {
                    return Err(error(
                        Problem::SameServer,
                        group_key,
                        &Value::List(vec![Value::str(&twin.alias), Value::str(&node.alias)]),
                        format!(
                            "both aliases point at {}: a failover group needs a server of \
                             its own for each alias",
                            node.server.endpoint
                        ),
                    ));
                }
                nodes.push(node);
            }
            let size = nodes.len() - start;
            if size > MAX_GROUP_SIZE {
                return Err(error(
                    Problem::BadValue,
                    group_key,
                    &Value::Other(format!("{size} aliases")),
                    format!(
                        "a group has at most {MAX_GROUP_SIZE} aliases; split them into \
                         several with DBHA[\"GROUPS\"]"
                    ),
                ));
            }
            group_list.push(Group {
                name,
                members: start..nodes.len(),
            });
        }
        let routes = dbha.routes(&group_list)?;
        let timing = dbha.timing()?;
        let reads = dbha.reads()?;
        warnings.extend(dbha.warnings(&timing, &reads, &group_list, &nodes));
        Ok(Self {
            nodes,
            groups: group_list,
            routes,
            timing,
            on_all_down: dbha.choice(
                "ON_ALL_DOWN",
                &[("last", OnAllDown::Last), ("raise", OnAllDown::Raise)],
                OnAllDown::Last,
            )?,
            failback: dbha.choice(
                "FAILBACK",
                &[("sticky", Failback::Sticky), ("auto", Failback::Auto)],
                Failback::Sticky,
            )?,
            reads,
            warnings,
        })
    }

    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    pub fn node_index(&self, alias: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.alias == alias)
    }
}

#[derive(Default)]
struct ProbeKinds<'a> {
    all: Option<ProbeKind>,
    per_alias: HashMap<&'a str, ProbeKind>,
}

impl ProbeKinds<'_> {
    fn get(&self, alias: &str) -> Option<ProbeKind> {
        self.per_alias.get(alias).copied().or(self.all)
    }
}

/// The `DBHA` dict, with unknown keys already rejected.
struct Settings<'a> {
    entries: &'a [(String, Value)],
}

impl<'a> Settings<'a> {
    fn new(dbha: &'a Value) -> Result<Self, ConfigError> {
        let entries: &[(String, Value)] = match dbha {
            Value::None => &[],
            Value::Map(entries) => entries,
            // Its texts redacted: an object's repr may hold anything.
            other => {
                return Err(error(
                    Problem::WrongType,
                    "DBHA".into(),
                    &texts_redacted(other),
                    "must be a dict",
                ))
            }
        };
        if let Some((key, value)) = entries
            .iter()
            .find(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
        {
            // Texts redacted: a misspelled PROBE_CREDENTIALS holds passwords.
            let problem = match closest(key, KNOWN_KEYS) {
                Some(near) => format!("unknown key; did you mean \"{near}\"?"),
                None => format!("unknown key; known keys are {}", KNOWN_KEYS.join(", ")),
            };
            return Err(error(
                Problem::UnknownKey,
                dbha_key(key),
                &texts_redacted(value),
                problem,
            ));
        }
        Ok(Self { entries })
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// One alias's node: how to reach, log in to and probe its server. A
    /// server dbha can only probe with `tcp` adds a warning.
    fn node(
        &self,
        alias: String,
        group: usize,
        entry: &Value,
        vendor: Option<&str>,
        probe_kinds: &ProbeKinds<'_>,
        warnings: &mut Vec<ConfigError>,
    ) -> Result<Node, ConfigError> {
        let (engine, endpoint) = parse_database(&alias, entry, vendor)?;
        if engine == Engine::Other {
            warnings.push(error(
                Problem::TcpOnly,
                format!("DATABASES[\"{alias}\"][\"ENGINE\"]"),
                entry.get("ENGINE").unwrap_or(&Value::None),
                "dbha speaks only PostgreSQL's and MySQL's protocols, so this server gets \
                 the 'tcp' probe: it sees a dead host, but not a hung server, and cannot \
                 tell a primary from a standby",
            ));
        }
        let probe = probe_kinds.get(&alias).unwrap_or(match engine {
            Engine::PostgreSql | Engine::MySql => ProbeKind::Role,
            Engine::Other => ProbeKind::Tcp,
        });
        let probe_key = if probe_kinds.per_alias.contains_key(alias.as_str()) {
            format!("{}[\"{alias}\"]", dbha_key("PROBE"))
        } else {
            dbha_key("PROBE")
        };
        if probe != ProbeKind::Tcp && probe != ProbeKind::Patroni && engine == Engine::Other {
            return Err(error(
                Problem::BadValue,
                probe_key,
                &probe.name(),
                format!(
                    "alias '{alias}' has no PostgreSQL or MySQL/MariaDB ENGINE, so only the \
                     'tcp' probe applies to it"
                ),
            ));
        }
        let patroni = self.patroni_api(&alias)?;
        match (&patroni, probe) {
            (None, ProbeKind::Patroni | ProbeKind::PatroniAndRole) => {
                return Err(error(
                    Problem::BadValue,
                    probe_key,
                    &probe.name(),
                    format!(
                        "needs the URL of alias '{alias}''s Patroni REST API in \
                         DBHA[\"PATRONI\"][\"{alias}\"]"
                    ),
                ))
            }
            (Some(api), ProbeKind::Tcp | ProbeKind::Handshake | ProbeKind::Role) => {
                return Err(error(
                    Problem::BadValue,
                    format!("{}[\"{alias}\"]", dbha_key("PATRONI")),
                    &Value::str(&api.url),
                    format!(
                        "alias '{alias}' is not probed through Patroni: set DBHA[\"PROBE\"] \
                         for it to 'patroni' or ['patroni', 'role']"
                    ),
                ))
            }
            _ => {}
        }
        let login = self.login(&alias, engine, entry)?;
        let tls = parse_tls(&alias, engine, entry)?;
        Ok(Node {
            alias,
            group,
            engine,
            probe,
            server: Server {
                endpoint,
                login,
                tls,
            },
            patroni,
        })
    }

    /// Timing and read settings that work but are likely mistakes.
    fn warnings(
        &self,
        timing: &Timing,
        reads: &Reads,
        groups: &[Group],
        nodes: &[Node],
    ) -> Vec<ConfigError> {
        let mut warnings = Vec::new();
        if timing.connect_timeout >= timing.check_interval {
            warnings.push(error(
                Problem::SlowProbe,
                dbha_key("CONNECT_TIMEOUT"),
                &Value::Float(timing.connect_timeout.as_secs_f64()),
                format!(
                    "is not shorter than CHECK_INTERVAL ({}): a hung server is probed \
                     once per deadline, not once per interval, so it is noticed later",
                    Value::Float(timing.check_interval.as_secs_f64())
                ),
            ));
        }
        let could_replicate = groups.iter().any(|group| {
            nodes[group.members.clone()]
                .iter()
                .filter(|node| node.probe.knows_roles())
                .count()
                >= 2
        });
        if reads.mode != ReadMode::Writer && !could_replicate {
            warnings.push(error(
                Problem::NoReplicas,
                dbha_key("READS"),
                self.get("READS").unwrap_or(&Value::None),
                "no group has two nodes with the 'role' probe, so none can be a standby \
                 that serves reads: every read goes to the writer",
            ));
        }
        warnings
    }

    /// `(group name, aliases in priority order)` for every group.
    fn groups(
        &self,
        databases: &[(String, Value)],
    ) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let groups = match (self.get("DATABASES"), self.get("GROUPS")) {
            (Some(_), Some(groups)) => {
                return Err(error(
                    Problem::BadValue,
                    dbha_key("GROUPS"),
                    groups,
                    "set either DBHA[\"DATABASES\"] (one group) or DBHA[\"GROUPS\"], not both",
                ))
            }
            (Some(aliases), None) => vec![(
                DEFAULT_GROUP.to_owned(),
                alias_list(&dbha_key("DATABASES"), aliases)?,
            )],
            (None, Some(Value::Map(groups))) if !groups.is_empty() => {
                let mut parsed = Vec::new();
                for (name, aliases) in groups {
                    let key = format!("{}[\"{name}\"]", dbha_key("GROUPS"));
                    if name.is_empty() {
                        return Err(error(
                            Problem::BadValue,
                            key,
                            aliases,
                            "a group needs a name",
                        ));
                    }
                    parsed.push((name.clone(), alias_list(&key, aliases)?));
                }
                parsed
            }
            (None, Some(groups)) => {
                return Err(error(
                    Problem::WrongType,
                    dbha_key("GROUPS"),
                    groups,
                    "must be a non-empty dict of group name to a list of aliases",
                ))
            }
            (None, None) => vec![(
                DEFAULT_GROUP.to_owned(),
                databases.iter().map(|(alias, _)| alias.clone()).collect(),
            )],
        };

        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (name, aliases) in &groups {
            let key = if self.get("GROUPS").is_some() {
                format!("{}[\"{name}\"]", dbha_key("GROUPS"))
            } else {
                dbha_key("DATABASES")
            };
            for alias in aliases {
                if !databases.iter().any(|(a, _)| a == alias) {
                    return Err(error(
                        Problem::UnknownName,
                        key,
                        &Value::str(alias),
                        "no such alias in settings.DATABASES",
                    ));
                }
                if let Some(other) = seen.insert(alias, name) {
                    let problem = if other == name {
                        "alias listed twice".to_owned()
                    } else {
                        format!(
                            "alias is already in group '{other}'; an alias belongs to one group"
                        )
                    };
                    return Err(error(
                        Problem::DuplicateAlias,
                        key,
                        &Value::str(alias),
                        problem,
                    ));
                }
            }
        }
        if groups.iter().all(|(_, aliases)| aliases.is_empty()) {
            return Err(error(
                Problem::BadDatabase,
                "DATABASES".into(),
                &Value::Map(Vec::new()),
                "there is no database to watch",
            ));
        }
        Ok(groups)
    }

    /// The `PROBE` setting: one kind for every alias, or per alias.
    fn probe_kinds(&self, databases: &[(String, Value)]) -> Result<ProbeKinds<'a>, ConfigError> {
        let key = dbha_key("PROBE");
        let problem = "must be 'role', 'handshake', 'tcp', 'patroni' or ['patroni', 'role'], \
                       or a dict of alias to one of them";
        let parse = |key: &str, value: &Value| {
            ProbeKind::parse(value)
                .ok_or_else(|| error(Problem::BadValue, key.to_owned(), value, problem))
        };
        let mut kinds = ProbeKinds::default();
        match self.get("PROBE") {
            None | Some(Value::None) => {}
            Some(Value::Map(per_alias)) => {
                kinds.per_alias = per_alias
                    .iter()
                    .map(|(alias, kind)| {
                        let alias_key = format!("{key}[\"{alias}\"]");
                        if !databases.iter().any(|(a, _)| a == alias) {
                            return Err(error(
                                Problem::UnknownName,
                                alias_key,
                                &Value::str(alias),
                                "no such alias in settings.DATABASES",
                            ));
                        }
                        Ok((alias.as_str(), parse(&alias_key, kind)?))
                    })
                    .collect::<Result<_, _>>()?;
            }
            Some(value) => kinds.all = Some(parse(&key, value)?),
        }
        Ok(kinds)
    }

    /// `PATRONI` is a dict of aliases `DATABASES` has.
    fn check_patroni(&self, databases: &[(String, Value)]) -> Result<(), ConfigError> {
        match self.get("PATRONI") {
            None | Some(Value::None) => Ok(()),
            Some(Value::Map(per_alias)) => {
                for (alias, api) in per_alias {
                    if !databases.iter().any(|(a, _)| a == alias) {
                        return Err(error(
                            Problem::UnknownName,
                            format!("{}[\"{alias}\"]", dbha_key("PATRONI")),
                            &redacted_api(api),
                            "no such alias in settings.DATABASES",
                        ));
                    }
                }
                Ok(())
            }
            Some(other) => Err(error(
                Problem::WrongType,
                dbha_key("PATRONI"),
                &redacted_api(other),
                "must be a dict of alias to its Patroni REST API URL (or to \
                 {\"URL\": ..., \"USER\": ..., \"PASSWORD\": ..., \"CA_FILE\": ...})",
            )),
        }
    }

    /// The alias's Patroni REST API: `"http://host:port"`, or a dict with
    /// `URL` and optional basic-auth `USER`/`PASSWORD` and `CA_FILE`.
    fn patroni_api(&self, alias: &str) -> Result<Option<Api>, ConfigError> {
        let Some(Value::Map(per_alias)) = self.get("PATRONI") else {
            return Ok(None);
        };
        let Some((_, entry)) = per_alias.iter().find(|(a, _)| a == alias) else {
            return Ok(None);
        };
        let key = format!("{}[\"{alias}\"]", dbha_key("PATRONI"));
        let fields: &[(String, Value)] = match entry {
            Value::Str(_) => &[],
            Value::Map(fields) => fields,
            other => {
                return Err(error(
                    Problem::WrongType,
                    key,
                    &redacted_api(other),
                    "must be the REST API URL, or a dict with \"URL\"",
                ))
            }
        };
        if let Some((name, value)) = fields
            .iter()
            .find(|(k, _)| !["URL", "USER", "PASSWORD", "CA_FILE"].contains(&k.as_str()))
        {
            return Err(error(
                Problem::UnknownKey,
                format!("{key}[\"{name}\"]"),
                &redacted(value),
                "unknown key; use \"URL\", \"USER\", \"PASSWORD\" and \"CA_FILE\"",
            ));
        }
        let text = |name: &str| -> Result<Option<&str>, ConfigError> {
            match fields.iter().find(|(k, _)| k == name).map(|(_, v)| v) {
                None | Some(Value::None) => Ok(None),
                Some(Value::Str(text)) => Ok(Some(text.as_str())),
                Some(other) => Err(error(
                    Problem::WrongType,
                    format!("{key}[\"{name}\"]"),
                    &if name == "PASSWORD" {
                        Value::str("***")
                    } else {
                        other.clone()
                    },
                    "must be a string",
                )),
            }
        };
        let (url, url_key) = match entry {
            Value::Str(url) => (url.as_str(), key.clone()),
            _ => (
                text("URL")?.ok_or_else(|| {
                    error(
                        Problem::BadValue,
                        key.clone(),
                        &redacted_api(entry),
                        "needs \"URL\"",
                    )
                })?,
                format!("{key}[\"URL\"]"),
            ),
        };
        let url = parse_rest_url(url).map_err(|problem| {
            error(
                Problem::BadValue,
                url_key,
                &Value::str(&redact_url(url)),
                problem,
            )
        })?;
        let user = text("USER")?.map(str::to_owned);
        let password = text("PASSWORD")?.map(Secret::new);
        if password.is_some() && user.is_none() {
            return Err(error(
                Problem::BadValue,
                format!("{key}[\"PASSWORD\"]"),
                &Value::str("***"),
                "basic authentication needs \"USER\" too",
            ));
        }
        let ca_file = text("CA_FILE")?.map(PathBuf::from);
        if ca_file.is_some() && !url.starts_with("https://") {
            return Err(error(
                Problem::BadValue,
                format!("{key}[\"CA_FILE\"]"),
                &Value::str(text("CA_FILE")?.unwrap_or_default()),
                "a CA file needs an https URL",
            ));
        }
        Ok(Some(Api {
            url,
            user,
            password,
            ca_file,
        }))
    }

    /// `PROBE_CREDENTIALS` names only watched aliases, and gives each its
    /// own `PASSWORD`: without one, the application's password would be sent
    /// as the monitoring user's.
    fn check_credentials(&self, groups: &[(String, Vec<String>)]) -> Result<(), ConfigError> {
        let Some(Value::Map(per_alias)) = self.get("PROBE_CREDENTIALS") else {
            return Ok(());
        };
        for (alias, credentials) in per_alias {
            let key = format!("{}[\"{alias}\"]", dbha_key("PROBE_CREDENTIALS"));
            if !groups.iter().any(|(_, aliases)| aliases.contains(alias)) {
                return Err(error(
                    Problem::UnknownName,
                    key,
                    &redacted(credentials),
                    "no such alias among those dbha watches",
                ));
            }
            if let Value::Map(fields) = credentials {
                if !fields.iter().any(|(k, _)| k == "PASSWORD") {
                    return Err(error(
                        Problem::MissingPassword,
                        key,
                        &redacted(credentials),
                        "needs its own \"PASSWORD\" (\"\" for none): otherwise the \
                         alias's own password would be sent as this user's",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The role probe's login: the alias's own `USER`/`PASSWORD`, unless
    /// `PROBE_CREDENTIALS` names a (least-privileged) monitoring user.
    fn login(&self, alias: &str, engine: Engine, entry: &Value) -> Result<Login, ConfigError> {
        let entry_key = format!("DATABASES[\"{alias}\"]");
        let credentials = match self.get("PROBE_CREDENTIALS") {
            None | Some(Value::None) => None,
            Some(Value::Map(per_alias)) => {
                per_alias.iter().find(|(a, _)| a == alias).map(|(_, c)| c)
            }
            Some(other) => {
                return Err(error(
                    Problem::WrongType,
                    dbha_key("PROBE_CREDENTIALS"),
                    &redacted(other),
                    "must be a dict of alias to {\"USER\": ..., \"PASSWORD\": ...}",
                ))
            }
        };
        let credentials_key = format!("{}[\"{alias}\"]", dbha_key("PROBE_CREDENTIALS"));
        if let Some(credentials) = credentials {
            let Value::Map(fields) = credentials else {
                return Err(error(
                    Problem::WrongType,
                    credentials_key,
                    &redacted(credentials),
                    "must be a dict with \"USER\" and \"PASSWORD\"",
                ));
            };
            if let Some((key, value)) = fields.iter().find(|(k, _)| k != "USER" && k != "PASSWORD")
            {
                return Err(error(
                    Problem::UnknownKey,
                    format!("{credentials_key}[\"{key}\"]"),
                    &redacted(value),
                    "unknown key; use \"USER\" and \"PASSWORD\"",
                ));
            }
        }
        let field = |name: &str| -> Result<Option<String>, ConfigError> {
            let (key, value) = match credentials.and_then(|c| c.get(name)) {
                Some(value) => (format!("{credentials_key}[\"{name}\"]"), value),
                None => (
                    format!("{entry_key}[\"{name}\"]"),
                    entry.get(name).unwrap_or(&Value::None),
                ),
            };
            match value {
                Value::None => Ok(None),
                Value::Str(s) => Ok(Some(s.clone())),
                other => Err(error(
                    Problem::WrongType,
                    key,
                    // A password is never quoted, whatever its shape (even
                    // a dict's keys may be the secret).
                    &if name == "PASSWORD" {
                        Value::str("***")
                    } else {
                        other.clone()
                    },
                    "must be a string",
                )),
            }
        };
        let user = field("USER")?
            .filter(|u| !u.is_empty())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".to_owned());
        let password = field("PASSWORD")?
            .filter(|p| !p.is_empty())
            .map(Secret::new);
        // Never the application's database: a session kept there makes
        // `CREATE DATABASE ... TEMPLATE` (the test runner's clones) and
        // `DROP DATABASE` fail. PostgreSQL: the maintenance database, then
        // `NAME` if the server refuses it (as Django's `_nodb_cursor`);
        // MySQL needs none.
        let name = match entry.get("NAME") {
            Some(Value::Str(name)) if !name.is_empty() && name != MAINTENANCE_DATABASE => {
                Some(name.clone())
            }
            _ => None,
        };
        let (database, fallback_database) = match engine {
            Engine::PostgreSql => (MAINTENANCE_DATABASE.to_owned(), name),
            _ => (String::new(), None),
        };
        Ok(Login {
            user,
            password,
            database,
            fallback_database,
        })
    }

    fn reads(&self) -> Result<Reads, ConfigError> {
        let writer_only = match self.get("WRITER_READS") {
            None => vec!["auth".to_owned(), "sessions".to_owned()],
            Some(Value::None) => Vec::new(),
            Some(Value::List(labels)) => labels
                .iter()
                .map(|label| match label {
                    Value::Str(s) if is_model_label(s) => Ok(s.to_lowercase()),
                    other => Err(error(
                        Problem::WrongType,
                        dbha_key("WRITER_READS"),
                        other,
                        "must list 'app_label' or 'app_label.ModelName' strings",
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(error(
                    Problem::WrongType,
                    dbha_key("WRITER_READS"),
                    other,
                    "must be a list of 'app_label' or 'app_label.ModelName'",
                ))
            }
        };
        Ok(Reads {
            mode: self.choice(
                "READS",
                &[
                    ("writer", ReadMode::Writer),
                    ("replicas", ReadMode::Replicas),
                    ("any", ReadMode::Any),
                ],
                ReadMode::Writer,
            )?,
            max_lag: self.seconds(
                "MAX_REPLICA_LAG",
                Duration::from_secs(5),
                Duration::from_millis(100),
            )?,
            balance: self.choice(
                "LOAD_BALANCE",
                &[
                    ("round_robin", Balance::RoundRobin),
                    ("random", Balance::Random),
                    ("latency", Balance::Latency),
                ],
                Balance::RoundRobin,
            )?,
            writer_only,
            read_your_writes: self.flag("READ_YOUR_WRITES", true)?,
        })
    }

    fn routes(&self, groups: &[Group]) -> Result<HashMap<String, usize>, ConfigError> {
        let key = dbha_key("ROUTES");
        let routes = match self.get("ROUTES") {
            None | Some(Value::None) => return Ok(HashMap::new()),
            Some(Value::Map(routes)) => routes,
            Some(other) => {
                return Err(error(
                    Problem::WrongType,
                    key,
                    other,
                    "must be a dict of 'app_label' or 'app_label.ModelName' to a group name",
                ))
            }
        };
        let mut parsed = HashMap::new();
        for (label, target) in routes {
            let route_key = format!("{key}[\"{label}\"]");
            if !is_model_label(label) {
                return Err(error(
                    Problem::BadValue,
                    route_key,
                    &Value::str(label),
                    "a route key is 'app_label' or 'app_label.ModelName'",
                ));
            }
            let group = match target {
                Value::Str(name) => groups.iter().position(|g| &g.name == name),
                _ => None,
            }
            .ok_or_else(|| {
                let names: Vec<_> = groups.iter().map(|g| format!("'{}'", g.name)).collect();
                error(
                    Problem::UnknownName,
                    route_key,
                    target,
                    format!("not a group; groups are {}", names.join(", ")),
                )
            })?;
            parsed.insert(label.to_lowercase(), group);
        }
        Ok(parsed)
    }

    fn timing(&self) -> Result<Timing, ConfigError> {
        let defaults = Timing::default();
        Ok(Timing {
            check_interval: self.seconds("CHECK_INTERVAL", defaults.check_interval, MIN_TIMING)?,
            connect_timeout: self.seconds(
                "CONNECT_TIMEOUT",
                defaults.connect_timeout,
                MIN_TIMING,
            )?,
            fast_interval: self.seconds("FAST_INTERVAL", defaults.fast_interval, MIN_TIMING)?,
            listener_check_interval: match self.get("LISTENER_CHECK_INTERVAL") {
                Some(value) if number(value) == Some(0.0) => None,
                Some(_) => Some(self.seconds(
                    "LISTENER_CHECK_INTERVAL",
                    Duration::ZERO,
                    Duration::from_secs(1),
                )?),
                None => defaults.listener_check_interval,
            },
            rise: self.count("RISE", defaults.rise)?,
            fall: self.count("FALL", defaults.fall)?,
            jitter: match self.get("JITTER") {
                None => defaults.jitter,
                Some(value) => match number(value) {
                    Some(j) if (0.0..1.0).contains(&j) => j,
                    j => {
                        return Err(error(
                            kind_of_miss(j.is_some()),
                            dbha_key("JITTER"),
                            value,
                            "must be a number from 0 up to (not including) 1",
                        ))
                    }
                },
            },
        })
    }

    fn seconds(
        &self,
        key: &str,
        default: Duration,
        min: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        // A day is far past any sensible setting and keeps Duration math safe.
        match number(value) {
            Some(s) if s >= min.as_secs_f64() && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
            seconds => Err(error(
                kind_of_miss(seconds.is_some()),
                dbha_key(key),
                value,
                format!(
                    "must be a number of seconds from {} to 86400",
                    min.as_secs_f64()
                ),
            )),
        }
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(error(
                Problem::WrongType,
                dbha_key(key),
                other,
                "must be True or False",
            )),
        }
    }

    fn count(&self, key: &str, default: u32) -> Result<u32, ConfigError> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        match value {
            Value::Int(n) if (1..=1000).contains(n) => Ok(u32::try_from(*n).unwrap_or(1)),
            _ => Err(error(
                kind_of_miss(matches!(value, Value::Int(_))),
                dbha_key(key),
                value,
                "must be a whole number from 1 to 1000",
            )),
        }
    }

    fn choice<T: Copy>(
        &self,
        key: &str,
        options: &[(&str, T)],
        default: T,
    ) -> Result<T, ConfigError> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        let found = match value {
            Value::Str(s) => options.iter().find(|(name, _)| name == s).map(|(_, v)| *v),
            _ => None,
        };
        found.ok_or_else(|| {
            let names: Vec<_> = options
                .iter()
                .map(|(name, _)| format!("'{name}'"))
                .collect();
            error(
                kind_of_miss(matches!(value, Value::Str(_))),
                dbha_key(key),
                value,
                format!("must be one of {}", names.join(", ")),
            )
        })
    }
}

/// A value that missed: of the right type (out of range) or not.
fn kind_of_miss(right_type: bool) -> Problem {
    if right_type {
        Problem::BadValue
    } else {
        Problem::WrongType
    }
}

/// `"app_label"` or `"app_label.ModelName"`.
fn is_model_label(label: &str) -> bool {
    !label.is_empty()
        && label.split('.').count() <= 2
        && label.split('.').all(|part| !part.is_empty())
}

/// A value that may hold a password, for quoting in an error message.
/// A Patroni REST API URL without its trailing slash: `http(s)://host:port`
/// and nothing else (credentials go in `USER` and `PASSWORD`).
fn parse_rest_url(url: &str) -> Result<String, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("must be an http:// or https:// URL".into());
    };
    if scheme != "http" && scheme != "https" {
        return Err("must be an http:// or https:// URL".into());
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains('@') {
        return Err("credentials go in \"USER\" and \"PASSWORD\", not in the URL".into());
    }
    if !path.is_empty() || authority.contains(['?', '#']) {
        return Err("must name the REST API itself (http://host:8008), no path".into());
    }
    let port = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || !port.is_empty() => Some((host, port)),
        _ => None,
    };
    let host = port.map_or(authority, |(host, _)| host);
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("needs a host".into());
    }
    if let Some((_, port)) = port {
        if !host.starts_with('[') && host.contains(':') {
            return Err("an IPv6 address goes in brackets: http://[::1]:8008".into());
        }
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err("needs a port from 1 to 65535".into());
        }
    }
    Ok(format!("{scheme}://{authority}"))
}

/// A `PATRONI` value for a message: URLs shown without credentials, the
/// rest as [`redacted`] shows it.
fn redacted_api(value: &Value) -> Value {
    match value {
        Value::Str(url) => Value::str(&redact_url(url)),
        Value::Map(fields) => Value::Map(
            fields
                .iter()
                .map(|(k, v)| {
                    let shown = match (k.as_str(), v) {
                        ("URL", v) => redacted_api(v),
                        ("USER" | "CA_FILE", Value::Str(_)) => v.clone(),
                        _ => redacted(v),
                    };
                    (k.clone(), shown)
                })
                .collect(),
        ),
        other => redacted(other),
    }
}

/// The URL with any credentials in it hidden, for a message.
fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split('/').next().and_then(|a| a.rsplit_once('@')) {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None if url.contains('@') => "***".to_owned(),
        None => url.to_owned(),
    }
}

fn redacted(value: &Value) -> Value {
    match value {
        Value::Map(fields) => Value::Map(
            fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        if k == "PASSWORD" {
                            Value::str("***")
                        } else {
                            redacted(v)
                        },
                    )
                })
                .collect(),
        ),
        Value::List(items) => Value::List(items.iter().map(redacted).collect()),
        Value::Str(_) | Value::Int(_) | Value::Float(_) | Value::Other(_) => Value::str("***"),
        other => other.clone(),
    }
}

/// `value` with every text (and unknown object) redacted, numbers kept: for
/// a value of unknown meaning.
fn texts_redacted(value: &Value) -> Value {
    match value {
        Value::Map(fields) => Value::Map(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), texts_redacted(v)))
                .collect(),
        ),
        Value::List(items) => Value::List(items.iter().map(texts_redacted).collect()),
        Value::Str(_) | Value::Other(_) => Value::str("***"),
        other => other.clone(),
    }
}

/// The known key nearest `key` (case aside, at most a third of its letters
/// off), for "did you mean".
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let key = key.to_uppercase();
    known
        .iter()
        .map(|k| (edit_distance(&key, k), *k))
        .filter(|(d, k)| *d <= k.len().max(3) / 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn number(value: &Value) -> Option<f64> {
    match value {
        #[allow(clippy::cast_precision_loss)] // settings numbers are small
        Value::Int(i) => Some(*i as f64),
        Value::Float(x) if x.is_finite() => Some(*x),
        _ => None,
    }
}

fn alias_list(key: &str, value: &Value) -> Result<Vec<String>, ConfigError> {
    let problem = "must be a non-empty list of aliases from settings.DATABASES";
    let Value::List(items) = value else {
        return Err(error(Problem::WrongType, key.to_owned(), value, problem));
    };
    if items.is_empty() {
        return Err(error(Problem::BadValue, key.to_owned(), value, problem));
    }
    items
        .iter()
        .map(|item| match item {
            Value::Str(alias) => Ok(alias.clone()),
            other => Err(error(
                Problem::WrongType,
                key.to_owned(),
                other,
                "an alias must be a string",
            )),
        })
        .collect()
}

/// The engine of an alias (`None`: SQLite): from the backend's `vendor`
/// when Django told it, else from the `ENGINE` name.
fn engine_of(
    alias: &str,
    entry: &Value,
    vendor: Option<&str>,
) -> Result<Option<Engine>, ConfigError> {
    let key = format!("DATABASES[\"{alias}\"][\"ENGINE\"]");
    let engine = match entry.get("ENGINE") {
        Some(Value::Str(engine)) if !engine.is_empty() => engine,
        Some(other) => {
            return Err(error(
                Problem::BadDatabase,
                key,
                other,
                "must name a database backend",
            ))
        }
        None => {
            return Err(error(
                Problem::BadDatabase,
                key,
                &Value::None,
                "must name a database backend",
            ))
        }
    };
    if let Some(vendor) = vendor {
        return Ok(match vendor {
            "sqlite" => None,
            "postgresql" => Some(Engine::PostgreSql),
            "mysql" => Some(Engine::MySql),
            _ => Some(Engine::Other),
        });
    }
    let lower = engine.to_lowercase();
    Ok(if lower.contains("sqlite") {
        None
    } else if ["postgresql", "postgis", "psycopg"]
        .iter()
        .any(|name| lower.contains(name))
    {
        Some(Engine::PostgreSql)
    } else if lower.contains("mysql") || lower.contains("mariadb") {
        Some(Engine::MySql)
    } else {
        Some(Engine::Other)
    })
}

/// TLS for the role probe, from the alias's `OPTIONS` as its driver reads
/// them: libpq's `sslmode`/`sslrootcert`, or mysqlclient's
/// `ssl_mode`/`ssl["ca"]`.
fn parse_tls(alias: &str, engine: Engine, entry: &Value) -> Result<Tls, ConfigError> {
    let options = entry.get("OPTIONS").unwrap_or(&Value::None);
    let options_key = format!("DATABASES[\"{alias}\"][\"OPTIONS\"]");
    let (mode_key, modes, root_cert): (&str, &[(&str, SslMode)], Option<&Value>) = match engine {
        Engine::PostgreSql => (
            "sslmode",
            &[
                ("disable", SslMode::Disable),
                ("allow", SslMode::Allow),
                ("prefer", SslMode::Prefer),
                ("require", SslMode::Require),
                ("verify-ca", SslMode::VerifyCa),
                ("verify-full", SslMode::VerifyFull),
            ],
            options.get("sslrootcert"),
        ),
        Engine::MySql => (
            "ssl_mode",
            &[
                ("DISABLED", SslMode::Disable),
                ("PREFERRED", SslMode::Prefer),
                ("REQUIRED", SslMode::Require),
                ("VERIFY_CA", SslMode::VerifyCa),
                ("VERIFY_IDENTITY", SslMode::VerifyFull),
            ],
            options.get("ssl").and_then(|ssl| ssl.get("ca")),
        ),
        Engine::Other => {
            return Ok(Tls {
                mode: SslMode::Disable,
                root_cert: None,
            })
        }
    };
    let mode = match options.get(mode_key) {
        None | Some(Value::None) => SslMode::Prefer,
        Some(value) => match value {
            Value::Str(name) => modes.iter().find(|(n, _)| n == name).map(|(_, m)| *m),
            _ => None,
        }
        .ok_or_else(|| {
            let names: Vec<_> = modes.iter().map(|(n, _)| format!("'{n}'")).collect();
            error(
                Problem::BadDatabase,
                format!("{options_key}[\"{mode_key}\"]"),
                value,
                format!("must be one of {}", names.join(", ")),
            )
        })?,
    };
    let root_cert = match root_cert {
        None | Some(Value::None) => None,
        Some(Value::Str(path)) if !path.is_empty() => Some(PathBuf::from(path)),
        Some(other) => {
            let key = if engine == Engine::MySql {
                "[\"ssl\"][\"ca\"]"
            } else {
                "[\"sslrootcert\"]"
            };
            return Err(error(
                Problem::BadDatabase,
                format!("{options_key}{key}"),
                other,
                "must be a file path",
            ));
        }
    };
    Ok(Tls { mode, root_cert })
}

fn parse_database(
    alias: &str,
    entry: &Value,
    vendor: Option<&str>,
) -> Result<(Engine, Endpoint), ConfigError> {
    let entry_key = format!("DATABASES[\"{alias}\"]");
    let Some(engine) = engine_of(alias, entry, vendor)? else {
        return Err(error(
            Problem::Sqlite,
            format!("{entry_key}[\"ENGINE\"]"),
            entry.get("ENGINE").unwrap_or(&Value::None),
            "SQLite has no server to probe; leave this alias out of DBHA[\"DATABASES\"] or DBHA[\"GROUPS\"]",
        ));
    };

    let port_key = format!("{entry_key}[\"PORT\"]");
    let port_value = entry.get("PORT").unwrap_or(&Value::None);
    let port = if port_value.is_unset() {
        match engine {
            Engine::PostgreSql => 5432,
            Engine::MySql => 3306,
            Engine::Other => {
                return Err(error(
                    Problem::BadDatabase,
                    port_key,
                    port_value,
                    "dbha needs the port of this engine's server",
                ))
            }
        }
    } else {
        let parsed = match port_value {
            Value::Int(p) => u16::try_from(*p).ok(),
            Value::Str(s) => s.trim().parse::<u16>().ok(),
            _ => None,
        };
        match parsed {
            Some(p) if p > 0 => p,
            _ => {
                return Err(error(
                    Problem::BadDatabase,
                    port_key,
                    port_value,
                    "must be a port number from 1 to 65535",
                ))
            }
        }
    };

    let host_key = format!("{entry_key}[\"HOST\"]");
    let host_value = entry.get("HOST").unwrap_or(&Value::None);
    let host = match host_value {
        Value::None => String::new(),
        Value::Str(host) => host.trim().to_owned(),
        other => {
            return Err(error(
                Problem::BadDatabase,
                host_key,
                other,
                "must be a host name, IP or socket directory",
            ))
        }
    };
    if host.contains(',') {
        return Err(error(
            Problem::MultiHost,
            host_key,
            host_value,
            "dbha watches one server per alias; give each server its own alias",
        ));
    }
    if host.chars().any(char::is_control) {
        return Err(error(
            Problem::BadDatabase,
            host_key,
            host_value,
            "must be a host name, IP or socket directory, without control characters",
        ));
    }

    let unix_socket = match entry.get("OPTIONS").and_then(|o| o.get("unix_socket")) {
        Some(Value::Str(path)) if engine == Engine::MySql && !path.is_empty() => Some(path.clone()),
        _ => None,
    };
    let endpoint = if let Some(path) = unix_socket {
        Endpoint::Unix(PathBuf::from(path))
    } else if host.starts_with('/') {
        match engine {
            // libpq: HOST is the socket directory.
            Engine::PostgreSql => {
                Endpoint::Unix(PathBuf::from(host).join(format!(".s.PGSQL.{port}")))
            }
            // Django's MySQL backend: HOST is the socket itself.
            _ => Endpoint::Unix(PathBuf::from(host)),
        }
    } else {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Endpoint::Tcp {
            host: if host.is_empty() {
                "localhost".to_owned()
            } else {
                host.to_owned()
            },
            port,
        }
    };
    Ok((engine, endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, Value)]) -> Value {
        Value::Map(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        )
    }

    fn list(aliases: &[&str]) -> Value {
        Value::List(aliases.iter().map(|a| Value::str(a)).collect())
    }

    fn pg(host: &str, port: i64) -> Value {
        map(&[
            ("ENGINE", Value::str("django.db.backends.postgresql")),
            ("HOST", Value::str(host)),
            ("PORT", Value::Int(port)),
            ("PASSWORD", Value::str("hunter2")),
        ])
    }

    fn three_pg() -> Value {
        map(&[
            ("default", pg("10.0.0.2", 5432)),
            ("failover1", pg("10.0.0.3", 5432)),
            ("failover2", pg("db3.example", 5433)),
        ])
    }

    fn config(dbha: &Value) -> Result<Config, ConfigError> {
        Config::from_settings(&three_pg(), dbha)
    }

    #[test]
    fn defaults_watch_every_alias_in_order() {
        let c = config(&Value::None).unwrap();
        let aliases: Vec<_> = c.nodes.iter().map(|n| n.alias.as_str()).collect();
        assert_eq!(aliases, ["default", "failover1", "failover2"]);
        assert_eq!(
            c.groups,
            [Group {
                name: "default".into(),
                members: 0..3
            }]
        );
        assert_eq!(c.timing, Timing::default());
        assert_eq!(c.on_all_down, OnAllDown::Last);
        assert_eq!(c.failback, Failback::Sticky);
        assert!(c.nodes.iter().all(|n| n.probe == ProbeKind::Role));
        assert_eq!(
            c.nodes[2].server.endpoint,
            Endpoint::Tcp {
                host: "db3.example".into(),
                port: 5433
            }
        );
    }

    #[test]
    fn groups_and_routes() {
        let c = config(&map(&[
            (
                "GROUPS",
                map(&[
                    ("main", list(&["failover1", "default"])),
                    ("reports", list(&["failover2"])),
                ]),
            ),
            (
                "ROUTES",
                map(&[
                    ("analytics", Value::str("reports")),
                    ("shop.Order", Value::str("main")),
                ]),
            ),
        ]))
        .unwrap();
        assert_eq!(c.groups[0].name, "main");
        assert_eq!(c.nodes[c.groups[0].members.start].alias, "failover1");
        assert_eq!(c.groups[1].members, 2..3);
        assert_eq!(c.nodes[2].group, 1);
        assert_eq!(c.routes["analytics"], 1);
        assert_eq!(c.routes["shop.order"], 0);
    }

    #[test]
    fn probes_never_log_into_the_application_database() {
        let named = |engine: &str, name: &str| {
            let entry = map(&[
                ("ENGINE", Value::str(engine)),
                ("NAME", Value::str(name)),
                ("PORT", Value::Int(1)),
            ]);
            let login = Config::from_settings(&map(&[("db", entry)]), &Value::None)
                .unwrap()
                .nodes[0]
                .server
                .login
                .clone();
            (login.database, login.fallback_database)
        };
        let pg = "django.db.backends.postgresql";
        assert_eq!(named(pg, "shop"), ("postgres".into(), Some("shop".into())));
        assert_eq!(named(pg, "postgres"), ("postgres".into(), None));
        assert_eq!(named(pg, ""), ("postgres".into(), None));
        assert_eq!(
            named("django.db.backends.mysql", "shop"),
            (String::new(), None)
        );
    }

    #[test]
    fn failover_timing_and_read_your_writes() {
        let defaults = config(&Value::None).unwrap();
        assert_eq!(defaults.timing.fast_interval, Duration::from_millis(100));
        assert_eq!(
            defaults.timing.listener_check_interval,
            Some(Duration::from_secs(10))
        );
        assert!(defaults.reads.read_your_writes);
        let c = config(&map(&[
            ("FAST_INTERVAL", Value::Float(0.05)),
            ("LISTENER_CHECK_INTERVAL", Value::Int(0)),
            ("READ_YOUR_WRITES", Value::Bool(false)),
        ]))
        .unwrap();
        assert_eq!(c.timing.fast_interval, Duration::from_millis(50));
        assert_eq!(c.timing.listener_check_interval, None, "0 turns it off");
        assert!(!c.reads.read_your_writes);
        let c = config(&map(&[("LISTENER_CHECK_INTERVAL", Value::Int(30))])).unwrap();
        assert_eq!(
            c.timing.listener_check_interval,
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn timing_and_choices() {
        let c = config(&map(&[
            ("CHECK_INTERVAL", Value::Float(0.5)),
            ("CONNECT_TIMEOUT", Value::Int(2)),
            ("RISE", Value::Int(1)),
            ("FALL", Value::Int(3)),
            ("JITTER", Value::Int(0)),
            ("ON_ALL_DOWN", Value::str("raise")),
            ("FAILBACK", Value::str("auto")),
            ("PROBE", map(&[("failover2", Value::str("tcp"))])),
        ]))
        .unwrap();
        assert_eq!(c.timing.check_interval, Duration::from_millis(500));
        assert_eq!(c.timing.connect_timeout, Duration::from_secs(2));
        assert_eq!((c.timing.rise, c.timing.fall), (1, 3));
        assert!(c.timing.jitter.abs() < f64::EPSILON);
        assert_eq!(c.on_all_down, OnAllDown::Raise);
        assert_eq!(c.failback, Failback::Auto);
        assert_eq!(c.nodes[0].probe, ProbeKind::Role);
        assert_eq!(c.nodes[2].probe, ProbeKind::Tcp);
    }

    #[test]
    #[allow(clippy::too_many_lines)] // one table of cases
    fn every_bad_value_names_key_and_value() {
        let cases = [
            (
                map(&[("CHECK_INTERVAL", Value::str("1s"))]),
                "DBHA[\"CHECK_INTERVAL\"]",
                "'1s'",
            ),
            (
                map(&[("CHECK_INTERVAL", Value::Int(0))]),
                "DBHA[\"CHECK_INTERVAL\"]",
                "0",
            ),
            (
                map(&[("CONNECT_TIMEOUT", Value::Float(-1.0))]),
                "DBHA[\"CONNECT_TIMEOUT\"]",
                "-1.0",
            ),
            (
                map(&[("CONNECT_TIMEOUT", Value::Bool(true))]),
                "DBHA[\"CONNECT_TIMEOUT\"]",
                "True",
            ),
            (map(&[("FALL", Value::Int(0))]), "DBHA[\"FALL\"]", "0"),
            (map(&[("RISE", Value::Float(2.0))]), "DBHA[\"RISE\"]", "2.0"),
            (
                map(&[("JITTER", Value::Float(1.5))]),
                "DBHA[\"JITTER\"]",
                "1.5",
            ),
            (
                map(&[("PROBE", Value::str("ping"))]),
                "DBHA[\"PROBE\"]",
                "'ping'",
            ),
            (
                map(&[("PROBE", map(&[("nope", Value::str("tcp"))]))]),
                "DBHA[\"PROBE\"][\"nope\"]",
                "'nope'",
            ),
            (
                map(&[("ON_ALL_DOWN", Value::str("panic"))]),
                "DBHA[\"ON_ALL_DOWN\"]",
                "'panic'",
            ),
            (
                map(&[("FAILBACK", Value::Bool(true))]),
                "DBHA[\"FAILBACK\"]",
                "True",
            ),
            (
                map(&[("CHECK_INTERVALS", Value::Int(1))]),
                "DBHA[\"CHECK_INTERVALS\"]",
                "1",
            ),
            (
                map(&[("DATABASES", list(&["default", "replica"]))]),
                "DBHA[\"DATABASES\"]",
                "'replica'",
            ),
            (
                map(&[("DATABASES", list(&[]))]),
                "DBHA[\"DATABASES\"]",
                "[]",
            ),
            (
                map(&[("DATABASES", Value::str("default"))]),
                "DBHA[\"DATABASES\"]",
                "'default'",
            ),
            (
                map(&[("DATABASES", list(&["default", "default"]))]),
                "DBHA[\"DATABASES\"]",
                "'default'",
            ),
            (
                map(&[("GROUPS", map(&[("a", list(&[]))]))]),
                "DBHA[\"GROUPS\"][\"a\"]",
                "[]",
            ),
            (map(&[("GROUPS", map(&[]))]), "DBHA[\"GROUPS\"]", "{}"),
            (
                map(&[(
                    "GROUPS",
                    map(&[("a", list(&["default"])), ("b", list(&["default"]))]),
                )]),
                "DBHA[\"GROUPS\"][\"b\"]",
                "'default'",
            ),
            (
                map(&[
                    ("DATABASES", list(&["default"])),
                    ("GROUPS", map(&[("a", list(&["default"]))])),
                ]),
                "DBHA[\"GROUPS\"]",
                "{'a': ['default']}",
            ),
            (
                map(&[("ROUTES", map(&[("shop", Value::str("reports"))]))]),
                "DBHA[\"ROUTES\"][\"shop\"]",
                "'reports'",
            ),
            (
                map(&[("ROUTES", map(&[("a.b.c", Value::str("default"))]))]),
                "DBHA[\"ROUTES\"][\"a.b.c\"]",
                "'a.b.c'",
            ),
            (
                map(&[("ROUTES", Value::List(vec![]))]),
                "DBHA[\"ROUTES\"]",
                "[]",
            ),
            (Value::List(vec![]), "DBHA", "[]"),
        ];
        let more = [
            (
                map(&[("CHECK_INTERVAL", Value::Float(1e-9))]),
                "DBHA[\"CHECK_INTERVAL\"]",
                "1e-09",
            ),
            (
                map(&[("CONNECT_TIMEOUT", Value::Float(0.001))]),
                "DBHA[\"CONNECT_TIMEOUT\"]",
                "0.001",
            ),
            (
                map(&[("FAST_INTERVAL", Value::Int(0))]),
                "DBHA[\"FAST_INTERVAL\"]",
                "0",
            ),
            (
                map(&[("LISTENER_CHECK_INTERVAL", Value::Float(0.5))]),
                "DBHA[\"LISTENER_CHECK_INTERVAL\"]",
                "0.5",
            ),
            (
                map(&[("LISTENER_CHECK_INTERVAL", Value::Int(-1))]),
                "DBHA[\"LISTENER_CHECK_INTERVAL\"]",
                "-1",
            ),
            (
                map(&[("READ_YOUR_WRITES", Value::str("yes"))]),
                "DBHA[\"READ_YOUR_WRITES\"]",
                "'yes'",
            ),
            (
                map(&[("MAX_REPLICA_LAG", Value::Float(0.01))]),
                "DBHA[\"MAX_REPLICA_LAG\"]",
                "0.01",
            ),
        ];
        for (dbha, key, value) in cases.into_iter().chain(more) {
            let e = config(&dbha).unwrap_err();
            assert_eq!(
                (e.key.as_str(), e.value.as_str()),
                (key, value),
                "for {dbha}: {e}"
            );
            assert!(!e.problem.is_empty());
        }
    }

    #[test]
    fn bad_database_entries() {
        let bad = |entry: Value| {
            Config::from_settings(&map(&[("default", entry)]), &Value::None).unwrap_err()
        };
        let e = bad(map(&[("ENGINE", Value::str("django.db.backends.sqlite3"))]));
        assert_eq!(e.key, "DATABASES[\"default\"][\"ENGINE\"]");
        let e = bad(map(&[
            ("ENGINE", Value::str("django.db.backends.postgresql")),
            ("PORT", Value::str("54x")),
        ]));
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("DATABASES[\"default\"][\"PORT\"]", "'54x'")
        );
        let e = bad(map(&[
            ("ENGINE", Value::str("django.db.backends.postgresql")),
            ("PORT", Value::Int(70000)),
        ]));
        assert_eq!(e.value, "70000");
        let e = bad(map(&[
            ("ENGINE", Value::str("django.db.backends.postgresql")),
            ("HOST", Value::str("a,b")),
        ]));
        assert_eq!(e.key, "DATABASES[\"default\"][\"HOST\"]");
        let e = bad(map(&[
            ("ENGINE", Value::str("oracle")),
            ("HOST", Value::str("db")),
        ]));
        assert_eq!(e.key, "DATABASES[\"default\"][\"PORT\"]");
        let e = bad(map(&[("HOST", Value::str("db"))]));
        assert_eq!(e.key, "DATABASES[\"default\"][\"ENGINE\"]");
        let e = Config::from_settings(&Value::List(vec![]), &Value::None).unwrap_err();
        assert_eq!(e.key, "DATABASES");
        let e = Config::from_settings(&map(&[]), &Value::None).unwrap_err();
        assert_eq!(e.key, "DATABASES");
    }

    #[test]
    fn no_error_quotes_a_password() {
        let e = config(&map(&[("DATABASES", list(&["default", "nope"]))])).unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
        let oracle = map(&[(
            "x",
            map(&[
                ("ENGINE", Value::str("oracle")),
                ("PASSWORD", Value::str("hunter2")),
            ]),
        )]);
        let e = Config::from_settings(&oracle, &map(&[("PROBE", Value::str("handshake"))]))
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn no_error_quotes_a_password_whatever_its_type_or_place() {
        let secret = "hunter2-secret";
        let with_password = |password: Value| {
            map(&[(
                "default",
                map(&[
                    ("ENGINE", Value::str("django.db.backends.postgresql")),
                    ("PASSWORD", password),
                ]),
            )])
        };
        let leaks = [
            Config::from_settings(
                &with_password(Value::List(vec![Value::str(secret)])),
                &Value::None,
            ),
            Config::from_settings(
                &Value::List(vec![with_password(Value::str(secret))]),
                &Value::None,
            ),
            Config::from_settings(
                &Value::Other(format!(
                    "mappingproxy({{'default': {{'PASSWORD': '{secret}'}}}})"
                )),
                &Value::None,
            ),
            config(&map(&[(
                "PROBE_CREDENTIAL",
                map(&[(
                    "default",
                    map(&[("USER", Value::str("m")), ("PASSWORD", Value::str(secret))]),
                )]),
            )])),
        ];
        for result in leaks {
            let e = result.unwrap_err();
            assert!(!e.to_string().contains(secret), "{e}");
        }
    }

    #[test]
    fn misspelled_keys_get_a_suggestion() {
        let e = config(&map(&[("PROBE_CREDENTIAL", map(&[]))])).unwrap_err();
        assert_eq!(
            e.problem,
            "unknown key; did you mean \"PROBE_CREDENTIALS\"?"
        );
        let e = config(&map(&[("check_interval", Value::Int(1))])).unwrap_err();
        assert_eq!(e.problem, "unknown key; did you mean \"CHECK_INTERVAL\"?");
        let e = config(&map(&[("COLOUR", Value::Int(1))])).unwrap_err();
        assert!(e.problem.starts_with("unknown key; known keys are"), "{e}");
    }

    #[test]
    fn monitoring_credentials_name_watched_aliases_and_their_own_password() {
        let credentials = |alias: &str, fields: &[(&str, Value)]| {
            config(&map(&[("PROBE_CREDENTIALS", map(&[(alias, map(fields))]))]))
        };
        let e = credentials(
            "nope",
            &[("USER", Value::str("m")), ("PASSWORD", Value::str("p"))],
        )
        .unwrap_err();
        assert_eq!(e.key, "DBHA[\"PROBE_CREDENTIALS\"][\"nope\"]");
        assert!(e.problem.contains("no such alias"));
        let e = credentials("default", &[("USER", Value::str("m"))]).unwrap_err();
        assert!(e.problem.contains("PASSWORD"), "{e}");
        assert!(!e.to_string().contains("hunter2"));
        let c = credentials(
            "default",
            &[("USER", Value::str("m")), ("PASSWORD", Value::str(""))],
        )
        .unwrap();
        assert_eq!(c.nodes[0].server.login.user, "m");
        assert_eq!(c.nodes[0].server.login.password, None);
    }

    #[test]
    fn errors_name_the_exact_key() {
        let other = map(&[(
            "o",
            map(&[("ENGINE", Value::str("oracle")), ("PORT", Value::Int(1521))]),
        )]);
        let e = Config::from_settings(
            &other,
            &map(&[("PROBE", map(&[("o", Value::str("role"))]))]),
        )
        .unwrap_err();
        assert_eq!(e.key, "DBHA[\"PROBE\"][\"o\"]");
        let e = config(&map(&[("PROBE", Value::str("ping"))])).unwrap_err();
        assert!(e.problem.contains("'role'"), "{e}");
        let many = Value::Map(
            (0..65)
                .map(|i| (format!("db{i}"), pg("10.0.0.1", 5432 + i)))
                .collect(),
        );
        let e = Config::from_settings(&many, &Value::None).unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("DATABASES", "65 aliases")
        );
        let nul = map(&[(
            "default",
            map(&[
                ("ENGINE", Value::str("django.db.backends.postgresql")),
                ("HOST", Value::str("db\0evil\nline")),
            ]),
        )]);
        let e = Config::from_settings(&nul, &Value::None).unwrap_err();
        assert_eq!(e.key, "DATABASES[\"default\"][\"HOST\"]");
        assert!(!e.to_string().contains('\n'), "quoted escaped, one line");
    }

    #[test]
    fn hosts_as_django_gives_them() {
        let endpoint = |engine: &str, host: Value, port: Value, options: Value| {
            let entry = map(&[
                ("ENGINE", Value::str(engine)),
                ("HOST", host),
                ("PORT", port),
                ("OPTIONS", options),
            ]);
            Config::from_settings(&map(&[("db", entry)]), &Value::None)
                .unwrap()
                .nodes[0]
                .server
                .endpoint
                .clone()
        };
        let pg = "django.db.backends.postgresql";
        let my = "django.db.backends.mysql";
        assert_eq!(
            endpoint(pg, Value::str(""), Value::str(""), Value::None),
            Endpoint::Tcp {
                host: "localhost".into(),
                port: 5432
            }
        );
        assert_eq!(
            endpoint(pg, Value::str("::1"), Value::str("6543"), Value::None),
            Endpoint::Tcp {
                host: "::1".into(),
                port: 6543
            }
        );
        assert_eq!(
            endpoint(pg, Value::str("[::1]"), Value::Int(5), Value::None).to_string(),
            "[::1]:5"
        );
        assert_eq!(
            endpoint(pg, Value::str("/run/pg"), Value::Int(5433), Value::None),
            Endpoint::Unix("/run/pg/.s.PGSQL.5433".into())
        );
        assert_eq!(
            endpoint(
                my,
                Value::None,
                Value::None,
                map(&[("unix_socket", Value::str("/run/my.sock"))])
            ),
            Endpoint::Unix("/run/my.sock".into())
        );
        assert_eq!(
            endpoint(my, Value::str("/run/m.sock"), Value::None, Value::None),
            Endpoint::Unix("/run/m.sock".into())
        );
        assert_eq!(
            endpoint(
                "django.contrib.gis.db.backends.postgis",
                Value::str("db"),
                Value::None,
                Value::None
            ),
            Endpoint::Tcp {
                host: "db".into(),
                port: 5432
            }
        );
    }

    #[test]
    fn other_engines_default_to_tcp_and_refuse_handshake() {
        let dbs = map(&[(
            "x",
            map(&[
                ("ENGINE", Value::str("oracle")),
                ("HOST", Value::str("o")),
                ("PORT", Value::Int(1521)),
            ]),
        )]);
        let c = Config::from_settings(&dbs, &Value::None).unwrap();
        assert_eq!(c.nodes[0].probe, ProbeKind::Tcp);
        let e =
            Config::from_settings(&dbs, &map(&[("PROBE", Value::str("handshake"))])).unwrap_err();
        assert_eq!(e.key, "DBHA[\"PROBE\"]");
        assert_eq!(e.code, Problem::BadValue);
        let codes: Vec<_> = c
            .warnings
            .iter()
            .map(|w| (w.code, w.key.as_str()))
            .collect();
        assert_eq!(
            codes,
            [(Problem::TcpOnly, "DATABASES[\"x\"][\"ENGINE\"]")],
            "only 'tcp' for this engine, and the default timing is sane"
        );
    }

    #[test]
    fn each_problem_has_its_own_code() {
        let code = |databases: &Value, dbha: &[(&str, Value)]| {
            Config::from_settings(databases, &map(dbha))
                .unwrap_err()
                .code
        };
        let dbs = three_pg();
        assert_eq!(code(&dbs, &[("FAL", Value::Int(2))]), Problem::UnknownKey);
        assert_eq!(code(&dbs, &[("FALL", Value::str("2"))]), Problem::WrongType);
        assert_eq!(code(&dbs, &[("FALL", Value::Int(0))]), Problem::BadValue);
        assert_eq!(
            code(&dbs, &[("CHECK_INTERVAL", Value::str("1"))]),
            Problem::WrongType
        );
        assert_eq!(
            code(&dbs, &[("CHECK_INTERVAL", Value::Float(1e-9))]),
            Problem::BadValue
        );
        assert_eq!(code(&dbs, &[("READS", Value::Int(1))]), Problem::WrongType);
        assert_eq!(
            code(&dbs, &[("READS", Value::str("all"))]),
            Problem::BadValue
        );
        let groups = |aliases: &[&str]| {
            map(&[(
                "main",
                Value::List(aliases.iter().map(|a| Value::str(a)).collect()),
            )])
        };
        assert_eq!(
            code(&dbs, &[("GROUPS", groups(&["nope"]))]),
            Problem::UnknownName
        );
        let two = map(&[
            ("a", groups(&["default"]).get("main").cloned().unwrap()),
            ("b", groups(&["default"]).get("main").cloned().unwrap()),
        ]);
        assert_eq!(code(&dbs, &[("GROUPS", two)]), Problem::DuplicateAlias);
        let routes = map(&[("app", Value::str("nope"))]);
        assert_eq!(code(&dbs, &[("ROUTES", routes)]), Problem::UnknownName);
        let probe = map(&[("nope", Value::str("tcp"))]);
        assert_eq!(code(&dbs, &[("PROBE", probe)]), Problem::UnknownName);
        let credentials = map(&[("nope", map(&[("PASSWORD", Value::str("x"))]))]);
        assert_eq!(
            code(&dbs, &[("PROBE_CREDENTIALS", credentials)]),
            Problem::UnknownName
        );
        let no_password = map(&[("default", map(&[("USER", Value::str("monitor"))]))]);
        assert_eq!(
            code(&dbs, &[("PROBE_CREDENTIALS", no_password)]),
            Problem::MissingPassword
        );
        let sqlite = map(&[(
            "db",
            map(&[("ENGINE", Value::str("django.db.backends.sqlite3"))]),
        )]);
        assert_eq!(code(&sqlite, &[]), Problem::Sqlite);
        let multi = map(&[("db", pg("a,b", 5432))]);
        assert_eq!(code(&multi, &[]), Problem::MultiHost);
        let bad_port = map(&[("db", pg("a", 0))]);
        assert_eq!(code(&bad_port, &[]), Problem::BadDatabase);
        let twins = map(&[("a", pg("10.0.0.1", 5432)), ("b", pg("10.0.0.1", 5432))]);
        let e = Config::from_settings(&twins, &Value::None).unwrap_err();
        assert_eq!(e.code, Problem::SameServer);
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("DATABASES", "['a', 'b']")
        );
        // Twins in different groups are two groups' business: not an error.
        let apart = map(&[
            ("one", groups(&["a"]).get("main").cloned().unwrap()),
            ("two", groups(&["b"]).get("main").cloned().unwrap()),
        ]);
        assert!(Config::from_settings(&twins, &map(&[("GROUPS", apart)])).is_ok());
    }

    #[test]
    fn warnings_for_settings_that_work_but_mislead() {
        let warnings = |databases: &Value, dbha: &[(&str, Value)]| -> Vec<Problem> {
            let config = Config::from_settings(databases, &map(dbha)).unwrap();
            config.warnings.iter().map(|w| w.code).collect()
        };
        assert_eq!(warnings(&three_pg(), &[]), []);
        let slow = [("CHECK_INTERVAL", Value::Float(0.5))];
        assert_eq!(warnings(&three_pg(), &slow), [Problem::SlowProbe]);
        let replicas = ("READS", Value::str("replicas"));
        assert_eq!(warnings(&three_pg(), std::slice::from_ref(&replicas)), []);
        let one = map(&[("default", pg("10.0.0.1", 5432))]);
        assert_eq!(
            warnings(&one, std::slice::from_ref(&replicas)),
            [Problem::NoReplicas]
        );
        let tcp = [replicas, ("PROBE", Value::str("tcp"))];
        assert_eq!(warnings(&three_pg(), &tcp), [Problem::NoReplicas]);
    }

    #[test]
    fn the_backend_vendor_decides_the_engine() {
        let wrapped = map(&[(
            "db",
            map(&[
                ("ENGINE", Value::str("myproject.pooled_backend")),
                ("HOST", Value::str("a")),
                ("PORT", Value::Int(5432)),
            ]),
        )]);
        let by_name = Config::from_settings(&wrapped, &Value::None).unwrap();
        assert_eq!(by_name.nodes[0].engine, Engine::Other);
        let vendors = map(&[("db", Value::str("postgresql"))]);
        let by_vendor = Config::from_django(&wrapped, &Value::None, &vendors).unwrap();
        assert_eq!(by_vendor.nodes[0].engine, Engine::PostgreSql);
        assert_eq!(by_vendor.nodes[0].probe, ProbeKind::Role);
        let mysql = map(&[("db", Value::str("mysql"))]);
        let by_vendor = Config::from_django(&wrapped, &Value::None, &mysql).unwrap();
        assert_eq!(by_vendor.nodes[0].engine, Engine::MySql);
        let sqlite = map(&[("db", Value::str("sqlite"))]);
        let e = Config::from_django(&wrapped, &Value::None, &sqlite).unwrap_err();
        assert_eq!(e.code, Problem::Sqlite);
    }

    fn patroni(urls: &[(&str, Value)], probe: Value) -> Result<Config, ConfigError> {
        config(&map(&[("PROBE", probe), ("PATRONI", map(urls))]))
    }

    fn urls() -> Vec<(&'static str, Value)> {
        vec![
            ("default", Value::str("http://10.0.0.2:8008")),
            ("failover1", Value::str("http://10.0.0.3:8008/")),
            (
                "failover2",
                map(&[
                    ("URL", Value::str("https://db3.example:8008")),
                    ("USER", Value::str("dbha")),
                    ("PASSWORD", Value::str("rest-secret")),
                    ("CA_FILE", Value::str("/etc/patroni/ca.pem")),
                ]),
            ),
        ]
    }

    #[test]
    fn patroni_probes_each_alias_through_its_rest_api() {
        let c = patroni(&urls(), Value::str("patroni")).unwrap();
        assert!(c.nodes.iter().all(|n| n.probe == ProbeKind::Patroni));
        let apis: Vec<_> = c.nodes.iter().map(|n| n.patroni.clone().unwrap()).collect();
        assert_eq!(apis[0].url, "http://10.0.0.2:8008");
        assert_eq!(
            apis[1].url, "http://10.0.0.3:8008",
            "the trailing slash goes"
        );
        assert_eq!(apis[2].user.as_deref(), Some("dbha"));
        assert_eq!(
            apis[2].password.as_ref().map(Secret::expose),
            Some("rest-secret")
        );
        assert!(!format!("{c:?}").contains("rest-secret"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);

        let both = Value::List(vec![Value::str("role"), Value::str("patroni")]);
        let c = patroni(&urls(), both).unwrap();
        assert!(c.nodes.iter().all(|n| n.probe == ProbeKind::PatroniAndRole));
        let per_alias = map(&[("default", Value::str("patroni"))]);
        let c = patroni(&urls()[..1], per_alias).unwrap();
        assert_eq!(c.nodes[0].probe, ProbeKind::Patroni);
        assert_eq!(c.nodes[1].probe, ProbeKind::Role);
    }

    #[test]
    fn patroni_settings_errors_name_the_key_and_hide_credentials() {
        let probe = || Value::str("patroni");
        let e = patroni(&urls()[..2], probe()).unwrap_err();
        assert_eq!(
            (e.code, e.key.as_str()),
            (Problem::BadValue, "DBHA[\"PROBE\"]")
        );
        assert!(
            e.problem.contains("DBHA[\"PATRONI\"][\"failover2\"]"),
            "{e}"
        );

        let e = patroni(&urls(), Value::str("role")).unwrap_err();
        assert_eq!(e.key, "DBHA[\"PATRONI\"][\"default\"]");
    }

    #[test]
    fn patroni_entry_errors_name_the_field() {
        let probe = || Value::str("patroni");
        let cases: Vec<(Value, &str, Problem)> = vec![
            (
                Value::str("ftp://h:8008"),
                "[\"failover2\"]",
                Problem::BadValue,
            ),
            (
                Value::str("http://h:8008/leader"),
                "[\"failover2\"]",
                Problem::BadValue,
            ),
            (
                Value::str("http://h:0"),
                "[\"failover2\"]",
                Problem::BadValue,
            ),
            (
                Value::str("http://:8008"),
                "[\"failover2\"]",
                Problem::BadValue,
            ),
            (
                Value::str("http://::1:8008"),
                "[\"failover2\"]",
                Problem::BadValue,
            ),
            (Value::Int(8008), "[\"failover2\"]", Problem::WrongType),
            (
                map(&[("USER", Value::str("u"))]),
                "[\"failover2\"]",
                Problem::BadValue,
            ),
            (
                map(&[
                    ("URL", Value::str("http://h:1")),
                    ("PASSWORD", Value::str("p")),
                ]),
                "[\"failover2\"][\"PASSWORD\"]",
                Problem::BadValue,
            ),
            (
                map(&[
                    ("URL", Value::str("http://h:1")),
                    ("CA_FILE", Value::str("/ca")),
                ]),
                "[\"failover2\"][\"CA_FILE\"]",
                Problem::BadValue,
            ),
            (
                map(&[
                    ("URL", Value::str("http://h:1")),
                    ("TOKEN", Value::str("t")),
                ]),
                "[\"failover2\"][\"TOKEN\"]",
                Problem::UnknownKey,
            ),
            (
                map(&[
                    ("URL", Value::str("http://h:1")),
                    ("PASSWORD", Value::Int(7)),
                ]),
                "[\"failover2\"][\"PASSWORD\"]",
                Problem::WrongType,
            ),
        ];
        for (value, key, code) in cases {
            let mut entries = urls();
            entries[2].1 = value.clone();
            let e = patroni(&entries, probe()).unwrap_err();
            assert_eq!(
                (e.code, e.key.as_str()),
                (code, &*format!("DBHA[\"PATRONI\"]{key}")),
                "{value}: {e}"
            );
        }
    }

    #[test]
    fn patroni_urls_with_credentials_and_odd_probes_are_refused() {
        let probe = || Value::str("patroni");
        let mut entries = urls();
        entries[0].1 = Value::str("http://dbha:url-secret@10.0.0.2:8008");
        let e = patroni(&entries, probe()).unwrap_err();
        assert!(e.problem.contains("USER"), "{e}");
        assert!(!e.to_string().contains("url-secret"), "{e}");
        assert!(e.value.contains("***@10.0.0.2:8008"), "{e}");

        entries = urls();
        entries.push(("nope", Value::str("http://h:1")));
        let e = patroni(&entries, probe()).unwrap_err();
        assert_eq!(
            (e.code, e.key.as_str()),
            (Problem::UnknownName, "DBHA[\"PATRONI\"][\"nope\"]")
        );

        let e = config(&map(&[("PATRONI", Value::str("http://h:1"))])).unwrap_err();
        assert_eq!(
            (e.code, e.key.as_str()),
            (Problem::WrongType, "DBHA[\"PATRONI\"]")
        );

        for odd in [
            Value::List(vec![Value::str("patroni"), Value::str("tcp")]),
            Value::List(vec![Value::str("patroni")]),
            Value::List(vec![
                Value::str("patroni"),
                Value::str("role"),
                Value::str("role"),
            ]),
        ] {
            let e = patroni(&urls(), odd.clone()).unwrap_err();
            assert_eq!(
                (e.code, e.key.as_str()),
                (Problem::BadValue, "DBHA[\"PROBE\"]"),
                "{odd}"
            );
        }
    }
}
