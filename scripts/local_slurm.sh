#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (slurmctld + slurmd on 127.0.0.1, one partition "local"),
# from Debian's packages, for the tests and for trying `python train.py -m launcher=slurm ...` on a laptop.
#
#   sudo scripts/local_slurm.sh start    # install slurm-wlm + munge if missing, write the config, start the daemons
#   sudo scripts/local_slurm.sh status   # the daemons and the partition (sinfo)
#   sudo scripts/local_slurm.sh stop     # stop the daemons this script started (munged only if it started it)
#
# Idempotent: `start` on a running cluster changes nothing. Needs root (apt-get, daemons as root).
# It writes /etc/slurm/slurm.conf, so that sbatch/squeue work without SLURM_CONF, and refuses to
# touch a slurm.conf it did not write (a real cluster's). Cluster state and logs go to $STATE_DIR.
# Exit status 2 means "cannot run here" (not root, no apt-get, a foreign slurm.conf, daemons failing).
set -euo pipefail

STATE_DIR=${DDPO_SLURM_STATE_DIR:-/var/tmp/ddpo-local-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by scripts/local_slurm.sh (ddpo): one-node local cluster"
PARTITION=local

say() { echo "local_slurm: $*"; }
cannot() { echo "local_slurm: cannot run here: $*" >&2; exit 2; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || cannot "slurm is not installed and there is no apt-get"
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || cannot "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || cannot "apt-get install slurmctld slurmd slurm-client munge failed"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a munged already answers (ours or the system's)
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged || cannot "munged does not start"
  touch "$STATE_DIR/started_munged"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  cannot "munged started but does not answer"
}

refuse_foreign_config() {
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    cannot "$CONF exists and was not written by this script (a real cluster's?); not touching it"
  fi
}

write_config() {
  local node cpus mem_mb
  node=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p /etc/slurm "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
  cat > "$CONF.tmp" <<EOF
$MARKER
ClusterName=ddpo-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=10
MinJobAge=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

wait_for_node() {
  for _ in $(seq 60); do
    state=$(sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -1 || true)
    case $state in
      idle*|mixed*|alloc*) say "up: partition $PARTITION, node $(hostname -s) ($state)"; return ;;
    esac
    sleep 0.5
  done
  cannot "the node did not come up (state '${state:-none}'); see $STATE_DIR/slurmctld.log and slurmd.log"
}

start() {
  [[ $(id -u) == 0 ]] || cannot "needs root (daemons, /etc/slurm)"
  refuse_foreign_config
  install_packages
  mkdir -p "$STATE_DIR"
  if pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid"; then
    wait_for_node
    return
  fi
  start_munge
  write_config
  pid_alive "$STATE_DIR/slurmctld.pid" || /usr/sbin/slurmctld -c -f "$CONF" || cannot "slurmctld does not start"
  pid_alive "$STATE_DIR/slurmd.pid" || /usr/sbin/slurmd -f "$CONF" || cannot "slurmd does not start"
  wait_for_node
}

# SIGTERM the process in pid file $1, wait for it to exit, SIGKILL it after $2 seconds
stop_pid() {
  local pid_file=$1 limit=$2 pid
  pid_alive "$pid_file" || return 0
  pid=$(cat "$pid_file")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq $((limit * 5))); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  local name
  if pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid"; then
    # end the jobs first: a job step still finishing needs slurmctld (and munged) to complete
    scancel --partition="$PARTITION" 2>/dev/null || true
    for _ in $(seq 150); do
      [[ -z $(squeue -h -p "$PARTITION" 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
  for name in slurmd slurmctld; do
    if pid_alive "$STATE_DIR/$name.pid"; then
      stop_pid "$STATE_DIR/$name.pid" 20
      say "stopped $name"
    fi
  done
  if [[ -f $STATE_DIR/started_munged ]]; then
    if pid_alive /run/munge/munged.pid; then
      stop_pid /run/munge/munged.pid 10
      say "stopped munged"
    fi
    rm -f "$STATE_DIR/started_munged"
  fi
}

status() {
  local name
  for name in slurmctld slurmd; do
    if pid_alive "$STATE_DIR/$name.pid"; then say "$name running (pid $(cat "$STATE_DIR/$name.pid"))"
    else say "$name not running"; fi
  done
  sinfo 2>/dev/null || true
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
