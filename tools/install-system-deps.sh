#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo need when missing:
# PostgreSQL 15 server binaries, MariaDB, what building mysqlclient (the
# MySQL driver of Django, for dbha.backends.mysql) takes, iproute2 and
# nftables for the network-fault tests (namespaces, tc netem, drop rules), and
# Patroni, etcd and HAProxy for the Patroni tests (tools/localpatroni.py).
# Needs root (or sudo).
set -euo pipefail

missing=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
command -v mariadb >/dev/null 2>&1 || missing+=(mariadb-client)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
# mysqlclient ships no Linux wheel: pip compiles it against libmariadb.
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists libmariadb 2>/dev/null || missing+=(libmariadb-dev)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
[ -x /usr/bin/patroni ] || missing+=(patroni)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
python3 -c 'import os, sysconfig; raise SystemExit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null || missing+=(python3-dev)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
    echo "Missing Debian packages: ${missing[*]}. Install them as root:" >&2
    echo "    apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "Installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
# The packages' own services are not wanted: tests start private servers.
echo exit 101 | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
"${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
"${sudo[@]}" rm -f /usr/sbin/policy-rc.d
