#!/usr/bin/env bash
# Load comparison (issue 12): tenantgate beside PgBouncer (the peer: Debian package `pgbouncer`)
# and direct PostgreSQL (the limit), in one run against one private PostgreSQL, both poolers in
# transaction mode with the same pool size per tenant and the same budget of backend
# connections in all. A benchmark, not a test: numbers on a shared 2-core machine move; compare
# ratios from one run.
#
#   bash benches/load_compare.sh                       # everything: 13 minutes on 2 cores
#   IDLE=0 MANY=0 bash benches/load_compare.sh         # only the pgbench table (section 3)
#   DURATION=10 CLIENTS="10 50" MODES=simple REPEATS=5 bash benches/load_compare.sh
#   TENANTGATE_BIN=/tmp/tenantgate-before bash benches/load_compare.sh   # another build
#
# Set-up. `tenantgate quickstart` starts a private PostgreSQL (max_connections 200) and
# tenantgate on it; its config is switched to transaction pooling, POOL_SIZE per tenant, a
# `[[server]] max_connections` of BUDGET and pool_idle_timeout_seconds 2 (see "Between runs"),
# and it is started again. For section 2, TENANTS databases tenant_t1..tenant_tN, each owned by
# a role of the same name whose SCRAM verifier has BACKEND_SCRAM_ITERATIONS iterations, are
# made in PostgreSQL and adopted with the admin console's REGISTER TENANT as tenants t1..tN.
# Every client of every target logs in as `bench` with SCRAM-SHA-256 and one verifier of
# SCRAM_ITERATIONS iterations (examples/scram_verifier.rs), so a login costs the proxy and
# PostgreSQL what it costs them and the client's PBKDF2 stays small: tenantgate has it in its
# registry (CREATE USER bench FOR TENANT ..., for acme and t1..tN), PgBouncer in its auth_file,
# PostgreSQL as role `bench` (a member of each tenant's role, so it reads the tenants' tables:
# direct runs, and PgBouncer's SCRAM pass-through, with which PgBouncer logs in to PostgreSQL
# as bench without any PBKDF2 of its own; tenantgate logs in as the tenant's role and runs the
# PBKDF2 of BACKEND_SCRAM_ITERATIONS rounds per backend connection). `pgbench -i` through
# tenantgate fills acme (scale SCALE) and each tN (scale TENANT_SCALE). PgBouncer serves the
# same databases under the same names (acme, t1..tN) from the same PostgreSQL, with
# default_pool_size POOL_SIZE and max_user_connections BUDGET (every pool is user bench's, so
# that caps the total as tenantgate's budget does).
#
# Between runs. Each proxy's budget fits in PostgreSQL's max_connections, both together do not:
# before every run, the proxy that is not measured gives its backends back. PgBouncer closes
# its idle servers on RECONNECT (admin console, admin_users = bench); tenantgate drops a pool
# and its backends 2 s after its last client left (a pool with clients connected is never
# dropped). The script waits until no backend is left in a tenant database (`quiesce`), so every
# run, of either proxy or direct, starts with cold pools.
#
# Sections (each prints its table as it ends; progress goes to stderr):
#   1. idle clients (IDLE=1): benches/idle_clients.sh's example with N = IDLE_CLIENTS plain
#      clients (its own PostgreSQL, a fresh proxy per measurement): RSS growth per idle client.
#   2. many tenants, long-lived (MANY=1): examples/long_lived.rs, WORKERS workers each holding
#      one connection per tenant (WORKERS x TENANTS clients, opened before the timed part), each
#      visit picks a tenant (each of DISTRIBUTIONS: uniform, zipf:S) and runs SELECT 1 + one
#      pgbench_accounts lookup by a random aid. WARMUP s of load, then MANY_DURATION s measured:
#      ops/s, p50/p99 of a visit, backend connects per second (growth of pg_stat_database.sessions
#      over the tenant databases: the same count for both proxies), peak backends in the tenant
#      databases (pg_stat_activity every 100 ms), the proxy's CPU seconds, errors. Direct
#      PostgreSQL is not a target here: 3,200 clients are past its max_connections.
#   3. one tenant, pgbench (SINGLE=1): `pgbench -S -M MODE -c C` for each of MODES and CLIENTS
#      on acme (DURATION s each), then the connect storm `pgbench -S -C -c STORM_CLIENTS` (a
#      connection, with its SCRAM login, per transaction): tps, mean latency, the proxy's CPU
#      seconds per run (utime + stime from /proc/PID/stat) and CPU µs per transaction.
# Every configuration runs REPEATS times, the targets interleaved within each repeat (direct,
# tenantgate, PgBouncer; section 2: tenantgate, PgBouncer), and the tables show medians (errors
# summed over the repeats), with the ratios tenantgate/PgBouncer and tenantgate/direct. Errors
# are counted and shown (`(Nerr)` beside a number), and the first message of each failing run
# is listed at the end.
#
# Knobs (environment):
#   DURATION=5           seconds per pgbench run (section 3)
#   REPEATS=3            repeats of every configuration (medians)
#   POOL_SIZE=20         backend connections per tenant pool (both proxies)
#   BUDGET=100           backend connections in all (tenantgate [[server]] max_connections,
#                        PgBouncer max_user_connections)
#   SCRAM_ITERATIONS=16  iterations of user bench's SCRAM-SHA-256 verifier
#   BACKEND_SCRAM_ITERATIONS=$SCRAM_ITERATIONS   iterations of the section 2 tenant roles'
#                        verifiers (4096 is PostgreSQL's own default)
#   IDLE=1               section 1 on (0: off); IDLE_CLIENTS=10000 idle clients per proxy
#   MANY=1               section 2 on (0: off)
#   TENANTS=50           tenants in section 2, each its own database
#   TENANT_SCALE=1       pgbench scale of each of them (100,000 accounts per unit)
#   WORKERS=64           section 2 workers (each holds one connection per tenant)
#   MANY_DURATION=10     seconds measured per section 2 run; WARMUP=2 seconds of load before
#   DISTRIBUTIONS="uniform zipf:1.1"   how section 2 visits pick their tenant
#   CONNECT_CONCURRENCY=32             logins in flight while section 2 opens its clients
#   SINGLE=1             section 3 on (0: off)
#   SCALE=10             pgbench scale of acme
#   CLIENTS="10 50 150"  pgbench clients; MODES="simple extended prepared" its -M modes
#   STORM_CLIENTS=10     clients of the connect storm (0: no storm row)
#   TG_PORT=6532 PGB_PORT=6533         listen ports of the proxies
#   TENANTGATE_BIN=path  measure that tenantgate binary instead of this tree's (examples are
#                        still built from this tree); PGBOUNCER=path (default: on PATH, or
#                        /usr/sbin/pgbouncer; without one, the PgBouncer columns are '-')
#   CARGO_TARGET_DIR     where the build goes (default: target)
#
# Open files: section 2 holds WORKERS x TENANTS sockets in the client and as many in each proxy,
# section 1 IDLE_CLIENTS; the script raises `ulimit -n` up to the hard limit (the proxies inherit
# it) and says so when that is not enough.
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
TARGET=${CARGO_TARGET_DIR:-target}
EXAMPLES=$TARGET/release/examples

if [ "${1:-}" = "--many-tenants" ]; then
    shift
    cargo build --release --quiet --bins --examples
    exec "$EXAMPLES/many_tenants" --tenantgate "$TARGET/release/tenantgate" "$@"
fi

DURATION=${DURATION:-5}
REPEATS=${REPEATS:-3}
POOL_SIZE=${POOL_SIZE:-20}
BUDGET=${BUDGET:-100}
SCRAM_ITERATIONS=${SCRAM_ITERATIONS:-16}
BACKEND_SCRAM_ITERATIONS=${BACKEND_SCRAM_ITERATIONS:-$SCRAM_ITERATIONS}
IDLE=${IDLE:-1}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
MANY=${MANY:-1}
TENANTS=${TENANTS:-50}
TENANT_SCALE=${TENANT_SCALE:-1}
WORKERS=${WORKERS:-64}
MANY_DURATION=${MANY_DURATION:-10}
WARMUP=${WARMUP:-2}
DISTRIBUTIONS=${DISTRIBUTIONS:-"uniform zipf:1.1"}
CONNECT_CONCURRENCY=${CONNECT_CONCURRENCY:-32}
SINGLE=${SINGLE:-1}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-"10 50 150"}
MODES=${MODES:-"simple extended prepared"}
STORM_CLIENTS=${STORM_CLIENTS:-10}
TG_PORT=${TG_PORT:-6532}
PGB_PORT=${PGB_PORT:-6533}
PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}

cargo build --release --quiet --bins --examples
# TENANTGATE_BIN=path runs another build (say, the commit before a change).
BIN=${TENANTGATE_BIN:-$TARGET/release/tenantgate}

say() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# Open files: the most sockets one process holds at once, plus a margin.
want=$((WORKERS * TENANTS))
[ "$IDLE" = 1 ] && [ "$IDLE_CLIENTS" -gt "$want" ] && want=$IDLE_CLIENTS
want=$((want + 1024))
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$want" ]; then
    hard=$(ulimit -Hn)
    if [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then ulimit -Sn "$want"; else ulimit -Sn "$hard"; fi
fi
say "open files limit (ulimit -n): $(ulimit -Sn), wanted $want"

WORK=$(mktemp -d /tmp/tenantgate-load.XXXXXX)
chmod 755 "$WORK"
: > "$WORK/errors.txt"
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
PSQL="$(bindir)/psql"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# 1. Idle clients: before the rest, in its own processes (its own PostgreSQL, fresh proxies).
if [ "$IDLE" = 1 ]; then
    say "section 1: $IDLE_CLIENTS idle clients per proxy"
    proxies=tenantgate
    [ -x "$PGBOUNCER" ] && proxies=tenantgate,pgbouncer
    idle_out=$("$EXAMPLES/idle_clients" --tenantgate "$BIN" --pgbouncer "$PGBOUNCER" \
        --proxies "$proxies" --clients "$IDLE_CLIENTS" --transports plain \
        --pool-size "$POOL_SIZE" --scram-iterations "$SCRAM_ITERATIONS" --dir "$WORK/idle" 2>&1) \
        || { echo "$idle_out"; echo "idle clients: failed" >&2; exit 1; }
    echo "== 1. idle clients: RSS growth per idle plaintext client (SCRAM $SCRAM_ITERATIONS iterations, transaction mode, pool $POOL_SIZE)"
    # The example's settings line, notes, table and error lines (its progress lines repeat the
    # table's rows).
    grep -v -E '^(tenantgate|pgbouncer) (plain|tls) N=|^$' <<<"$idle_out" || true
    echo
fi

# ---------------------------------------------------------------------------------------------
# Set-up shared by sections 2 and 3: one PostgreSQL, tenantgate, PgBouncer.
start_quickstart() {
    # Not truncated by the redirection below: that happens in the background job, maybe after
    # the first grep, which would then find the previous run's ready line.
    rm -f "$WORK/qs.out"
    "$BIN" quickstart --dir "$WORK/tg" --listen "127.0.0.1:$TG_PORT" > "$WORK/qs.out" 2> "$WORK/qs.err" &
    QS_PID=$!
    for _ in $(seq 1 300); do
        grep -q "is ready" "$WORK/qs.out" 2>/dev/null && return 0
        kill -0 "$QS_PID" 2>/dev/null || { cat "$WORK/qs.err" >&2; exit 1; }
        sleep 0.2
    done
    echo "quickstart did not become ready" >&2; exit 1
}

if [ "$MANY" = 1 ] || [ "$SINGLE" = 1 ]; then
    say "set-up: quickstart"
    # First run creates the private PostgreSQL, the registry and the demo tenants; then switch
    # the config to transaction pooling and the budget, and start again.
    start_quickstart
    kill -TERM "$QS_PID"; wait "$QS_PID" || true
    sed -i "s/^pool_size = .*/pool_size = $POOL_SIZE\nmode = \"transaction\"\ncheckout_timeout_ms = 10000/" "$WORK/tg/tenantgate.toml"
    sed -i "s/^shutdown_grace_seconds = .*/&\nmax_client_connections = $((WORKERS * TENANTS + 1000))/" "$WORK/tg/tenantgate.toml"
    # A tenant pool nobody is connected to is dropped, with its backends, 2 s after its last
    # use (default 1800 s; a pool with clients connected is never dropped), so that between
    # runs tenantgate gives its backends back (see quiesce).
    sed -i "s/^pool_size = .*/&\npool_idle_timeout_seconds = 2/" "$WORK/tg/tenantgate.toml"
    # [[server]] is the file's last table.
    echo "max_connections = $BUDGET" >> "$WORK/tg/tenantgate.toml"
    start_quickstart
    PIDS+=("$QS_PID")
    TG_PID=$QS_PID   # the quickstart serves clients in its own process (PostgreSQL is a child)

    ADMIN_URI=$(sed -n 's/^admin console: //p' "$WORK/qs.out")
    PG_PORT=$(sed -n 's/^port = \([0-9]*\)$/\1/p' "$WORK/tg/tenantgate.toml" | head -1)
    PG_PASSWORD=$(sed -n 's/^admin_password = "\(.*\)"$/\1/p' "$WORK/tg/tenantgate.toml")
    PG_URI="postgresql://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/postgres"
    BENCH_PASSWORD=bench-password
    VERIFIER=$("$EXAMPLES/scram_verifier" "$BENCH_PASSWORD" "$SCRAM_ITERATIONS")
    uri() { echo "postgresql://bench:$BENCH_PASSWORD@127.0.0.1:$1/$2"; }

    TENANT_SLUGS=()
    if [ "$MANY" = 1 ]; then
        for i in $(seq 1 "$TENANTS"); do TENANT_SLUGS+=("t$i"); done
    fi
    # The many tenants' databases and backend roles, made here rather than by CREATE TENANT so
    # that the roles' verifiers have BACKEND_SCRAM_ITERATIONS iterations: tenantgate logs in to
    # PostgreSQL as them (its client-side PBKDF2 per backend connect costs that many rounds),
    # PgBouncer as bench (SCRAM pass-through: no PBKDF2 in PgBouncer at all).
    if [ "${#TENANT_SLUGS[@]}" -gt 0 ]; then
        say "set-up: ${#TENANT_SLUGS[@]} databases and roles in PostgreSQL"
        BACKEND_PASSWORD=tenant-password
        backend_verifier=$("$EXAMPLES/scram_verifier" "$BACKEND_PASSWORD" "$BACKEND_SCRAM_ITERATIONS")
        for slug in "${TENANT_SLUGS[@]}"; do
            echo "CREATE ROLE tenant_$slug LOGIN PASSWORD '$backend_verifier';"
            echo "CREATE DATABASE tenant_$slug OWNER tenant_$slug;"
        done > "$WORK/databases.sql"
        "$PSQL" "$PG_URI" -X -q -v ON_ERROR_STOP=1 -f "$WORK/databases.sql" > "$WORK/databases.out" 2>&1 \
            || { cat "$WORK/databases.out" >&2; exit 1; }
    fi
    say "set-up: $((${#TENANT_SLUGS[@]} + 1)) tenants and their user bench (admin console)"
    {
        echo "CREATE USER bench FOR TENANT acme PASSWORD '$VERIFIER';"
        for slug in "${TENANT_SLUGS[@]}"; do
            echo "REGISTER TENANT $slug DATABASE 'tenant_$slug' ROLE 'tenant_$slug' PASSWORD '$BACKEND_PASSWORD';"
            echo "CREATE USER bench FOR TENANT $slug PASSWORD '$VERIFIER';"
        done
    } > "$WORK/tenants.sql"
    "$PSQL" "$ADMIN_URI" -X -q -v ON_ERROR_STOP=1 -f "$WORK/tenants.sql" > "$WORK/tenants.out" 2>&1 \
        || { cat "$WORK/tenants.out" >&2; exit 1; }

    # The same user in PostgreSQL, with the same verifier, a member of every tenant's role.
    roles=tenant_acme
    for slug in "${TENANT_SLUGS[@]}"; do roles+=",tenant_$slug"; done
    "$PSQL" "$PG_URI" -X -q -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE bench LOGIN PASSWORD '$VERIFIER'" -c "GRANT $roles TO bench" > /dev/null

    say "set-up: pgbench -i (acme scale $SCALE, ${#TENANT_SLUGS[@]} tenants scale $TENANT_SCALE) through tenantgate"
    "$PGBENCH" -i -s "$SCALE" -q "$(uri "$TG_PORT" acme)" > "$WORK/init.out" 2>&1 \
        || { cat "$WORK/init.out" >&2; exit 1; }
    if [ "${#TENANT_SLUGS[@]}" -gt 0 ]; then
        printf '%s\n' "${TENANT_SLUGS[@]}" \
            | xargs -P 2 -I{} sh -c "'$PGBENCH' -i -s $TENANT_SCALE -q '$(uri "$TG_PORT" {})' > '$WORK/init-{}.out' 2>&1 || { cat '$WORK/init-{}.out' >&2; exit 255; }"
    fi

    PGB_PID=""
    if [ -x "$PGBOUNCER" ]; then
        say "set-up: PgBouncer"
        mkdir -p "$WORK/pgb"
        {
            echo "[databases]"
            echo "acme = host=127.0.0.1 port=$PG_PORT dbname=tenant_acme"
            for slug in "${TENANT_SLUGS[@]}"; do
                echo "$slug = host=127.0.0.1 port=$PG_PORT dbname=tenant_$slug"
            done
            cat <<INI
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/pgb/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_user_connections = $BUDGET
max_client_conn = $((WORKERS * TENANTS + 1000))
admin_users = bench
log_connections = 0
log_disconnections = 0
logfile = $WORK/pgb/pgbouncer.log
INI
        } > "$WORK/pgb/pgbouncer.ini"
        echo "\"bench\" \"$VERIFIER\"" > "$WORK/pgb/userlist.txt"
        chmod -R a+rX "$WORK/pgb"; chmod a+w "$WORK/pgb"
        if [ "$(id -u)" = 0 ]; then
            # PgBouncer refuses to run as root; -u switches user in the same process.
            "$PGBOUNCER" -u postgres "$WORK/pgb/pgbouncer.ini" > /dev/null 2>&1 &
        else
            "$PGBOUNCER" "$WORK/pgb/pgbouncer.ini" > /dev/null 2>&1 &
        fi
        PGB_PID=$!
        PIDS+=("$PGB_PID")
        for _ in $(seq 1 50); do
            "$PSQL" "$(uri "$PGB_PORT" acme)" -X -qAt -c "SELECT 1" > /dev/null 2>&1 && break
            sleep 0.2
        done
        "$PSQL" "$(uri "$PGB_PORT" acme)" -X -qAt -c "SELECT 1" > /dev/null \
            || { echo "PgBouncer does not answer; its log:" >&2; cat "$WORK/pgb/pgbouncer.log" >&2; exit 1; }
    else
        say "no PgBouncer at $PGBOUNCER (set PGBOUNCER=path): its columns stay empty"
    fi
fi

# quiesce: before each run, the proxy that is not measured gives its backends back, so the one
# that is has PostgreSQL's max_connections as its headroom (each proxy's budget alone fits in
# it, both together do not): PgBouncer closes its idle servers on RECONNECT (admin console),
# tenantgate drops a pool 2 s after its last client left (pool_idle_timeout_seconds above; SHOW
# POOLS makes it look). Waits until no backend is left in a tenant database (at most 20 s).
quiesce() {
    local n=""
    for _ in $(seq 1 100); do
        n=$("$PSQL" "$PG_URI" -X -qAt -c "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'tenant\_%'")
        [ "$n" = 0 ] && return 0
        if [ -n "$PGB_PID" ]; then
            "$PSQL" "postgresql://bench:$BENCH_PASSWORD@127.0.0.1:$PGB_PORT/pgbouncer" -X -q -c RECONNECT > /dev/null 2>&1 || true
        fi
        "$PSQL" "$ADMIN_URI" -X -q -c "SHOW POOLS" > /dev/null 2>&1 || true
        sleep 0.2
    done
    say "warning: $n backends still open in tenant databases before the next run"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2f", a / b; else printf "-" }'; }

# medians: lines of numbers (or "-"), one run per line; "fail" as the first field is a run
# that failed. -> the median of each column over the runs that did not fail ("-" where none
# has a number), except column SUM (1-based), which is summed over all runs. "fail" alone when
# every run failed.
medians() {
    awk -v sum="$1" '
        function med(col,   n, i, j, x, a) {
            n = 0
            for (i = 1; i <= rows; i++) if (v[i, col] != "-" && v[i, col] != "") a[++n] = v[i, col] + 0
            if (n == 0) return "-"
            for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j > 0 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        $1 == "fail" { failed++; s += $sum; next }
        { rows++; if (NF > cols) cols = NF; for (c = 1; c <= NF; c++) v[rows, c] = $c; s += $sum }
        END {
            if (rows == 0) { print "fail"; exit }
            out = ""
            for (c = 1; c <= cols; c++) out = out (c > 1 ? " " : "") (c == sum ? s : med(c))
            print out
        }'
}

# fmt VALUE PRINTF_FORMAT: a number formatted; anything else ("-", "fail") as it is.
fmt() {
    if [[ "$1" =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; then awk -v v="$1" -v f="$2" 'BEGIN { printf f, v }'; else echo "${1:--}"; fi
}

# ---------------------------------------------------------------------------------------------
# 2. Many tenants, long-lived connections.
if [ "$MANY" = 1 ]; then
    tg_uris=() pgb_uris=() dbs=""
    for slug in "${TENANT_SLUGS[@]}"; do
        tg_uris+=("$(uri "$TG_PORT" "$slug")")
        pgb_uris+=("$(uri "$PGB_PORT" "$slug")")
        dbs+="${dbs:+,}tenant_$slug"
    done

    # many_run LABEL PID DISTRIBUTION URI... -> "ops_per_s p50_ms p99_ms conn_per_s peak cpu_s errors"
    many_run() {
        local label=$1 pid=$2 dist=$3; shift 3
        local out line
        quiesce
        out=$("$EXAMPLES/long_lived" --workers "$WORKERS" --duration "$MANY_DURATION" \
            --warmup "$WARMUP" --distribution "$dist" --connect-concurrency "$CONNECT_CONCURRENCY" \
            --accounts $((TENANT_SCALE * 100000)) --pid "$pid" \
            --stats-uri "$PG_URI" --stats-databases "$dbs" "$@" 2>&1) || true
        line=$(grep '^long_lived ' <<<"$out" || true)
        if [ -z "$line" ]; then
            echo "$label long-lived $dist: $(tail -1 <<<"$out")" >> "$WORK/errors.txt"
            echo "fail - - - - - 0"; return
        fi
        grep '^first' <<<"$out" | sed "s/^/$label long-lived $dist: /" >> "$WORK/errors.txt" || true
        kv() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
        echo "$(kv ops_per_s) $(kv p50_ms) $(kv p99_ms) $(kv backend_connects_per_s) $(kv peak_backends) $(kv proxy_cpu_s) $(( $(kv errors) + $(kv connect_errors) ))"
        say "  $label $dist: $line"
    }

    echo "== 2. many tenants, long-lived: $TENANTS tenants (own database each, pgbench scale $TENANT_SCALE), $WORKERS workers x $TENANTS = $((WORKERS * TENANTS)) clients; visit = SELECT 1 + pgbench_accounts by aid"
    printf '%-24s %9s %7s %7s %7s %5s %6s  %9s %7s %7s %7s %5s %6s  %7s\n' \
        distribution tg_ops/s p50_ms p99_ms conn/s peak cpu_s pgb_ops/s p50_ms p99_ms conn/s peak cpu_s tg/pgb
    for dist in $DISTRIBUTIONS; do
        t="" p=""
        for r in $(seq 1 "$REPEATS"); do
            say "section 2: $dist, repeat $r/$REPEATS"
            t+="$(many_run tenantgate "$TG_PID" "$dist" "${tg_uris[@]}")"$'\n'
            if [ -n "$PGB_PID" ]; then
                p+="$(many_run pgbouncer "$PGB_PID" "$dist" "${pgb_uris[@]}")"$'\n'
            fi
        done
        read -r to tp50 tp99 tc tpk tcpu terr <<<"$(printf '%s' "$t" | medians 7)"
        po="-" pp50="-" pp99="-" pc="-" ppk="-" pcpu="-" perr=0
        [ -n "$PGB_PID" ] && read -r po pp50 pp99 pc ppk pcpu perr <<<"$(printf '%s' "$p" | medians 7)"
        tos=$(fmt "$to" %.0f); [ "${terr:-0}" != 0 ] && tos="$tos(${terr}err)"
        pos=$(fmt "$po" %.0f); [ "${perr:-0}" != 0 ] && pos="$pos(${perr}err)"
        printf '%-24s %9s %7s %7s %7s %5s %6s  %9s %7s %7s %7s %5s %6s  %7s\n' "$dist" \
            "$tos" "$(fmt "$tp50" %.2f)" "$(fmt "$tp99" %.2f)" "$(fmt "$tc" %.1f)" "$(fmt "$tpk" %.0f)" "$(fmt "$tcpu" %.2f)" \
            "$pos" "$(fmt "$pp50" %.2f)" "$(fmt "$pp99" %.2f)" "$(fmt "$pc" %.1f)" "$(fmt "$ppk" %.0f)" "$(fmt "$pcpu" %.2f)" \
            "$(ratio "$to" "$po")"
    done
    echo "($MANY_DURATION s measured after $WARMUP s of warm-up, medians of $REPEATS interleaved repeats; conn/s = backend connects/s from pg_stat_database.sessions; peak = most backends in the tenant databases, budget $BUDGET; cpu_s = proxy CPU in the measured part)"
    echo
fi

# ---------------------------------------------------------------------------------------------
# 3. One tenant, pgbench.

# cpu_ticks PID: utime + stime of the process ("-" for no process). Fields 14 and 15 of
# /proc/PID/stat, counted after the command name, which is in parentheses and may hold spaces.
cpu_ticks() {
    if [ "$1" = - ]; then echo -; return; fi
    sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# run LABEL URI PID PGBENCH_ARGS... -> "tps latency_ms failed cpu_s cpu_us_per_tx" (or "fail ...")
run() {
    local label=$1 uri=$2 pid=$3; shift 3
    local out before after
    quiesce
    before=$(cpu_ticks "$pid")
    if ! out=$(timeout $((DURATION + 60)) "$PGBENCH" -n -T "$DURATION" "$@" "$uri" 2>&1); then
        echo "$label pgbench $*: $(grep -m1 -iE 'error|fatal' <<<"$out" || tail -1 <<<"$out")" >> "$WORK/errors.txt"
        echo "fail - 0 - -"; return
    fi
    after=$(cpu_ticks "$pid")
    local tps lat failed txs
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p; s/^tps = \([0-9.]*\) (including reconnection times)/\1/p' <<<"$out" | head -1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out" | head -1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out" | head -1)
    txs=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out" | head -1)
    if [ -z "$tps" ]; then echo "fail - ${failed:-0} - -"; return; fi
    if [ "${failed:-0}" != 0 ]; then
        echo "$label pgbench $*: ${failed} failed transactions: $(grep -m1 -iE 'error' <<<"$out" || true)" >> "$WORK/errors.txt"
    fi
    awk -v tps="$tps" -v lat="$lat" -v f="${failed:-0}" -v b="$before" -v a="$after" -v n="${txs:-0}" -v hz="$CLK_TCK" \
        'BEGIN { if (b == "-") { print tps, lat, f, "-", "-"; exit }
                 cpu = (a - b) / hz
                 printf "%s %s %d %.2f %s\n", tps, lat, f, cpu, (n > 0 ? sprintf("%.1f", cpu * 1e6 / n) : "-") }'
}

# compare NAME PGBENCH_ARGS...: REPEATS interleaved rounds over the targets, one report line.
compare() {
    local name=$1; shift
    local d="" t="" p="" r
    for r in $(seq 1 "$REPEATS"); do
        say "section 3: $name, repeat $r/$REPEATS"
        d+="$(run direct "$DIRECT_URI" - "$@")"$'\n'
        t+="$(run tenantgate "$TG_URI" "$TG_PID" "$@")"$'\n'
        if [ -n "$PGB_PID" ]; then p+="$(run pgbouncer "$PGB_URI" "$PGB_PID" "$@")"$'\n'; fi
    done
    local pm="- - 0 - -"
    [ -n "$PGB_PID" ] && pm=$(printf '%s' "$p" | medians 3)
    report "$name" "$(printf '%s' "$d" | medians 3)" "$(printf '%s' "$t" | medians 3)" "$pm"
}

report() {
    local name=$1 d=$2 t=$3 p=$4
    local dt dl df tt tl tf tc tu pt pl pf pc pu
    read -r dt dl df _ _ <<<"$d"; read -r tt tl tf tc tu <<<"$t"; read -r pt pl pf pc pu <<<"$p"
    local dts tts pts
    dts=$(fmt "$dt" %.1f); tts=$(fmt "$tt" %.1f); pts=$(fmt "$pt" %.1f)
    [ "$dt" = fail ] && dts=fail; [ "$tt" = fail ] && tts=fail; [ "$pt" = fail ] && pts=fail
    [ "${df:-0}" != 0 ] && [ "$df" != - ] && dts="$dts(${df}err)"
    [ "${tf:-0}" != 0 ] && [ "$tf" != - ] && tts="$tts(${tf}err)"
    [ "${pf:-0}" != 0 ] && [ "$pf" != - ] && pts="$pts(${pf}err)"
    printf '%-28s %10s %7s  %10s %7s %6s %7s  %10s %7s %6s %7s  %6s %9s\n' "$name" \
        "$dts" "$(fmt "$dl" %.3f)" "$tts" "$(fmt "$tl" %.3f)" "$(fmt "$tc" %.2f)" "$(fmt "$tu" %.1f)" \
        "$pts" "$(fmt "$pl" %.3f)" "$(fmt "$pc" %.2f)" "$(fmt "$pu" %.1f)" \
        "$(ratio "$tt" "$pt")" "$(ratio "$tt" "$dt")"
}

if [ "$SINGLE" = 1 ]; then
    DIRECT_URI=$(uri "$PG_PORT" tenant_acme)
    TG_URI=$(uri "$TG_PORT" acme)
    PGB_URI=$(uri "$PGB_PORT" acme)
    echo "== 3. one tenant (acme, pgbench scale $SCALE), pgbench -S, $DURATION s per run; cpu = proxy CPU s per run, us/tx = proxy CPU µs per transaction"
    printf '%-28s %10s %7s  %10s %7s %6s %7s  %10s %7s %6s %7s  %6s %9s\n' workload \
        direct_tps ms tg_tps ms tg_cpu us/tx pgb_tps ms pgb_cpu us/tx tg/pgb tg/direct
    for mode in $MODES; do
        for c in $CLIENTS; do
            compare "-S -M $mode -c $c" -S -M "$mode" -c "$c" -j 2
        done
    done
    if [ "$STORM_CLIENTS" -gt 0 ]; then
        compare "-S -C -c $STORM_CLIENTS (connect/tx)" -S -C -c "$STORM_CLIENTS" -j 2
    fi
    echo "(medians of $REPEATS interleaved repeats; 'fail' = every run of pgbench exited with an error; connect/tx = a SCRAM login ($SCRAM_ITERATIONS iterations) per transaction)"
    echo
fi

echo "settings: transaction pooling, pool size $POOL_SIZE per tenant, budget $BUDGET backend connections (tenantgate [[server]] max_connections, PgBouncer max_user_connections), PostgreSQL max_connections 200, $(nproc) cores, $("$PGBOUNCER" --version 2>/dev/null | head -1 || echo 'no PgBouncer')"
if [ -s "$WORK/errors.txt" ]; then
    echo "errors (first message of each failing run):"
    sed 's/^/  /' "$WORK/errors.txt"
else
    echo "errors: none"
fi
