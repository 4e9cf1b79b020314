#!/usr/bin/env bash
# The advisories half of `make audit` (docs/security.md, "Dependency audit"): Cargo.lock against
# the RustSec advisory database, failing on any vulnerability. The database is a git repository
# on GitHub; it is taken, in this order, from
#   1. GitHub, fetched now (at most ADVISORY_FETCH_TIMEOUT seconds, 60 by default);
#   2. an offline copy: ADVISORY_DB, a git clone of https://github.com/rustsec/advisory-db;
#   3. an earlier online fetch still in .tools/advisory-dbs;
# and when there is none of them, a notice says the advisories were NOT checked and the script
# exits 0, so `make test` still runs where GitHub cannot be reached. cargo-deny itself refuses a
# database last updated more than 90 days ago (deny.toml, maximum-db-staleness).
#
# Environment: DENY (the cargo-deny binary), ADVISORY_DB, ADVISORY_DB_EXPLICIT (1: ADVISORY_DB was
# given by the caller, so a missing copy is an error rather than a notice), ADVISORY_FETCH_TIMEOUT.
set -euo pipefail
cd "$(dirname "$0")/.."

deny=${DENY:?DENY must name the cargo-deny binary}
copy=${ADVISORY_DB:-}
fetch_timeout=${ADVISORY_FETCH_TIMEOUT:-60}
# Where cargo-deny looks for the RustSec database: deny.toml's db-path, then a directory named
# after the URL in db-urls (its last path segment and a hash of it, fixed by cargo-deny).
db_dir=.tools/advisory-dbs/advisory-db-3157b0e258782691

check() {
    # --offline: no second fetch; cargo-deny reads the database at db_dir as it is.
    "$deny" --offline --locked check --hide-inclusion-graph advisories
}

describe() {
    git -C "$1" log -1 --format='commit %h of %cs' 2>/dev/null || echo "no commit"
}

mkdir -p "$(dirname "$db_dir")"
# A link left by an earlier run to an offline copy: never fetch into someone's copy through it.
if [ -L "$db_dir" ]; then
    rm "$db_dir"
fi

# 1. Online.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if GIT_TERMINAL_PROMPT=0 timeout -k 5 "$fetch_timeout" "$deny" fetch db 2>"$log"; then
    echo "advisories: RustSec database fetched from GitHub ($(describe "$db_dir"))"
    check
    exit
fi
reason=$(grep -m1 'fatal:' "$log" || grep -m1 -i 'error' "$log" || tail -n1 "$log" || true)
if [ -z "$reason" ]; then
    reason="no answer within ${fetch_timeout}s"
fi
echo "advisories: the RustSec database could not be fetched from GitHub: $reason"

# 2. The offline copy.
if [ -n "$copy" ] && [ -e "$copy" ]; then
    if [ ! -d "$copy/crates" ] || [ ! -e "$copy/.git" ]; then
        echo "error: ADVISORY_DB=$copy is not a git clone of https://github.com/rustsec/advisory-db" >&2
        echo "       (cargo-deny reads its crates/ directory and its last commit's date)" >&2
        exit 1
    fi
    copy=$(cd "$copy" && pwd -P)
    rm -rf "$db_dir"
    ln -s "$copy" "$db_dir"
    echo "advisories: using the offline copy $copy ($(describe "$copy"))"
    check
    exit
fi

if [ -n "$copy" ] && [ "${ADVISORY_DB_EXPLICIT:-0}" = 1 ]; then
    echo "error: ADVISORY_DB=$copy does not exist" >&2
    exit 1
fi

# 3. An earlier online fetch.
if [ -d "$db_dir/crates" ]; then
    echo "advisories: using the copy fetched earlier into $db_dir ($(describe "$db_dir"))"
    check
    exit
fi

cat <<EOF

###############################################################################################
#  ADVISORIES NOT CHECKED.
#
#  The RustSec advisory database could not be fetched from GitHub, and there is no offline
#  copy at ADVISORY_DB=${copy:-<unset>}.
#  Licenses, bans and sources were checked; known vulnerabilities in Cargo.lock were NOT.
#
#  To check them, on a machine that can reach GitHub:
#      git clone https://github.com/rustsec/advisory-db <path>
#  copy <path> here (keep its .git: cargo-deny reads the last commit's date and refuses a
#  database more than 90 days old), then run
#      make test ADVISORY_DB=<path>        (or make audit ADVISORY_DB=<path>)
#  or put it at a default location: ../shared/advisory-db beside the checkout (CI sees it
#  too), or ~/.cache/tripwire/advisory-db (\$TRIPWIRE_CACHE/advisory-db).
###############################################################################################

EOF
