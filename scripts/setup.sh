#!/usr/bin/env bash
# Installs what zdd-agent's demo and tests need on a Debian machine, as root:
# Debian packages (only those missing) and a virtualenv in .venv with the
# project installed in editable mode. Idempotent; sourced by ../run-demo and
# ../run-tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "zdd-agent: the demo and the end-to-end tests boot a sandboxed systemd: run as root" >&2
    exit 1
fi

# pystemd compiles against libsystemd; wrk and curl are the load and probe
# clients (node runs the HTTP/2 client: Node's http2); util-linux has unshare/nsenter;
# iproute2 has ss (census benchmark) and ip; the fleet test reaches its simulated
# hosts with ssh (openssh-server runs inside each sandbox), balances them with
# haproxy, and Ansible's apt module there needs python3-apt; nginx proxies to a
# service's Unix-socket listener in the e2e of `listen: ["unix:..."]`.
# nftables and python3-nftables (libnftables JSON) carry socket: nat.
# The Debian package (scripts/build-deb, tests/debpkg.py) builds with debhelper,
# dh-python, pybuild-plugin-pyproject and help2man, is checked by lintian, and
# its runtime dependencies (debian/control's Depends and Recommends) are
# installed here too, so the package and the fleet's hosts install from apt
# without the network.
packages=(systemd libsystemd-dev pkg-config gcc python3-dev python3-venv wrk curl iproute2 nodejs
          util-linux openssh-server openssh-client haproxy python3-apt nginx nftables
          python3-nftables
          debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
          help2man lintian dpkg-dev
          python3-click python3-prometheus-client python3-psutil python3-pyroute2
          python3-pystemd python3-rich python3-yaml python3-grpcio python3-h2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq
    # Without systemd as PID 1, Debian's maintainer scripts would start sshd,
    # haproxy and nginx on this machine: a policy-rc.d that refuses (exit 101) keeps
    # them stopped; it is removed again unless it was there before.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import agent, pystemd, pyroute2, pytest" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
    touch .venv/.installed
fi
