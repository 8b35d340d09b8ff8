#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo need when missing:
# PostgreSQL 15 server binaries and MariaDB. Needs root (or sudo).
set -euo pipefail

missing=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
command -v mariadb >/dev/null 2>&1 || missing+=(mariadb-client)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
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
