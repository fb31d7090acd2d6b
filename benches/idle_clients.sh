#!/usr/bin/env bash
# Idle-client memory (issue 12): the RSS tenantgate spends per idle client connection, beside
# PgBouncer (Debian package `pgbouncer`), both in transaction mode with the same pool size on one
# private PostgreSQL. For each N and transport (plain, TLS), a fresh proxy process gets N clients
# that log in (SCRAM-SHA-256 with a 16-iteration verifier, so the clients' PBKDF2 does not
# dominate), run SELECT 1 and stay connected, idle; 2 s later (RSS after - RSS before) / N is
# what one idle client costs. Prints a table: proxy, transport, N, RSS before, RSS after, bytes
# per idle client, tenantgate/PgBouncer (and login time, errors). A benchmark, not a test.
#
#   bash benches/idle_clients.sh                            # N = 10000 100000, plain and TLS
#   CLIENTS="1000 10000" TRANSPORTS=plain bash benches/idle_clients.sh
#   TENANTGATE_BIN=/tmp/tenantgate-before bash benches/idle_clients.sh   # another build
#   bash benches/idle_clients.sh --concurrency 32 --idle-seconds 5   # options of
#                                                    # examples/idle_clients.rs (see --help)
#
# Each idle client is one open file in the client process and one in the proxy. The script
# raises `ulimit -n` as far as it can (the hard limit; past it only with CAP_SYS_RESOURCE) and
# prints it; an N that does not fit is replaced by the largest N that does, and the output says
# so. Client sockets are bound to 127.0.0.2..127.0.0.9, so one address's ephemeral ports do not
# cap N either.
#
# Everything runs on loopback and stops by itself; the working directory is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-"10000 100000"}
TRANSPORTS=${TRANSPORTS:-"plain tls"}
PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet --bins --examples
# TENANTGATE_BIN=path measures another build (say, the commit before a change).
BIN=${TENANTGATE_BIN:-$TARGET/release/tenantgate}

# Open files: N client sockets here, N in the proxy, plus some for everything else.
max=0
for n in $CLIENTS; do
    if [ "$n" -gt "$max" ]; then max=$n; fi
done
want=$((max + 1024))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
    if ulimit -Hn "$want" 2>/dev/null; then
        hard=$want
    else
        echo "note: the hard open-files limit is $hard and cannot be raised to $want here (needs CAP_SYS_RESOURCE)"
    fi
fi
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$want" ]; then
    if [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then ulimit -Sn "$want"; else ulimit -Sn "$hard"; fi
fi
echo "open files limit (ulimit -n): $(ulimit -Sn), hard $(ulimit -Hn); wanted $want for N=$max"

PROXIES=tenantgate,pgbouncer
if [ ! -x "$PGBOUNCER" ]; then
    echo "note: no PgBouncer at $PGBOUNCER (set PGBOUNCER=path): tenantgate only"
    PROXIES=tenantgate
fi

WORK=$(mktemp -d /tmp/tenantgate-idle.XXXXXX)
chmod 755 "$WORK"
trap 'rm -rf "$WORK"' EXIT

# Unquoted $CLIENTS and $TRANSPORTS on purpose: word splitting makes the comma lists.
# shellcheck disable=SC2086
"$TARGET/release/examples/idle_clients" \
    --tenantgate "$BIN" \
    --pgbouncer "$PGBOUNCER" \
    --proxies "$PROXIES" \
    --clients "$(echo $CLIENTS | tr ' ' ',')" \
    --transports "$(echo $TRANSPORTS | tr ' ' ',')" \
    --dir "$WORK/run" \
    "$@"
