#!/bin/bash
# A single-host SLURM cluster in a folder, for tests and for trying configs/slurm/vidalign.sbatch on one machine.
#
#   bash scripts/slurm_test_cluster.sh start DIR     # installs the packages when missing (Debian/Ubuntu, as root)
#   export SLURM_CONF=DIR/slurm.conf                  # then sbatch, srun, squeue, scancel, scontrol talk to it
#   bash scripts/slurm_test_cluster.sh stop DIR      # stops the daemons it started (by their PID files) and only those
#
# What it runs (Debian's slurm-wlm 22.05 and munge; no systemd, no cgroups): munged with its key, socket, PID and log
# in DIR (socket folder mode 755); slurmctld and slurmd as root with a generated DIR/slurm.conf: this host as the one
# node with all its CPUs, proctrack/linuxproc, task/none, select/cons_tres with CR_Core, no accounting, free ports,
# state, spool, logs and PID files in DIR. `start` waits until the node is idle (up to 30 s). Used by the tests'
# `slurm` fixture (tests/test_slurm.py). Exit codes: 0 up, 1 not root or the node did not come up, 3 the packages could not
# be installed. Our recipe (issue 36).
set -euo pipefail
cmd=${1:?usage: slurm_test_cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm_test_cluster.sh start|stop DIR}")

stop() {
  for name in slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
      fi
      rm -f "$pidfile"
    fi
  done
}

if [ "$cmd" = stop ]; then stop; echo "slurm_test_cluster: stopped (the daemons of $dir; $dir/slurm.conf stays, unused)"; exit 0; fi
if [ "$cmd" != start ]; then echo "slurm_test_cluster.sh: unknown command $cmd (start|stop)" >&2; exit 2; fi
if [ "$(id -u)" != 0 ]; then echo "slurm_test_cluster.sh: runs the daemons as root (this single-host recipe has no SlurmUser setup)" >&2; exit 1; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1
  } || { echo "slurm_test_cluster.sh: could not install slurmctld slurmd slurm-client munge with apt-get" >&2; exit 3; }
fi

mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
chmod 755 "$dir" "$dir/munge"
if [ ! -f "$dir/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge.key"
fi
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
host=$(hostname -s)
cat > "$dir/slurm.conf" <<EOF
ClusterName=vidalign-test
SlurmctldHost=$host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2
SlurmUser=root
SlurmdUser=root
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"

munged --force --key-file="$dir/munge.key" --socket="$dir/munge/munge.socket.2" --pid-file="$dir/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 300); do
  if sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then
    echo "slurm_test_cluster: up: export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.1
done
echo "slurm_test_cluster: the node did not become idle in 30 s; logs in $dir/log" >&2
sinfo >&2 || true
exit 1
