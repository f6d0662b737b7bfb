#!/bin/sh
# Installs haproxy and nginx, for tests/test_contrib.py's `haproxy -c` and
# `nginx -t` (run by `make test`). Debian's packages take seconds. Done only
# where it is harmless and possible: as root, with apt-get, and with a
# policy-rc.d that keeps packages from starting their services (as in a
# container or CI image), so that no HAProxy or nginx daemon starts on a
# real host. Anywhere else it says why and does nothing: those two tests
# then skip, naming the missing binary. Never fails `make test`.
PATH=$PATH:/usr/sbin:/sbin
if command -v haproxy >/dev/null 2>&1 && command -v nginx >/dev/null 2>&1; then
    exit 0
fi
why=
if [ "$(id -u)" != 0 ]; then
    why="not root"
elif ! command -v apt-get >/dev/null 2>&1; then
    why="no apt-get"
elif [ ! -x /usr/sbin/policy-rc.d ]; then
    why="no /usr/sbin/policy-rc.d (the packages would start their daemons)"
fi
if [ -n "$why" ]; then
    echo "contrib/test-tools.sh: not installing haproxy and nginx: $why" >&2
    exit 0
fi
timeout 120 apt-get install -y -qq -o DPkg::Lock::Timeout=60 haproxy nginx >/dev/null \
    || echo "contrib/test-tools.sh: apt-get install haproxy nginx failed" >&2
exit 0
