#!/usr/bin/env bash
# A single-node SLURM cluster from Debian's packages (slurmctld, slurmd, munge), for the test suite
# and CI. Root only; no systemd, no cgroups, no accounting database.
#
#   tests/slurm/start-local-slurm.sh PIDFILE     writes the config, starts the daemons, runs a probe
#   tests/slurm/stop-local-slurm.sh PIDFILE      stops exactly the daemons listed in PIDFILE and
#                                                removes the config this script wrote
#
# The node has two partitions, `cpu` (default) and `gpu`, as workflow/profiles/slurm expects, and a
# fake GPU gres (File=/dev/null, /dev/zero, ...) so that `--gpus=1` is scheduled on a machine without one. The
# node's size is declared, not detected (SlurmdParameters=config_overrides): the profile's GPU rules
# ask for several CPUs and tens of GB, more than a CI runner has.
#
# The config goes to the default path /etc/slurm/slurm.conf: the jobstep's nested `srun` does not
# see SLURM_CONF (see docs/spec/workflow.md, section 3.2).
set -euo pipefail
pidfile=${1:?usage: start-local-slurm.sh PIDFILE}
: > "$pidfile"

for exe in munged slurmctld slurmd sbatch squeue; do
    command -v "$exe" > /dev/null || { echo "$exe not found: apt-get install slurmctld slurmd slurm-client munge" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "start-local-slurm.sh must run as root" >&2; exit 3; }
if pgrep -x slurmctld > /dev/null || pgrep -x slurmd > /dev/null; then
    echo "a SLURM daemon is already running on this machine; not starting a second one" >&2
    exit 3
fi

host=$(hostname -s)
cpus=${SLURM_TEST_CPUS:-8}
mem_mb=${SLURM_TEST_MEM_MB:-65536}
gpus=${SLURM_TEST_GPUS:-2}   # fake ones: two GPU jobs at once, as many as a 2-core runner can run

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown slurm: /var/spool/slurmctld /var/log/slurm
chown munge: /run/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2> /dev/null; }
chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key

cat > /etc/slurm/slurm.conf << CONF
# written by saedynamics tests/slurm/start-local-slurm.sh
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
GresTypes=gpu
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} Gres=gpu:fake:${gpus} State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
CONF
devices=(/dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty)
: > /etc/slurm/gres.conf
for i in $(seq 0 $((gpus - 1))); do
    echo "NodeName=${host} Name=gpu Type=fake File=${devices[$i]}" >> /etc/slurm/gres.conf
done

# Each daemon forks into the background and writes its pid file; record the pid once that names
# the live daemon (a stale pid file from an earlier run must not be taken for it).
record_pid() {  # NAME PIDFILE
    for _ in $(seq 100); do
        pid=$(cat "$2" 2> /dev/null || true)
        if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2> /dev/null)" = "$1" ]; then
            echo "$1 $pid" >> "$pidfile"
            return 0
        fi
        sleep 0.1
    done
    echo "$1 did not start (see /var/log/slurm/ or syslog)" >&2
    exit 4
}
rm -f /run/munge/munged.pid /run/slurmctld.pid /run/slurmd.pid
rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*   # no jobs from an earlier run
su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
record_pid munged /run/munge/munged.pid
slurmctld -c -i
record_pid slurmctld /run/slurmctld.pid
slurmd
record_pid slurmd /run/slurmd.pid

# the node must come up and run a job, on both partitions, the GPU one with a GPU
for _ in $(seq 100); do
    sinfo -h -o %T 2> /dev/null | grep -q idle && break
    sleep 0.2
done
timeout 60 sbatch --wait -p cpu -o /dev/null --wrap true > /dev/null
timeout 60 sbatch --wait -p gpu --gpus=1 -o /dev/null --wrap true > /dev/null
echo "local SLURM up: node ${host}, ${cpus} CPUs, ${mem_mb} MB, ${gpus} fake GPUs, partitions cpu and gpu" >&2
