#!/bin/sh
# Runs inside a virtme-ng guest (see guest.rs): `sh guest.sh OUT`, where OUT
# is the host directory shared read-write with the guest. It reads OUT/plan.tsv
# and leaves there what the host turns into the matrix:
#   uname             the guest's kernel release
#   check.json        `netlens check --json` (check.txt: the plain table, for
#                     a netlens without --json)
#   check.verbose     `netlens check --verbose`, with the verifier's log,
#                     where the kernel rejected a program
#   steps.tsv         one line per step: name, exit status, seconds
#   tests.log         the output of every test binary
#   STEP.err          each smoke run's stderr (trace, top, daemon)
#   finished          written last: the guest got to the end
# Every step is bounded (timeout), and a failed step does not stop the rest:
# one run shows everything that is wrong on this kernel.
set -u
out=$1
tab=$(printf '\t')
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# virtme-ng finds its script ports (stdout, stderr, exit status) through udev
# links; without udev it falls back to the console, which the host does not
# read. Make the links, then send everything to the ports.
mkdir -p /dev/virtio-ports
for port in /sys/class/virtio-ports/*; do
    [ -r "$port/name" ] && ln -sf "/dev/${port##*/}" "/dev/virtio-ports/$(cat "$port/name")"
done
if [ -e /dev/virtio-ports/virtme.stdout ]; then
    exec >/dev/virtio-ports/virtme.stdout 2>/dev/virtio-ports/virtme.stderr
fi

# What netlens and the tests expect to find mounted and writable.
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /run/netns /var/run
# Modules the tests use; the kernel would load most on demand.
for module in nf_tables tcp_bbr sch_netem veth; do modprobe -q "$module" 2>/dev/null; done

netlens=
check_limit=120
smoke_limit=60
test_limit=480
set --
while IFS="$tab" read -r kind a b c; do
    case $kind in
        netlens) netlens=$a ;;
        limit) eval "${a}_limit=\$b" ;;
        arg) set -- "$@" "$a" ;;
        env) export "$a=$b" ;;
    esac
done <"$out/plan.tsv"

# Run netlens and the test binaries from guest RAM, not from the 9p share:
# a page fault on a 9p-backed executable waits on the host's 9p server,
# and under TCG that wait has no bound the tests can see.
bin=/run/netlens-guest
mkdir -p "$bin" && { mountpoint -q "$bin" || mount -t tmpfs -o size=512m tmpfs "$bin"; }
in_ram() { # path: a copy in guest RAM, or the path itself when that fails
    copy="$bin/$(basename "$1")"
    if cp "$1" "$copy" 2>/dev/null; then echo "$copy"; else echo "$1"; fi
}
[ -n "$netlens" ] && netlens=$(in_ram "$netlens")

# What the guest is doing: the kernel's last messages first (an RCU stall
# or a soft lockup names the CPU and the code that holds everyone else up;
# a process stuck in synchronize_rcu only waits), then every user thread
# (pid tid comm state wchan) and every kernel thread that is running or in
# uninterruptible sleep, with the kernel stack of those that are not
# asleep. Printed just before a test binary is killed at its limit, so a
# hang leaves its cause behind. A task's files can block while it exits:
# threads whose stat is gone are skipped, stacks are read under timeout.
dump_processes() {
    echo "guest: the kernel's last messages:"
    dmesg 2>/dev/null | tail -n 60 | sed 's/^/  /'
    echo "guest: threads (pid tid comm state wchan; kernel stack unless sleeping):"
    for task in /proc/[0-9]*/task/[0-9]*; do
        pid=${task%/task/*}; pid=${pid#/proc/}
        # stat after the ")" that ends comm: state ppid ...
        stat=$(sed 's/.*) //' "$task/stat" 2>/dev/null)
        [ -n "$stat" ] || continue
        set -- $stat
        kernel_thread=no
        { [ "$pid" = 2 ] || [ "$2" = 2 ]; } && kernel_thread=yes
        case $kernel_thread$1 in yes[RD]) ;; yes*) continue ;; esac
        echo "  $pid ${task##*/} $(cat "$task/comm" 2>/dev/null) $1 $(cat "$task/wchan" 2>/dev/null)"
        case $1 in
            S|I|Z) ;;
            *) timeout -k 1 2 cat "$task/stack" 2>/dev/null | head -12 | sed 's/^/      /' ;;
        esac
    done
}

# A guest that reaches the host's limit says why in a few lines (the host
# shows the guest's last lines when it kills it): the full dump goes to
# OUT/hang.txt, the processes that are not asleep and the kernel's last
# words to the console.
if [ -n "${guest_dump_limit:-}" ]; then
    (
        sleep "$guest_dump_limit" >/dev/null 2>&1
        dump_processes >"$out/hang.txt" 2>&1
        echo "guest: still running ${guest_dump_limit} s after start; tasks not sleeping (full dump in hang.txt):"
        awk '/^guest:/ { show = 0 } /^  [0-9]/ { show = ($4 != "S" && $4 != "I") } show' "$out/hang.txt" | head -n 40
        echo "guest: last kernel messages:"
        dmesg 2>/dev/null | tail -n 12 | sed 's/^/  /'
    ) &
    guest_watchdog=$!
fi

uname -r >"$out/uname"
: >"$out/steps.tsv"
: >"$out/tests.log"
started=$(date +%s)
step() { # name status
    now=$(date +%s)
    printf '%s\t%s\t%s\n' "$1" "$2" "$((now - started))" >>"$out/steps.tsv"
    echo "guest: step $1: exit $2 ($((now - started)) s)"
    started=$now
}
alive() { # pid: running and not a zombie
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ]
}

echo "guest: kernel $(uname -r), $(nproc) CPUs"

# 1. netlens check, as JSON (older netlens: the plain table).
timeout -k 5 "$check_limit" "$netlens" check --json >"$out/check.json" 2>"$out/check.err"
status=$?
if [ "$status" = 2 ] && [ ! -s "$out/check.json" ]; then
    timeout -k 5 "$check_limit" "$netlens" check >"$out/check.txt" 2>>"$out/check.err"
    status=$?
    cat "$out/check.txt"
else
    cat "$out/check.json"
fi
cat "$out/check.err" >&2
step check "$status"
# A program this kernel's verifier rejected: keep its log for the reader.
if grep -q "the kernel rejected the program" "$out/check.json" "$out/check.txt" 2>/dev/null; then
    timeout -k 5 "$check_limit" "$netlens" check --verbose >"$out/check.verbose" 2>&1
    echo "guest: a program was rejected; its verifier log: $out/check.verbose"
fi

# 2. The kernel-side integration tests, one binary at a time, serially.
while IFS="$tab" read -r kind name dir binary; do
    [ "$kind" = test ] || continue
    echo "guest: test binary $name"
    binary=$(in_ram "$binary")
    {
        (sleep "$((test_limit - 10))" >/dev/null 2>&1; dump_processes) 2>&1 &
        watchdog=$!
        (cd "$dir" && NETLENS_BIN="$netlens" NETLENS_GUEST=1 CARGO_MANIFEST_DIR="$dir" \
            timeout -k 10 "$test_limit" "$binary" --test-threads=1 --nocapture "$@" </dev/null 2>&1)
        echo $? >"$out/status"
        kill "$watchdog" 2>/dev/null
    } | tee -a "$out/tests.log"
    step "test:$name" "$(cat "$out/status")"
done <"$out/plan.tsv"

# 3. Smoke runs of each command, with a little traffic for trace to see:
# refused connects (handshake failures) and one HTTP exchange with the daemon.
(sleep 1; for _ in 1 2 3; do curl -s -m 2 http://127.0.0.1:9/ >/dev/null; done) &
refused=$!
timeout -k 5 "$smoke_limit" "$netlens" trace --duration 3 --json >"$out/trace.jsonl" 2>"$out/trace.err" </dev/null
status=$?
# That job only: a bare `wait` would also wait for the whole-guest watchdog.
wait "$refused"
cat "$out/trace.err" >&2
echo "guest: trace printed $(wc -l <"$out/trace.jsonl") events"
step trace "$status"

timeout -k 5 "$smoke_limit" "$netlens" top --batch -n 1 2>"$out/top.err" </dev/null
status=$?
cat "$out/top.err" >&2
step top "$status"

"$netlens" daemon --listen 127.0.0.1:9977 2>"$out/daemon.err" </dev/null &
daemon=$!
scraped=1
waited=0
while [ "$waited" -lt "$smoke_limit" ] && alive "$daemon"; do
    if curl -sf -m 5 http://127.0.0.1:9977/metrics >"$out/metrics.txt"; then
        scraped=0
        break
    fi
    sleep 1
    waited=$((waited + 1))
done
if [ "$scraped" = 0 ] && ! grep -q '^netlens_' "$out/metrics.txt"; then
    echo "guest: the scrape has no netlens_ series" >&2
    scraped=1
fi
echo "guest: scraped $(grep -c '^netlens_' "$out/metrics.txt" 2>/dev/null) netlens_ samples"
step daemon-scrape "$scraped"
kill -TERM "$daemon" 2>/dev/null
waited=0
while [ "$waited" -lt 20 ] && alive "$daemon"; do
    sleep 1
    waited=$((waited + 1))
done
if alive "$daemon"; then
    echo "guest: the daemon ignored SIGTERM for 20 s" >&2
    kill -KILL "$daemon"
fi
wait "$daemon"
status=$?
cat "$out/daemon.err" >&2
step daemon-exit "$status"

[ -n "${guest_watchdog:-}" ] && kill "$guest_watchdog" 2>/dev/null
date >"$out/finished"
# The host reads the verdict from steps.tsv; this status is for humans.
! grep -qv "${tab}0${tab}" "$out/steps.tsv"
