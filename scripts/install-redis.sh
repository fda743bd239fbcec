#!/usr/bin/env sh
# Installs redis-server (Debian's package) when it is missing; the storage tests start their
# own servers on loopback with it. Needs root or sudo on a machine without it.
set -eu
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "redis-server is missing and this user cannot install packages;" \
         "install Debian's redis-server package (apt-get install redis-server)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends redis-server >/dev/null 2>&1 || {
    $SUDO apt-get update -qq && $SUDO apt-get install -y --no-install-recommends redis-server
}
# Debian's package starts a system-wide server; the tests do not need it.
(command -v systemctl >/dev/null 2>&1 && $SUDO systemctl stop redis-server >/dev/null 2>&1) || true
command -v redis-server >/dev/null
