#!/usr/bin/env bash
# Installs the system programs ZeMosaic uses where it can (root with apt-get), and says what to
# install otherwise. Never fails the caller: without them the pipeline still runs on frames that
# already carry a WCS, and the tests that need them skip.
#
#   scripts/install_system_deps.sh          the plate solver: astrometry.net + Tycho-2 index files
#   scripts/install_system_deps.sh peers    also Siril, SWarp and Montage (benchmarks, peer checks)
set -u

SOLVER_PACKAGES="astrometry.net astrometry-data-tycho2-07-littleendian astrometry-data-tycho2-08-littleendian astrometry-data-tycho2-09-littleendian astrometry-data-tycho2-10-19-littleendian"
PEER_PACKAGES="siril swarp montage"

have_solver() {
    command -v solve-field >/dev/null 2>&1 && ls /usr/share/astrometry/index-*.fits >/dev/null 2>&1
}

have_peers() {
    # Debian's swarp package installs the program as SWarp.
    command -v siril-cli >/dev/null 2>&1 \
        && { command -v swarp >/dev/null 2>&1 || command -v SWarp >/dev/null 2>&1; } \
        && command -v mProject >/dev/null 2>&1
}

wanted=""
have_solver || wanted="$SOLVER_PACKAGES"
if [ "${1:-}" = "peers" ] && ! have_peers; then
    wanted="$wanted $PEER_PACKAGES"
fi
[ -z "${wanted// /}" ] && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing system packages:$wanted"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends $wanted >/dev/null; then
        exit 0
    fi
    echo "warning: apt-get could not install:$wanted" >&2
fi

cat >&2 <<EOF
note: the plate solver is not installed, so frames without a WCS (raw Seestar subs) are skipped
      and the solver tests skip. To install it:
        Debian/Ubuntu:  sudo apt-get install $SOLVER_PACKAGES
        macOS:          brew install astrometry-net, plus the Tycho-2 index files 4107-4119
        macOS/Windows:  or ASTAP with a star database, then set astap_executable_path
EOF
exit 0
