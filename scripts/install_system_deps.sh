#!/usr/bin/env bash
# Installs the system programs ZeMosaic uses where it can (root with apt-get), and says what to
# install otherwise. Never fails the caller: without them the pipeline still runs on frames that
# already carry a WCS, and the tests that need them skip.
#
#   scripts/install_system_deps.sh          the plate solver: astrometry.net + Tycho-2 index files
#   scripts/install_system_deps.sh peers    also Siril, SWarp and Montage (benchmarks, peer checks)
#   scripts/install_system_deps.sh gui      also the libraries Qt's xcb platform loads (the window
#                                           on an X11 or XWayland desktop) and xvfb (its CI test)
# The words combine: `scripts/install_system_deps.sh peers gui`.
set -u

SOLVER_PACKAGES="astrometry.net astrometry-data-tycho2-07-littleendian astrometry-data-tycho2-08-littleendian astrometry-data-tycho2-09-littleendian astrometry-data-tycho2-10-19-littleendian"
PEER_PACKAGES="siril swarp montage"
# What PySide6's xcb plugin needs beyond a minimal Debian/Ubuntu: Qt names libxcb-cursor0 in its
# error, the others it needs as well; xvfb (with xauth) runs the window without a display.
GUI_PACKAGES="libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxkbcommon-x11-0 libegl1 libgl1 libfontconfig1 libdbus-1-3 xvfb xauth"

have_solver() {
    command -v solve-field >/dev/null 2>&1 && ls /usr/share/astrometry/index-*.fits >/dev/null 2>&1
}

have_peers() {
    # Debian's swarp package installs the program as SWarp.
    command -v siril-cli >/dev/null 2>&1 \
        && { command -v swarp >/dev/null 2>&1 || command -v SWarp >/dev/null 2>&1; } \
        && command -v mProject >/dev/null 2>&1
}

have_gui_libs() {
    command -v xvfb-run >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q libxcb-cursor.so.0 \
        && ldconfig -p 2>/dev/null | grep -q libxkbcommon-x11.so.0 && ldconfig -p 2>/dev/null | grep -q libxcb-icccm.so.4
}

wanted=""
have_solver || wanted="$SOLVER_PACKAGES"
for word in "$@"; do
    case "$word" in
        peers) have_peers || wanted="$wanted $PEER_PACKAGES" ;;
        gui) have_gui_libs || wanted="$wanted $GUI_PACKAGES" ;;
        *) echo "install_system_deps.sh: unknown word '$word' (peers, gui)" >&2 ;;
    esac
done
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
      The window (Qt's xcb platform) needs, on Debian/Ubuntu:
        sudo apt-get install $GUI_PACKAGES
EOF
exit 0
