#!/usr/bin/env bash
# SMTP MX throughput with the trust checks (SPF, DKIM, DMARC) on against
# off, back to back: a private DNS server (trust_dns.py) answers for the
# sending domain, every message is DKIM-signed (RSA 2048) by smtp_load.py
# before its run, and the daemon checks mail from loopback
# ([limits] trusted_networks = []).
#
#   bench/trust_bench.sh [MESSAGES] [ROUNDS]      # defaults 5000 and 3
#
# ALGORITHM=ed25519-sha256 signs with ed25519 instead of RSA 2048, and
# ALGORITHM=none sends unsigned mail (SPF and DMARC only);
# CHECKS="true" runs only the checked daemon.
#
# Run from the repository root with maild's virtual environment active
# (or PYTHON=/path/to/python).  Prints one line per run.
set -euo pipefail
MESSAGES=${1:-5000}
ROUNDS=${2:-3}
PYTHON=$(command -v "${PYTHON:-python}")
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

REPORT='import json, sys
r = json.load(sys.stdin)
print("%8.0f msg/s  accepted %d  p50 %.1f ms  p99 %.1f ms" % (r["messages_per_second"], r["accepted"], r["latency_ms"]["p50"], r["latency_ms"]["p99"]))'

cputicks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

freeport() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

dnsport=$(freeport)
ALGORITHM=${ALGORITHM:-rsa-sha256}
"$PYTHON" bench/trust_dns.py --port "$dnsport" --domain bench.test --key-out "$work/dkim.key" \
    --algorithm "${ALGORITHM/none/rsa-sha256}" >"$work/dns.log" 2>&1 &
sleep 1

signing="--dkim-key $work/dkim.key --dkim-algorithm $ALGORITHM"
if [ "$ALGORITHM" = none ]; then signing=""; fi

run() {  # run CHECKS(true|false) LABEL
    local checks=$1 data="$work/data-$2" port
    port=$(freeport)
    rm -rf "$data"; mkdir -p "$data"
    echo secret | "$PYTHON" -m maild.cli --data-dir "$data" user add alice@localhost --password-stdin >/dev/null
    cat >"$work/maild.toml" <<TOML
data_dir = "$data"
hostname = "mx.bench.local"
[listen]
smtp = "tcp:$port:interface=127.0.0.1"
submission = "none"
smtps = "none"
pop3 = "none"
pop3s = "none"
imap = "none"
imaps = "none"
http = "none"
https = "none"
[dns]
nameservers = ["127.0.0.1:$dnsport"]
[limits]
trusted_networks = []
[mx]
checks = $checks
TOML
    PYTHONPATH=. "$(dirname "$PYTHON")/twistd" -n --pidfile= --logfile="$work/maild-$2.log" ${TWISTD_OPTIONS:-} \
        maild --config "$work/maild.toml" &
    local pid=$!
    for _ in $(seq 50); do
        "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
        sleep 0.2
    done
    sync; sleep 2
    printf '%-11s ' "checks=$checks"
    local before; before=$(cputicks "$pid")
    "$PYTHON" bench/smtp_load.py --server "127.0.0.1:$port" --messages "$MESSAGES" --concurrency 50 \
        --bind 127.0.0.1,127.0.0.2 --from bench@bench.test --to alice@localhost \
        $signing --json \
        | "$PYTHON" -c "$REPORT" \
        || true
    # The daemon's CPU per message: steadier than the rate on a shared machine.
    echo "    daemon CPU per message: $(( ($(cputicks "$pid") - before) * 1000000 / $(getconf CLK_TCK) / MESSAGES )) µs"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "    tracebacks in the log: $(grep -c Traceback "$work/maild-$2.log" || true)"
    grep -m1 -o 'spf=[^ ]* dkim=[^ ]* dmarc=[^ ]*' "$work/maild-$2.log" | sed 's/^/    /' || true
}

for round in $(seq "$ROUNDS"); do
    for checks in ${CHECKS:-true false}; do
        run "$checks" "$checks$round"
    done
done
