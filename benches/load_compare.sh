#!/usr/bin/env bash
# Load comparison: the same pgbench workloads against direct PostgreSQL (the limit), tenantgate
# and PgBouncer (the peer, when installed: Debian package `pgbouncer`), interleaved in one run,
# both poolers in transaction mode with the same pool size. Prints tps, mean latency and the
# ratios tenantgate/PgBouncer and tenantgate/direct. A benchmark, not a test: numbers on a shared
# 2-core machine move; compare ratios from one run.
#
#   bash benches/load_compare.sh            # defaults: 5 s per run, pool size 20, 3 repeats
#   DURATION=10 POOL_SIZE=20 CLIENTS="10 50 150" REPEATS=5 bash benches/load_compare.sh
#
# Each configuration runs REPEATS times, the three targets interleaved within each repeat
# (direct, tenantgate, PgBouncer, direct, ...), and the table shows the median tps and latency
# of each target (failed transactions summed over the repeats).
#   TENANTGATE_BIN=/tmp/tenantgate-before bash benches/load_compare.sh   # another build
#
# Everything runs on loopback and stops by itself; the working directory is removed at exit.
#
#   bash benches/load_compare.sh --many-tenants [OPTIONS]
#
# Many-tenants mode (issue 4): 10,000 tenants registered against 4 databases on one PostgreSQL
# with max_connections 100, tenantgate with a budget of 80; every tenant's first connect (cold),
# then a skewed load (80% of connects on 50 hot tenants). Reports ops/s, p50/p99 for cold and
# warm connects, peak backend connections and tenantgate's RSS with 10,000 pools known. OPTIONS
# go to examples/many_tenants.rs (--tenants, --budget, --workers, --duration, --mode, ...;
# see --help).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--many-tenants" ]; then
    shift
    cargo build --release --quiet --bins --examples
    exec target/release/examples/many_tenants --tenantgate target/release/tenantgate "$@"
fi

DURATION=${DURATION:-5}
REPEATS=${REPEATS:-3}
POOL_SIZE=${POOL_SIZE:-20}
CLIENTS=${CLIENTS:-"10 50 150"}
MODES=${MODES:-"simple extended prepared"}
TG_PORT=${TG_PORT:-6532}
PGB_PORT=${PGB_PORT:-6533}

# TENANTGATE_BIN=path runs another build (say, the commit before a change) without building.
if [ -n "${TENANTGATE_BIN:-}" ]; then
    BIN=$TENANTGATE_BIN
else
    cargo build --release --quiet
    BIN=target/release/tenantgate
fi
WORK=$(mktemp -d /tmp/tenantgate-load.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

bindir() {
    if command -v pgbench >/dev/null; then dirname "$(command -v pgbench)"; return; fi
    ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1
}
PGBENCH="$(bindir)/pgbench"

start_quickstart() {
    "$BIN" quickstart --dir "$WORK/tg" --listen "127.0.0.1:$TG_PORT" > "$WORK/qs.out" 2> "$WORK/qs.err" &
    QS_PID=$!
    for _ in $(seq 1 300); do
        grep -q "is ready" "$WORK/qs.out" 2>/dev/null && return 0
        kill -0 "$QS_PID" 2>/dev/null || { cat "$WORK/qs.err" >&2; exit 1; }
        sleep 0.2
    done
    echo "quickstart did not become ready" >&2; exit 1
}

# First run creates the private PostgreSQL, the registry and the demo tenants; then switch the
# config to transaction pooling and start again.
start_quickstart
kill -TERM "$QS_PID"; wait "$QS_PID" || true
sed -i "s/^pool_size = .*/pool_size = $POOL_SIZE\nmode = \"transaction\"\ncheckout_timeout_ms = 10000/" "$WORK/tg/tenantgate.toml"
start_quickstart
PIDS+=("$QS_PID")

TG_URI=$(grep '/acme$' "$WORK/qs.out")
PG_PORT=$(sed -n 's/^port = \([0-9]*\)$/\1/p' "$WORK/tg/tenantgate.toml" | head -1)
PG_PASSWORD=$(sed -n 's/^admin_password = "\(.*\)"$/\1/p' "$WORK/tg/tenantgate.toml")
DIRECT_URI="postgresql://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/tenant_acme"
"$PGBENCH" -i -s 10 -q "$TG_URI" > /dev/null 2>&1

PGB_URI=""
if command -v pgbouncer >/dev/null 2>&1; then
    mkdir -p "$WORK/pgb"
    cat > "$WORK/pgb/pgbouncer.ini" <<INI
[databases]
tenant_acme = host=127.0.0.1 port=$PG_PORT dbname=tenant_acme
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/pgb/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 2000
logfile = $WORK/pgb/pgbouncer.log
INI
    echo "\"postgres\" \"$PG_PASSWORD\"" > "$WORK/pgb/userlist.txt"
    chmod -R a+rX "$WORK/pgb"; chmod a+w "$WORK/pgb"
    if [ "$(id -u)" = 0 ]; then
        pgbouncer -u postgres "$WORK/pgb/pgbouncer.ini" > /dev/null 2>&1 &
    else
        pgbouncer "$WORK/pgb/pgbouncer.ini" > /dev/null 2>&1 &
    fi
    PIDS+=($!)
    sleep 1
    PGB_URI="postgresql://postgres:$PG_PASSWORD@127.0.0.1:$PGB_PORT/tenant_acme"
fi

# run URI ARGS... -> "tps latency_ms failed" (or "fail")
run() {
    local uri=$1; shift
    local out
    if ! out=$(timeout $((DURATION + 60)) "$PGBENCH" -n -T "$DURATION" "$@" "$uri" 2>&1); then
        echo "fail - -"; return
    fi
    local tps lat failed
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p; s/^tps = \([0-9.]*\) (including reconnection times)/\1/p' <<<"$out" | head -1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out" | head -1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out" | head -1)
    if [ -z "$tps" ]; then echo "fail - -"; else echo "$tps $lat ${failed:-0}"; fi
}

# medians: lines of "tps latency_ms failed" (or "fail - -") -> their median tps, median
# latency and summed failures; "fail - -" when every run failed.
medians() {
    awk '$1 != "fail" { n++; t[n] = $1; l[n] = $2; f += $3 }
        function med(a, n,   i, j, x) {
            for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j > 0 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        END { if (n == 0) print "fail - -"; else printf "%.1f %.3f %d\n", med(t, n), med(l, n), f }'
}

# compare NAME PGBENCH_ARGS...: REPEATS interleaved rounds over the targets, one report line.
compare() {
    local name=$1; shift
    local d="" t="" p="" r
    for r in $(seq 1 "$REPEATS"); do
        d+="$(run "$DIRECT_URI" "$@")"$'\n'
        t+="$(run "$TG_URI" "$@")"$'\n'
        if [ -n "$PGB_URI" ]; then p+="$(run "$PGB_URI" "$@")"$'\n'; fi
    done
    local pm="- - -"
    [ -n "$PGB_URI" ] && pm=$(printf '%s' "$p" | medians)
    report "$name" "$(printf '%s' "$d" | medians)" "$(printf '%s' "$t" | medians)" "$pm"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2f", a / b; else printf "-" }'; }

printf '%-28s %10s %8s %10s %8s %10s %8s %8s %8s\n' workload direct_tps ms tg_tps ms pgb_tps ms tg/pgb tg/direct
report() {
    local name=$1 d=$2 t=$3 p=$4
    read -r dt dl _ <<<"$d"; read -r tt tl tf <<<"$t"; read -r pt pl _ <<<"$p"
    [ "${tf:-0}" != "0" ] && [ "$tf" != "-" ] && tt="$tt(${tf}err)"
    printf '%-28s %10s %8s %10s %8s %10s %8s %8s %8s\n' "$name" "$dt" "$dl" "$tt" "$tl" "$pt" "$pl" \
        "$(ratio "${tt%%(*}" "$pt")" "$(ratio "${tt%%(*}" "$dt")"
}

for mode in $MODES; do
    for c in $CLIENTS; do
        compare "-S -M $mode -c $c" -S -M "$mode" -c "$c" -j 2
    done
done
compare "-S -C -c 10 (connect/tx)" -S -C -c 10 -j 2
echo "pool size $POOL_SIZE, $DURATION s per run, medians of $REPEATS interleaved repeats, pgbench scale 10; 'fail' = every run of pgbench exited with an error"
