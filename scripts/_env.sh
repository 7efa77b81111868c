# Shared by demo.sh and test.sh: make a virtual environment with mbx built in it.
# Installs what a fresh Debian 12 machine lacks (when run as root) and the Python
# packages from PyPI.  Re-running is cheap: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "note: not root, cannot install Debian packages: ${missing[*]}" >&2
        return 0
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    apt_install python3 python3-venv python3-dev
fi
"$PYTHON" - <<'PY' || { echo "mbx needs Python >= 3.11" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 11))
PY
command -v cc >/dev/null 2>&1 || apt_install build-essential
# OpenSSL's libcrypto (SHA-256 for `mbx flows`), found by meson through pkg-config;
# DPDK (optional for mbx, built when found): headers and pkg-config file for the
# build, the PMD plugins (net_pcap, net_ring, ...) for the DPDK port at run time.
apt_install pkg-config libssl-dev libdpdk-dev dpdk
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || apt_install python3-venv

VENV=${MBX_VENV:-.venv}
# A venv whose creation was interrupted has a python but no pip: make it again.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m venv --clear "$VENV"
fi
PY="$VENV/bin/python"
# The build requirements first: the editable install rebuilds the Cython extensions
# on import, so meson, ninja and Cython must stay installed (no build isolation).
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "meson-python>=0.15" "meson>=1.1" ninja "Cython>=3.0.8" "numpy>=1.24"
