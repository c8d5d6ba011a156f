#!/usr/bin/env bash
# The system packages the README's commands need: `scripts/system_packages.sh demo|test` checks
# them (scripts/setup_env.sh runs it before anything else). What is missing is installed with
# apt-get where we are root or have passwordless sudo; otherwise, or with PRORL_NO_SYSTEM_INSTALL=1,
# it exits 1 naming the one command to run. This is the only list of them: CI (.ci/run) gets them
# all through scripts/test.sh with PRORL_REQUIRE_SLURM=1.
set -euo pipefail
NEEDS="${1:-}"
PYTHON="${PYTHON:-python3}"

# needed by, Debian package, what shows that it is there (programs on PATH, paths, or a check below)
PACKAGES=(
    "demo  python3-venv  venv"                 # `python3 -m venv` (Debian ships ensurepip apart)
    "demo  ca-certificates /etc/ssl/certs/ca-certificates.crt"  # pip's TLS to PyPI where PIP_CERT names it
    "demo  python3-dev   Python.h"             # pip builds pycosat (reasoning-gym's) from source
    "demo  gcc           gcc"
    "demo  libc6-dev     /usr/include/stdio.h"
    "test  python3       /usr/bin/python3"     # the interpreter sandboxed model code runs on
    "test  bubblewrap    bwrap"                # the sandbox for model-written code
    "test  procps        ps"                   # the sandbox tests count its processes
    "slurm munge         munged"               # tests/slurm's single-node cluster
    "slurm slurm-wlm     slurmctld slurmd sbatch scontrol squeue sinfo"
)

case "$NEEDS" in
demo) groups="demo"; who="the demo needs" ;;
test) groups="demo test"; who="the tests need"
      [ "${PRORL_REQUIRE_SLURM:-0}" != 1 ] || groups+=" slurm" ;;  # otherwise tests/slurm skips
*) echo "usage: scripts/system_packages.sh demo|test" >&2; exit 2 ;;
esac

present() {
    case "$1" in
    venv) "$PYTHON" -c "import ensurepip, venv" ;;
    Python.h) "$PYTHON" -c "import os, sys, sysconfig
sys.exit(not os.path.isfile(os.path.join(sysconfig.get_path('include'), 'Python.h')))" ;;
    /*) [ -e "$1" ] ;;
    *) command -v "$1" ;;
    esac >/dev/null 2>&1
}

check() {  # sets $missing (packages) and $absent (what is not there) for $groups
    missing=() absent=()
    local row group package checks thing
    for row in "${PACKAGES[@]}"; do
        read -r group package checks <<<"$row"
        [[ " $groups " == *" $group "* ]] || continue
        for thing in $checks; do
            if ! present "$thing"; then
                case "$thing" in venv) thing="$PYTHON -m venv" ;; Python.h) thing="Python.h for $PYTHON" ;; esac
                absent+=("$thing")
                [[ " ${missing[*]} " == *" $package "* ]] || missing+=("$package")
            fi
        done
    done
}

check
[ "${#missing[@]}" -gt 0 ] || exit 0

if ! command -v apt-get >/dev/null; then
    printf -v list '%s, ' "${absent[@]}"
    echo "[setup] $who these, which are missing: ${list%, }." >&2
    echo "[setup] Install them with your system's package manager (Debian: ${missing[*]}), then run this again." >&2
    exit 1
fi
if [ "$EUID" = 0 ]; then sudo=(); else sudo=(sudo -n); fi
if [ "${PRORL_NO_SYSTEM_INSTALL:-0}" = 1 ] || { [ "$EUID" != 0 ] && ! sudo -n true 2>/dev/null; }; then
    echo "[setup] $who system packages that are not installed: ${missing[*]}. Install them, then run this again:" >&2
    echo "    ${sudo:+sudo }apt-get install -y ${missing[*]}" >&2
    exit 1
fi

echo "[setup] installing system packages: ${missing[*]} (apt-get${sudo:+ via sudo}; $who them)"
log="$(mktemp -t prorl-apt.XXXXXX)"
if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "[setup] apt-get install ${missing[*]} failed (log above)" >&2
    exit 1
fi
rm -f "$log"
check
if [ "${#missing[@]}" -gt 0 ]; then
    printf -v list '%s, ' "${absent[@]}"
    echo "[setup] still missing after apt-get install ${missing[*]}: ${list%, }" >&2
    exit 1
fi
