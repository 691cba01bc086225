#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for testing generated batch scripts against the real
# sbatch/srun/scontrol (Debian's slurm-wlm + munge; needs root).
#
#   tests/integration/slurm_localhost.sh start   # install if missing, start munged, slurmctld, slurmd; wait for idle
#   tests/integration/slurm_localhost.sh stop    # stop the daemons this script started (by their pid files)
#
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
# Every state, spool, pid and log path lives in $SLM_SLURM_SCRATCH (default /tmp/slm-slurm-localhost).
# /etc/slurm/slurm.conf is written with a marker line; a slurm.conf without it (a real cluster) is never touched.
set -euo pipefail

SCRATCH="${SLM_SLURM_SCRATCH:-/tmp/slm-slurm-localhost}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by slm-forge tests/launch/slurm_localhost.sh"   # the path it had when first written: files carrying it are ours

die() { echo "slurm_localhost: $*" >&2; exit 1; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || die "slurm-wlm is not installed and apt-get is not available"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # a munged is already serving
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge "$SCRATCH/munge"
    if [[ ! -s /etc/munge/munge.key ]]; then
        head -c 1024 /dev/urandom > /etc/munge/munge.key
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge "$SCRATCH/munge"
    chmod 400 /etc/munge/munge.key
    chmod 700 /etc/munge
    su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$SCRATCH/munge/munged.pid"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
    local host node
    host="$(hostname -s)"
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
    fi
    # The node line as slurmd sees this machine (CPUs, sockets, cores, memory), so it never drains as INVALID.
    node="$(/usr/sbin/slurmd -C | head -n 1)"
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this node: $node"
    mkdir -p "$SCRATCH"/{spool,state,log} /etc/slurm
    cat > "$CONF.tmp" <<EOF
$MARKER
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s); short for tests.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmUser=root
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.pid
SlurmdSpoolDir=$SCRATCH/spool
StateSaveLocation=$SCRATCH/state
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
SlurmdLogFile=$SCRATCH/log/slurmd.log
SchedulerType=sched/backfill
# Look for startable jobs every second (defaults 60 s / 30 s): a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
KillWait=10
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

wait_idle() {
    for _ in $(seq 150); do
        if sinfo -h -o %t 2>/dev/null | grep -qx "idle"; then return 0; fi
        sleep 0.2
    done
    die "the node did not become idle: $(sinfo 2>&1 | tr '\n' ' '); logs in $SCRATCH/log"
}

start() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages and starts daemons)"
    install_packages
    mkdir -p "$SCRATCH"
    start_munge
    if alive "$SCRATCH/slurmctld.pid" && alive "$SCRATCH/slurmd.pid"; then
        wait_idle
        echo "slurm_localhost: already running"
        return 0
    fi
    write_conf
    alive "$SCRATCH/slurmctld.pid" || /usr/sbin/slurmctld -c  # -c: no jobs left over from an earlier run
    alive "$SCRATCH/slurmd.pid" || /usr/sbin/slurmd
    wait_idle
    echo "slurm_localhost: running (node $(hostname -s), scratch $SCRATCH)"
}

stop_pidfile() {
    local pidfile="$1" pid
    alive "$pidfile" || return 0
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    stop_pidfile "$SCRATCH/slurmd.pid"
    stop_pidfile "$SCRATCH/slurmctld.pid"
    stop_pidfile "$SCRATCH/munge/munged.pid"
    echo "slurm_localhost: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
