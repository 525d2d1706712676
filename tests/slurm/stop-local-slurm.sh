#!/usr/bin/env bash
# Stop the daemons tests/slurm/start-local-slurm.sh started: exactly the pids in PIDFILE.
set -uo pipefail
pidfile=${1:?usage: stop-local-slurm.sh PIDFILE}
[ -f "$pidfile" ] || exit 0
# no job outlives the cluster: cancel whatever is left before the controller goes
grep -q "^slurmctld " "$pidfile" && scancel --user "$(id -un)" 2> /dev/null && sleep 1
tac "$pidfile" | while read -r name pid; do
    kill "$pid" 2> /dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2> /dev/null && kill -9 "$pid" 2> /dev/null
    echo "stopped $name ($pid)" >&2
done
rm -f "$pidfile"
# and the config start-local-slurm.sh wrote: left behind, every later `scontrol` (which the SLURM
# executor plugin runs whenever Snakemake starts) waits 9 s for a controller that is gone
if head -n 1 /etc/slurm/slurm.conf 2> /dev/null | grep -q "written by saedynamics"; then
    rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
fi
