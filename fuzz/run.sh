#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20) and fails if one panics, crashes or
# hangs. Used by .ci/run as the proof that the targets start and hold; run it longer by hand
# for a campaign: `bash fuzz/run.sh 600`, or name targets: `bash fuzz/run.sh 600 scram_exchange`.
# Installs cargo-fuzz when it is missing. On a stable toolchain (CI has no nightly)
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its flags.
#
# No sanitizer by default: tenantgate forbids unsafe code, so AddressSanitizer would only watch
# the dependencies, and it makes the build a minute longer (3m47s against 2m38s on the CI
# machine). A campaign that wants it, and its leak checks: FUZZ_SANITIZER=address bash fuzz/run.sh 600
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-20}"
shift || true

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

sanitizer="${FUZZ_SANITIZER:-none}"
cargo fuzz build -O -s "$sanitizer"
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    # Seeds live in seeds/<target> (committed); new finds go to corpus/<target> (ignored).
    rm -rf "artifacts/$target"
    log="corpus/$target.log"
    if ! cargo fuzz run -O -s "$sanitizer" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -timeout=5 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz: $target failed; the input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^#[0-9]+.*(DONE|cov:)" "$log" | tail -3 || true
done
echo "fuzz: every target ran ${seconds}s without a crash"
