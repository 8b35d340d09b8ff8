"""Property tests of settings validation: whatever `DATABASES` and `DBHA`
hold, dbha accepts them or names the offending key in an
`ImproperlyConfigured` (or a system check), never raises anything else,
never panics and never quotes a password.

`DBHA_PROPERTIES=long` (and `DBHA_PROPERTIES_EXAMPLES=N`, default 20,000)
runs the long profile by hand; CI runs a fixed, derandomised sample."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections import OrderedDict, UserDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import PurePosixPath
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import dbha
from dbha import _core, conf

pytestmark = [
    pytest.mark.filterwarnings("ignore:Overriding setting DATABASES"),
    # Hypothesis's own note on the huge values drawn on purpose.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

settings.register_profile(
    "ci",
    max_examples=1000,
    derandomize=True,  # the same examples every run: CI never flakes on a new one
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("DBHA_PROPERTIES_EXAMPLES", "20000")),
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("DBHA_PROPERTIES", "ci"))


def profile(share: float = 1.0) -> settings:
    """The profile, with `share` of its examples (for the costlier tests)."""
    return settings(PROFILE, max_examples=max(10, int(PROFILE.max_examples * share)))


# --- passwords ---------------------------------------------------------------------------------

#: Every password has this stem: a message holding it leaks.
STEM = "Pw9q"
SECRET_RE = re.compile(STEM + r"[0-9a-f]{6}")


@dataclass
class Secrets:
    """The passwords an example placed, in every form a message could show
    them: as given, as `repr()` escapes it, as Rust's lossy UTF-8 makes it."""

    given: list[str] = field(default_factory=list)

    def new(self, draw: Any, odd: bool = True) -> str:
        # Distinctive (the stem and a counter) but sometimes odd: quotes,
        # backslashes, newlines, non-BMP text, a lone surrogate.
        tail = draw(st.sampled_from(["", "'", '"\'"', "\\", "\n", "\U0001f512", "\udc80", "é "]))
        secret = f"{STEM}{len(self.given):06x}" + (tail if odd else "")
        self.given.append(secret)
        return secret

    def forms(self) -> set[str]:
        found = set()
        for secret in self.given:
            found |= {secret, repr(secret)[1:-1]}
            found.add(secret.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
        return found

    def leaks(self, text: str) -> list[str]:
        return [form for form in self.forms() if form in text]


# --- arbitrary values ----------------------------------------------------------------------------


class RaisingRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr fails")


class NonStrRepr:
    def __repr__(self) -> Any:
        return 42


class HugeRepr:
    def __repr__(self) -> str:
        return "<" + "h" * 300_000 + ">"


class ForgedRepr:
    """A repr that would forge log lines if quoted raw."""

    def __repr__(self) -> str:
        return "x\nERROR forged\x00\x1b[31m\udc80"


class EqualsEverything:
    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("default")


class EqualityRaises:
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq fails")

    __hash__ = object.__hash__


class FalsyRaises:
    def __bool__(self) -> bool:
        raise RuntimeError("bool fails")


class BrokenMapping(Mapping[Any, Any]):
    """A mapping whose every read fails."""

    def __getitem__(self, key: Any) -> Any:
        raise RuntimeError("getitem fails")

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("iter fails")

    def __len__(self) -> int:
        raise RuntimeError("len fails")


class ItemsRaise(dict[Any, Any]):
    """A dict (read by dbha as one) whose Python-level methods fail."""

    def items(self) -> Any:
        raise RuntimeError("items fails")

    def get(self, key: Any, default: Any = None) -> Any:
        raise RuntimeError("get fails")


def recursive_list() -> list[Any]:
    loop: list[Any] = [1]
    loop.append(loop)
    return loop


def recursive_dict() -> dict[str, Any]:
    loop: dict[str, Any] = {"ENGINE": "django.db.backends.postgresql"}
    loop["OPTIONS"] = loop
    return loop


def lazy_text(text: str) -> Any:
    from django.utils.functional import lazy

    return lazy(lambda: text, str)()


ODD_OBJECTS = st.sampled_from(
    [RaisingRepr, NonStrRepr, HugeRepr, ForgedRepr, EqualsEverything, EqualityRaises, FalsyRaises]
).map(lambda cls: cls())

TEXT = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),  # surrogates too
    st.sampled_from(["", " ", "\x00", "a\nb", "\r\n", "\u2028", "'\"", "\\", "é", "\U0010ffff"]),
    st.sampled_from([("x", 100_000), ("\n", 5_000), ("é", 50_000)]).map(lambda t: t[0] * t[1]),
)
INTS = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**63 - 1, 2**63, -(2**63) - 1, 2**64]),
    # Past the digits `repr()` may print: its repr raises.
    st.just(5000).map(lambda digits: 10**digits),
)
FLOATS = st.one_of(
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-300, 5e-324, -0.0, 0.01, 86400.0001]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    FLOATS,
    TEXT,
    st.binary(max_size=8),
    st.sampled_from(
        [
            Decimal("1.5"),
            Decimal("nan"),
            1j,
            range(3),
            frozenset({"default"}),
            {"default"},
            PurePosixPath("/tmp"),
            SimpleNamespace(a=1),
            object(),
            Ellipsis,
            int,
            len,
        ]
    ),
    st.builds(lazy_text, st.sampled_from(["default", "role", "1.0"])),
    ODD_OBJECTS,
)
KEYS = st.one_of(
    TEXT,
    st.sampled_from(["ENGINE", "HOST", "PORT", "PASSWORD", "OPTIONS", "DATABASES", "GROUPS"]),
    INTS,
    st.sampled_from([None, True, 1.5, ("a", 1), b"PASSWORD", frozenset()]),
    st.builds(EqualsEverything),
    st.builds(EqualityRaises),
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    dicts = st.dictionaries(KEYS, children, max_size=4)
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        dicts,
        dicts.map(MappingProxyType),
        dicts.map(OrderedDict),
        dicts.map(UserDict),
        dicts.map(ItemsRaise),
        st.just(BrokenMapping()),
        st.builds(recursive_list),
        st.builds(recursive_dict),
    )


#: Any Python value, nested (beyond dbha's depth limit too).
VALUES = st.recursive(SCALARS, containers, max_leaves=12)


# --- valid settings, then one field changed ----------------------------------------------------

PG_ENGINES = [
    "django.db.backends.postgresql",
    "dbha.backends.postgresql",
    "django.db.backends.postgresql_psycopg2",
]
MYSQL_ENGINES = ["django.db.backends.mysql", "dbha.backends.mysql"]
#: Engines dbha can probe only with `tcp` (the name decides: not importable).
OTHER_ENGINES = ["django.db.backends.oracle", "no_such_vendor.backend"]
#: Kept out of every group.
SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}

MISSPELLED = ["PASWORD", "password", "Password", "PASSWD", "PROBE_CREDENTIAL", "PROBECREDENTIALS"]


@dataclass(repr=False)
class Example:
    databases: Any
    dbha: Any
    secrets: Secrets
    valid: bool
    story: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # Hypothesis prints a failing example: its values' reprs may raise.
        def safe(value: Any) -> str:
            try:
                text = repr(value)
            except Exception as e:
                text = f"<repr raised {e!r}>"
            return text if isinstance(text, str) and len(text) < 5000 else text[:5000] + "..."

        return (
            f"Example(databases={safe(self.databases)}, dbha={safe(self.dbha)}, "
            f"valid={self.valid}, story={self.story})"
        )


def password_value(draw: Any, secrets: Secrets) -> Any:
    """A password as given: a string, or a malformed one that still holds
    a secret (a list, a tuple, a set, bytes, a number)."""
    secret = secrets.new(draw)
    # Not a dict with the password as a key: see
    # test_a_password_given_as_a_dict_is_not_quoted (an open defect).
    return draw(
        st.sampled_from(
            [
                secret,
                [secret],
                (secret, 1),
                {secret},
                secret.encode("utf-8", "surrogatepass"),
                [[[[[[[[[secret]]]]]]]]],  # past dbha's depth limit
                {"value": secret},
                MappingProxyType({"PASSWORD": secret}),
            ]
        )
    )


@st.composite
def valid_examples(draw: Any) -> Example:
    """Settings dbha must accept: 1 to 5 servers of every engine, each way
    of grouping them, every DBHA key at a value in range."""
    secrets = Secrets()
    count = draw(st.integers(1, 5))
    aliases = draw(
        st.lists(
            st.one_of(
                st.sampled_from(["default", "failover1", "failover2", "replica", "reports"]),
                st.text(st.characters(codec="utf-8"), min_size=1, max_size=8),
            ),
            min_size=count,
            max_size=count,
            unique=True,
        )
    )
    ports = draw(st.lists(st.integers(1, 65535), min_size=count, max_size=count, unique=True))
    databases: dict[str, Any] = {}
    engines: dict[str, str] = {}
    for i, (alias, port) in enumerate(zip(aliases, ports, strict=True)):
        kind = draw(st.sampled_from(["postgresql", "postgresql", "mysql", "other"]))
        engine = draw(
            st.sampled_from(
                {"postgresql": PG_ENGINES, "mysql": MYSQL_ENGINES, "other": OTHER_ENGINES}[kind]
            )
        )
        engines[alias] = kind
        host = draw(
            st.sampled_from(["", "localhost", "10.0.0.7", "[::1]", "::1", "db.example", " db "])
        )
        if kind != "other" and draw(st.booleans()):
            host = f"/run/db{i}"  # a socket: its own per alias
        entry: dict[str, Any] = {
            "ENGINE": engine,
            "HOST": host,
            "PORT": draw(st.sampled_from([port, str(port), f" {port} "])),
            "NAME": draw(st.sampled_from(["app", "postgres", "", None])),
            "USER": draw(st.sampled_from(["app", "", None])),
            "CONN_MAX_AGE": 0,
        }
        if draw(st.booleans()):
            entry["PASSWORD"] = draw(st.sampled_from([secrets.new(draw), "", None]))
        options: dict[str, Any] = {}
        if kind == "postgresql" and draw(st.booleans()):
            options["sslmode"] = draw(st.sampled_from(["disable", "prefer", "verify-full"]))
            options["sslrootcert"] = "/etc/ssl/ca.pem"
        if kind == "mysql" and draw(st.booleans()):
            options["ssl_mode"] = draw(st.sampled_from(["DISABLED", "REQUIRED", "VERIFY_CA"]))
            options["ssl"] = {"ca": "/etc/ssl/ca.pem"}
        # Where drivers take passwords too: dbha never quotes them.
        if draw(st.booleans()):
            options[draw(st.sampled_from(["password", "passwd"]))] = secrets.new(draw)
        if options:
            entry["OPTIONS"] = options
        if draw(st.booleans()):
            entry["TEST"] = {"MIRROR": None, "PASSWORD": secrets.new(draw)}
        if draw(st.booleans()):
            entry[draw(st.sampled_from(MISSPELLED[:4]))] = secrets.new(draw)
        databases[alias] = entry
    if draw(st.booleans()):
        databases["sqlite"] = SQLITE
    watched = list(aliases)
    dbha: dict[str, Any] = {}
    grouping = draw(st.sampled_from(["all", "subset", "groups"]))
    if grouping == "all" and "sqlite" in databases:
        grouping = "subset"
    if grouping == "subset":
        watched = draw(st.permutations(aliases))[: draw(st.integers(1, count))]
        dbha["DATABASES"] = watched
    elif grouping == "groups":
        shuffled = draw(st.permutations(aliases))
        cut = draw(st.integers(1, count))
        groups = {"main": shuffled[:cut]}
        if cut < count:
            groups["reports"] = shuffled[cut:]
        watched = list(shuffled)
        dbha["GROUPS"] = groups
        if draw(st.booleans()):
            dbha["ROUTES"] = {"shop": "main", "shop.Report": draw(st.sampled_from(list(groups)))}
    seconds = st.one_of(st.floats(0.01, 86400), st.integers(1, 86400))
    for key, values in {
        "CHECK_INTERVAL": seconds,
        "CONNECT_TIMEOUT": seconds,
        "FAST_INTERVAL": seconds,
        "LISTENER_CHECK_INTERVAL": st.one_of(st.just(0), st.floats(1, 86400)),
        "RISE": st.integers(1, 1000),
        "FALL": st.integers(1, 1000),
        "JITTER": st.floats(0, 0.999),
        "ON_ALL_DOWN": st.sampled_from(["last", "raise"]),
        "FAILBACK": st.sampled_from(["sticky", "auto"]),
        "READS": st.sampled_from(["writer", "replicas", "any"]),
        "MAX_REPLICA_LAG": st.floats(0.1, 86400),
        "LOAD_BALANCE": st.sampled_from(["round_robin", "random", "latency"]),
        "WRITER_READS": st.lists(st.sampled_from(["auth", "sessions", "shop.Order"])),
        "READ_YOUR_WRITES": st.booleans(),
        "HEALTH_VIEW_ACCESS": st.sampled_from([None, "staff"]),
    }.items():
        if draw(st.integers(0, 3)) == 0:
            dbha[key] = draw(values)
    probes = {
        alias: draw(st.sampled_from(["tcp"] if engines[alias] == "other" else ["tcp", "role"]))
        for alias in watched
        if draw(st.booleans())
    }
    if probes:
        dbha["PROBE"] = probes
    credentials = {
        alias: {"USER": "monitor", "PASSWORD": draw(st.sampled_from([secrets.new(draw), ""]))}
        for alias in watched
        if engines[alias] != "other" and draw(st.booleans())
    }
    if credentials:
        dbha["PROBE_CREDENTIALS"] = credentials
    settings_dbha: Any = dbha if dbha or draw(st.booleans()) else None
    if settings_dbha is not None and draw(st.integers(0, 4)) == 0:
        settings_dbha = MappingProxyType(settings_dbha)
    return Example(databases, settings_dbha, secrets, valid=True)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in nested plain dicts (where a field can be changed)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    return found


def replaced(root: Any, path: tuple[Any, ...], change: Any) -> Any:
    """A copy of `root` with the value at `path` changed (`change(old)`)."""
    if not path:
        return change(root)
    copy = dict(root)
    copy[path[0]] = replaced(root[path[0]], path[1:], change)
    return copy


#: Values just past what a field accepts, or of a type that is nearly right.
NEAR = [
    0,
    -1,
    0.001,
    1e-300,
    86401,
    1001,
    math.nan,
    math.inf,
    "1",
    "",
    "db1,db2",
    True,
    None,
    [],
    {},
]

#: Settings whose texts are no passwords (aliases, group names, labels).
PASSWORD_FREE = {"GROUPS", "DATABASES", "ROUTES", "PROBE", "WRITER_READS", "ssl"}


@st.composite
def nearly_valid_examples(draw: Any) -> Example:
    """A valid example with one field changed: to any value, a value just
    out of range, a misspelling holding a password, or removed."""
    example = draw(valid_examples())
    secrets = example.secrets
    dbha = dict(example.dbha) if isinstance(example.dbha, Mapping) else {}
    which = draw(st.sampled_from(["DATABASES", "DBHA"]))
    root = example.databases if which == "DATABASES" else dbha
    path = draw(st.sampled_from(paths(root)))
    near = st.sampled_from(NEAR)
    how = draw(
        st.sampled_from(["any", "near", "delete", "misspelled", "password", "proxy", "twice"])
    )
    if how == "delete" and path:
        changed = replaced(root, path[:-1], lambda d: {k: v for k, v in d.items() if k != path[-1]})
    elif how == "misspelled":
        # A password under a misspelled key, where a password key could be:
        # a DATABASES entry, its OPTIONS or TEST, DBHA, a monitoring login.
        key = draw(st.sampled_from(MISSPELLED))
        entry = {"default": {"USER": "m", "PASSWORD": secrets.new(draw)}}
        value = entry if key.startswith("PROBE") else secrets.new(draw)
        parent = path[: next((i for i, k in enumerate(path) if k in PASSWORD_FREE), len(path))]
        if not isinstance(_at(root, parent), dict):
            parent = ()
        changed = replaced(root, parent, lambda d: {**d, key: value})
    elif how == "password":
        # A malformed password where one goes: an entry's or a monitoring login's.
        parent = path if path and isinstance(_at(root, path), dict) else ()
        if which == "DBHA" and not parent:
            alias = draw(st.sampled_from([*example.databases, "nope"]))
            logins = {alias: {"USER": "m", "PASSWORD": password_value(draw, secrets)}}
            changed = {**root, "PROBE_CREDENTIALS": logins}
        else:
            changed = replaced(
                root, parent, lambda d: {**d, "PASSWORD": password_value(draw, secrets)}
            )
    elif how == "twice":
        # An alias listed twice, or in two groups; two aliases on one server.
        changed = replaced(
            root, path, lambda v: [*v, v[0]] if isinstance(v, list) and v else {**SQLITE}
        )
        if which == "DBHA" and isinstance(changed.get("GROUPS"), dict):
            groups = changed["GROUPS"]
            first = next(iter(groups.values()))
            changed = {**changed, "GROUPS": {**groups, "again": first[:1]}}
        elif which == "DATABASES" and len(path) == 1:
            changed = {**root, "twin": dict(root[path[0]])}
    elif how == "proxy":
        changed = replaced(
            root, path, lambda v: MappingProxyType(v) if isinstance(v, dict) else tuple([v])
        )
    else:
        changed = replaced(root, path, lambda _: draw(VALUES if how == "any" else near))
    story = [f"{which}{''.join(f'[{k!r}]' for k in path)}: {how}"]
    if which == "DATABASES":
        return Example(changed, example.dbha, secrets, valid=False, story=story)
    return Example(example.databases, changed, secrets, valid=False, story=story)


def _at(root: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        root = root[key]
    return root


@st.composite
def arbitrary_examples(draw: Any) -> Example:
    """Anything at all for `DATABASES` and `DBHA`, with passwords in it."""
    secrets = Secrets()

    def entry() -> Any:
        fields = {
            key: draw(VALUES)
            for key in draw(
                st.lists(st.sampled_from(["ENGINE", "HOST", "PORT", "NAME", "OPTIONS"]), max_size=5)
            )
        }
        fields["PASSWORD"] = password_value(draw, secrets)
        return draw(st.sampled_from([fields, MappingProxyType(fields)]))

    databases = draw(
        st.one_of(
            VALUES,
            st.dictionaries(KEYS, st.one_of(VALUES, st.builds(entry)), max_size=4),
            st.lists(st.builds(entry), max_size=2),
        )
    )
    dbha = draw(
        st.one_of(
            st.none(),
            VALUES,
            st.dictionaries(
                st.one_of(KEYS, st.sampled_from(["PROBE_CREDENTIALS", *MISSPELLED])),
                VALUES,
                max_size=4,
            ),
        )
    )
    if isinstance(dbha, dict) and draw(st.booleans()):
        creds = {"USER": "m", "PASSWORD": password_value(draw, secrets)}
        dbha[draw(st.sampled_from(["PROBE_CREDENTIALS", *MISSPELLED]))] = draw(
            st.sampled_from([{"default": creds}, creds, [creds]])
        )
    return Example(databases, dbha, secrets, valid=False)


EXAMPLES = st.one_of(valid_examples(), nearly_valid_examples(), arbitrary_examples())


# --- the properties -------------------------------------------------------------------------------

CHECK_ID = re.compile(r"dbha\.[EW]0\d\d")
#: A message starts by naming the setting: `DBHA`, `DATABASES`, or a key under one.
NAMES_A_KEY = re.compile(r"dbha: (DBHA|DATABASES)(\[|\b)")


def assert_problems_are_well_formed(example: Example, problems: Any) -> None:
    assert isinstance(problems, list)
    errors = [p for p in problems if p[0].startswith("dbha.E")]
    assert len(errors) <= 1, f"the first error only: {problems}"
    for check_id, message in problems:
        assert CHECK_ID.fullmatch(check_id), check_id
        assert isinstance(message, str)
        assert message.startswith("dbha: "), message[:200]
        assert NAMES_A_KEY.match(message), message[:200]
        assert not example.secrets.leaks(message), message[:2000]
    if example.valid:
        assert not errors, errors
    event(f"{'valid' if example.valid else 'changed'}: {errors[0][0] if errors else 'accepted'}")


def validate(example: Example, vendors: Any = None) -> list[tuple[str, str]]:
    """`validate_settings`, which must return whatever it is given: an
    exception of any type (a Rust panic is `pyo3_runtime.PanicException`, a
    BaseException) fails the property."""
    note(f"story: {example.story}")
    try:
        return _core.validate_settings(example.databases, example.dbha, vendors)
    except BaseException as e:  # PanicException is not an Exception
        raise AssertionError(f"validate_settings raised {type(e).__qualname__}: {e}") from e


@profile()
@given(EXAMPLES)
def test_every_configuration_validates_or_names_the_key(example: Example) -> None:
    problems = validate(example)
    assert_problems_are_well_formed(example, problems)
    # The groups are known exactly when the settings are valid.
    groups = _core.watched_groups(example.databases, example.dbha)
    has_error = any(check_id.startswith("dbha.E") for check_id, _ in problems)
    assert bool(groups) != has_error, (groups, problems)


@profile()
@given(st.one_of(valid_examples(), nearly_valid_examples()))
def test_the_backends_vendors_read_as_the_checker_reads_them(example: Example) -> None:
    """With each alias's vendor from its backend (as `read_settings` gives
    them), the same properties hold."""
    vendors = conf.vendors(example.databases)
    assert_problems_are_well_formed(example, validate(example, vendors))


@profile(share=0.1)
@given(st.one_of(valid_examples(), nearly_valid_examples(), arbitrary_examples()))
def test_available_db_raises_only_improperly_configured(example: Example) -> None:
    """Through the real entry point, under `override_settings`: the checker
    starts (on scripted answers: no network) or raises the settings error,
    the same message `validate_settings` gives."""
    vendors = conf.vendors(example.databases)
    problems = validate(example, vendors)
    assert_problems_are_well_formed(example, problems)
    error = next((m for check_id, m in problems if check_id.startswith("dbha.E")), None)
    groups = _core.watched_groups(example.databases, example.dbha, vendors)
    # Scripted: each group's first alias a primary, the rest standbys.
    for _, aliases in groups:
        for i, alias in enumerate(aliases):
            _core.simulate(alias, "up", "standby" if i else "primary", 0.0, None if i else 1)
    try:
        with override_settings(DATABASES=example.databases, DBHA=example.dbha):
            dbha.close()
            if error is None:
                assert dbha.available_db() == groups[0][1][0]
            else:
                with pytest.raises(ImproperlyConfigured) as raised:
                    dbha.available_db()
                assert str(raised.value) == error
                assert not example.secrets.leaks(str(raised.value))
    finally:
        dbha.close()
        _core.clear_simulation()


@profile(share=0.05)
@given(st.one_of(valid_examples(), nearly_valid_examples(), arbitrary_examples()))
def test_system_checks_never_crash(example: Example) -> None:
    """`run_checks()` (as `manage.py check` runs it) reports dbha's own ids,
    never crashes, and quotes no password."""
    with override_settings(DATABASES=example.databases, DBHA=example.dbha):
        messages = run_checks()
    dbha_messages = [m for m in messages if m.id and m.id.startswith("dbha.")]
    assert [m for m in messages if m not in dbha_messages] == []
    for message in dbha_messages:
        assert not example.secrets.leaks(message.msg), message.msg[:2000]
        assert message.msg.startswith("dbha: ")
    if example.valid:
        assert [m.id for m in dbha_messages if m.is_serious()] == []


# --- defects the properties found --------------------------------------------------------------

PG = {"ENGINE": "django.db.backends.postgresql", "HOST": "db", "PORT": 5432}
SECRET = f"{STEM}c0ffee"


@pytest.mark.parametrize(
    ("setting", "check_id"),
    [
        ({"DATABASES": ItemsRaise({"default": PG})}, None),
        ({"DATABASES": {"default": ItemsRaise(PG)}}, None),
        ({"DBHA": ItemsRaise({"CHECK_INTERVAL": 1.0})}, None),
        ({"DBHA": BrokenMapping()}, "dbha.E002"),
        ({"DBHA": {"HEALTH_VIEW_ACCESS": EqualityRaises()}}, "dbha.E013"),
        ({"DBHA": {"HEALTH_VIEW_ACCESS": RaisingRepr()}}, "dbha.E013"),
    ],
)
def test_settings_that_fail_when_read_are_reported_not_raised(
    setting: dict[str, Any], check_id: str | None
) -> None:
    """Found by test_system_checks_never_crash and
    test_available_db_raises_only_improperly_configured: dbha's Python code
    read settings with `.items()`, `.get()`, `== "staff"` and `repr()`, and
    their exceptions crashed `manage.py check`, `available_db()` and the
    health view's access rule (which must fail closed)."""
    from django.test import RequestFactory

    from dbha.health import may_see_details

    setting = {"DATABASES": {"default": PG}, "DBHA": None, **setting}
    _core.simulate("default", "refused")  # no DNS look-up of "db"
    try:
        with override_settings(**setting):
            errors = [m.id for m in run_checks() if m.is_serious()]
            assert errors == ([check_id] if check_id else [])
            if check_id != "dbha.E002":
                assert dbha.available_db() == "default"
            assert may_see_details(RequestFactory().get("/dbha/")) is False
    finally:
        dbha.close()
        _core.clear_simulation()


@pytest.mark.parametrize(
    ("databases", "dbha_settings"),
    [
        ({"default": {**PG, "PASSWORD": {SECRET: 1}}}, None),
        (
            {"default": PG},
            {"PROBE_CREDENTIALS": {"default": {"USER": "m", "PASSWORD": {SECRET: "x"}}}},
        ),
    ],
)
def test_a_password_given_as_a_dict_is_not_quoted(databases: Any, dbha_settings: Any) -> None:
    """A malformed PASSWORD that is a dict is quoted with its keys:
    `config.rs` `redacted()` replaces only texts and numbers under a map,
    and `runtime.rs` `passwords()` (the scrub) collects only values, never
    keys, so a password given as a key survives both."""
    [(check_id, message)] = _core.validate_settings(databases, dbha_settings)
    assert check_id == "dbha.E002"
    assert SECRET not in message


def test_a_dbha_setting_that_is_not_a_mapping_is_not_quoted_whole() -> None:
    """`DBHA` as an object (a namespace, a dataclass): `Settings::new` in
    `config.rs` quotes it unredacted, and the scrub cannot see into an
    object's repr; `DATABASES` of the wrong type is redacted already."""
    settings_object = SimpleNamespace(
        PROBE_CREDENTIALS={"default": {"USER": "m", "PASSWORD": SECRET}}
    )
    [(check_id, message)] = _core.validate_settings({"default": PG}, settings_object)
    assert check_id == "dbha.E002"
    assert message.startswith("dbha: DBHA = ")
    assert SECRET not in message


class MutatesItsDict:
    """A value whose repr adds a key to the dict holding it."""

    def __init__(self, holder: dict[str, Any]) -> None:
        self.holder = holder

    def __repr__(self) -> str:
        self.holder[f"added{len(self.holder)}"] = 1
        return "MutatesItsDict()"


def test_a_repr_that_changes_the_settings_is_no_panic() -> None:
    """`binding/value.rs` `convert()` iterates a dict with PyO3's
    `PyDict::iter()` and calls `repr()` on values it cannot convert,
    mid-iteration; a repr that changes the dict makes PyO3 panic
    ("dictionary changed size during iteration"): a
    `pyo3_runtime.PanicException`, which is no `Exception`."""
    entry: dict[str, Any] = dict(PG)
    entry["X"] = MutatesItsDict(entry)
    problems = _core.validate_settings({"default": entry}, None)
    assert problems == []


def test_a_list_whose_iterator_raises_does_not_hang() -> None:
    """`binding/value.rs` `convert()` reads a list (subclass) through its
    `__iter__` with `items.flatten()`, which skips errors: an iterator that
    raises on every `next` loops forever, holding the interpreter (no
    signal handler runs). In a child process, killed after 5 s."""
    code = """
import django
from django.conf import settings
settings.configure()
django.setup()
from dbha import _core
class Raises:
    def __iter__(self): return self
    def __next__(self): raise ValueError("no")
class Aliases(list):
    def __iter__(self): return Raises()
pg = {"ENGINE": "django.db.backends.postgresql", "HOST": "db"}
print(_core.validate_settings({"default": pg}, {"DATABASES": Aliases(["default"])}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=5, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail("validate_settings() hung on a list whose iterator raises")
    assert result.returncode == 0, result.stderr[-2000:]
