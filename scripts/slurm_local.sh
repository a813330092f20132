#!/usr/bin/env bash
# A single-node Slurm on this machine, for the Slurm tests and for trying `btx launch` locally.
#
#   scripts/slurm_local.sh install          apt-get install slurm-wlm munge (if missing)
#   scripts/slurm_local.sh start [DIR]      install if needed, start munged, slurmctld, slurmd
#   scripts/slurm_local.sh stop [DIR]       stop slurmctld and slurmd of DIR (by their PIDs)
#   scripts/slurm_local.sh status [DIR]     0 if the controller answers, else 1
#   scripts/slurm_local.sh env [DIR]        print `export SLURM_CONF=...` (eval it in a shell)
#
# DIR (default $BTX_SLURM_DIR or /tmp/btx_slurm) holds slurm.conf, state, spool, logs and the
# PID files. Clients find the cluster through SLURM_CONF=DIR/slurm.conf. Every command is
# idempotent: `start` on a running cluster only checks it, `stop` on a stopped one does nothing.
# No systemd is needed: the daemons run in the foreground (-D) in their own sessions.
#
# Settings (environment): BTX_SLURM_CPUS (default: this machine's cores), BTX_SLURM_PORT
# (controller port, default 16817; slurmd uses the next one), BTX_SLURM_CRED_EXPIRE (seconds a
# requeued job waits before it may start again, default 5; Slurm's default is 120).
set -euo pipefail

cmd="${1:-}"
DIR="${2:-${BTX_SLURM_DIR:-/tmp/btx_slurm}}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
CPUS="${BTX_SLURM_CPUS:-$(nproc)}"
PORT="${BTX_SLURM_PORT:-16817}"
CRED_EXPIRE="${BTX_SLURM_CRED_EXPIRE:-5}"
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm_local: $*" >&2; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
    [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        log "slurm-wlm/munge are not installed and this is not root: cannot apt-get install"
        return 3
    fi
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge >"/tmp/slurm_local_apt.log" 2>&1; then
        apt-get update -qq >>"/tmp/slurm_local_apt.log" 2>&1 || true
        if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge \
            >>"/tmp/slurm_local_apt.log" 2>&1; then
            log "apt-get install slurm-wlm munge failed (see /tmp/slurm_local_apt.log)"
            return 3
        fi
    fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    # munged daemonises itself and writes its own PID file. It runs as user munge, so the PID file
    # lives in munge's own run directory: DIR may sit under a folder only root can enter (pytest's
    # /tmp/pytest-of-root is mode 0700), where munged could not even check the file's directory.
    if command -v runuser >/dev/null; then
        runuser -u munge -- munged --force --pid-file="$MUNGE_PID"
    else
        su -s /bin/sh munge -c "munged --force --pid-file=$MUNGE_PID"
    fi
    for _ in $(seq 50); do
        munge_ok && return 0
        sleep 0.1
    done
    log "munged did not come up"
    return 1
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    local mem
    mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_local.sh: a single-node cluster for tests.
ClusterName=btxlocal
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid.conf
SlurmdPidFile=$DIR/slurmd.pid.conf
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=86400
KillWait=60
SlurmdTimeout=300
InactiveLimit=0
Waittime=0
JobRequeue=1
NodeName=$HOST CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

ctld_ok() { SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q "is UP"; }

node_ok() {
    SLURM_CONF="$CONF" sinfo -h -n "$HOST" -o "%t" 2>/dev/null | grep -Eq "^(idle|mix|alloc)"
}

start() {
    install
    mkdir -p "$DIR"
    start_munge
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && ctld_ok; then
        log "already running (SLURM_CONF=$CONF)"
        echo "SLURM_CONF=$CONF"
        return 0
    fi
    stop_daemons
    write_conf
    setsid slurmctld -D -i -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 </dev/null &
    echo $! >"$DIR/slurmctld.pid"
    for _ in $(seq 100); do
        ctld_ok && break
        sleep 0.1
    done
    ctld_ok || { log "slurmctld did not answer; see $DIR/log/slurmctld.log"; return 1; }
    setsid slurmd -D -f "$CONF" >"$DIR/log/slurmd.out" 2>&1 </dev/null &
    echo $! >"$DIR/slurmd.pid"
    for _ in $(seq 150); do
        node_ok && break
        sleep 0.1
    done
    if ! node_ok; then
        SLURM_CONF="$CONF" scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
        sleep 1
    fi
    node_ok || { log "node $HOST is not idle; see $DIR/log/slurmd.log"; return 1; }
    log "up: node $HOST, $CPUS CPUs (SLURM_CONF=$CONF)"
    echo "SLURM_CONF=$CONF"
}

stop_pidfile() {
    local f="$1"
    if alive "$f"; then
        local pid
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stop_daemons() {
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
}

stop() {
    # Jobs still running are cancelled first, so no slurmstepd outlives its slurmd.
    if ctld_ok; then
        SLURM_CONF="$CONF" scancel --full --signal=KILL --state=RUNNING --user="$(id -un)" \
            >/dev/null 2>&1 || true
        SLURM_CONF="$CONF" scancel --user="$(id -un)" >/dev/null 2>&1 || true
        sleep 0.5
    fi
    stop_daemons
    # munged is left running: another cluster started by this script (another test session) may
    # share it. BTX_SLURM_STOP_MUNGE=1 stops it too, if this script started it.
    if [[ "${BTX_SLURM_STOP_MUNGE:-0}" == 1 ]]; then
        stop_pidfile "$MUNGE_PID"
    fi
    log "stopped"
}

case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) ctld_ok ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
