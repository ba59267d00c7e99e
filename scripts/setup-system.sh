#!/usr/bin/env bash
# Check for Python 3.11 and install Mosquitto and PostgreSQL with apt when they are missing.
set -euo pipefail

python=${PYTHON:-python3.11}
if ! command -v "$python" >/dev/null 2>&1 \
    || ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "make setup: $python (Python 3.11) not found or not runnable." >&2
    echo "  Install it (Debian/Ubuntu: apt-get install python3.11 python3.11-venv; or pyenv install 3.11)," >&2
    echo "  or point make at one: make setup PYTHON=/path/to/python3.11" >&2
    exit 1
fi

missing=()
if { ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; } \
    || ! command -v mosquitto_passwd >/dev/null 2>&1; then
    missing+=(mosquitto mosquitto-clients)
fi
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    missing+=(postgresql)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "make setup: missing system packages: ${missing[*]}" >&2
    echo "  Installing them needs root: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "make setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q || ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    echo "make setup: apt-get could not install ${missing[*]}; see the messages above" >&2
    exit 1
fi
