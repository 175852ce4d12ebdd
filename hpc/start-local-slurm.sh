#!/usr/bin/env bash
# A real, single-node SLURM cluster on this machine (controller + compute node on localhost),
# for CI and for trying brain-ldm-bids' SLURM paths before using a real cluster.
#
#   sudo hpc/start-local-slurm.sh          # install (Debian/Ubuntu), configure, start, wait
#   sinfo                                   # -> partition "debug", node idle
#   hpc/start-local-slurm.sh --stop         # stop the daemons
#
# What it does, step by step (read it as documentation of the minimum SLURM needs):
#  1. installs Debian's slurm-wlm (slurmctld + slurmd + client commands) and munge if missing;
#  2. creates a munge key if there is none and starts munged (SLURM's authentication);
#  3. writes /etc/slurm/slurm.conf: one node (this host, all its CPUs and 90% of its memory),
#     one partition "debug", no accounting, no cgroups (process tracking by /proc), so it also
#     runs inside containers and CI sandboxes where cgroups are not delegated;
#  4. starts slurmctld and slurmd as root and waits until `sinfo` reports the node idle.
# Must run as root. Idempotent: running it again restarts the daemons with a fresh config.
# On a real cluster none of this is needed: your site already runs SLURM.
set -euo pipefail

STATE_DIR=/var/spool/slurm-local
LOG_DIR=/var/log/slurm-local
CONF=/etc/slurm/slurm.conf

stop_daemons() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0
        sleep 0.1
    done
}

if [[ "${1:-}" == "--stop" ]]; then
    stop_daemons
    echo "local SLURM stopped"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "$0: must run as root (it installs packages and starts system daemons)" >&2
    exit 1
fi

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 2. munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --force; else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    pkill -x munged 2>/dev/null || true
    # --force: tolerate permissive directory modes seen in containers.
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged --force
    else
        munged --force
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null || { echo "$0: munged does not answer" >&2; exit 1; }

# 3. slurm.conf for this one machine
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR" /etc/slurm
cat > "$CONF" <<CONF
# Written by brain-ldm-nodes hpc/start-local-slurm.sh: a single-node test cluster.
ClusterName=local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
# Some Debian builds read cgroup.conf even with cgroups unused: keep it harmless.
[[ -e /etc/slurm/cgroup.conf ]] || echo "CgroupPlugin=autodetect" > /etc/slurm/cgroup.conf

# 4. daemons
stop_daemons
slurmctld -i   # -i: ignore state left by an earlier instance
slurmd
for _ in $(seq 150); do
    state=$(sinfo --noheader --Node --format=%T 2>/dev/null | head -n1 || true)
    if [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]; then
        echo "local SLURM up: node ${NODE} (${CPUS} CPUs, ${MEM_MB} MB), partition debug"
        exit 0
    fi
    if [[ "$state" == down* || "$state" == drain* ]]; then
        scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    fi
    sleep 0.2
done
echo "$0: SLURM did not come up; last node state '${state:-none}'. Logs: ${LOG_DIR}" >&2
tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
exit 1
