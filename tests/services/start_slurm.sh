#!/usr/bin/env bash
# A real single-node Slurm (munge + slurmctld + slurmd) for tests/e2e/test_submit_slurm.py.
# Idempotent: installs Debian's slurm-wlm and munge if missing, writes the configs once, starts the
# daemons that are not running, and waits until the node answers. Root only (it installs packages and
# writes /etc); as another user it says so and exits 0, and the Slurm tests skip with that reason.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "start_slurm.sh: not root; skipping the local Slurm (its tests will be skipped)"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
mkdir -p /etc/munge /var/run/munge /var/log/munge /var/lib/munge /etc/slurm \
    /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown -R munge:munge /etc/munge /var/run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge
chmod 0755 /var/run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

conf=/etc/slurm/slurm.conf
if ! grep -q "^SlurmctldHost=$host\$" "$conf" 2>/dev/null || ! grep -q "pretrain-test" "$conf"; then
    cat >"$conf" <<EOF
# pretrain-test: a single-node cluster for the project's tests (tests/services/start_slurm.sh)
ClusterName=pretrain-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
ScronParameters=enable
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/var/run/slurmctld.pid
SlurmdPidFile=/var/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
NodeName=$host CPUs=$(nproc) RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
fi

running() { pgrep -x "$1" >/dev/null; }
# by pid file, not by name: the two-node test cluster (start_cluster.sh) runs daemons of the same names
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running munged || su -s /bin/sh munge -c "/usr/sbin/munged"
alive /var/run/slurmctld.pid || /usr/sbin/slurmctld
alive /var/run/slurmd.pid || /usr/sbin/slurmd

for _ in $(seq 1 30); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|allocated"; then
        echo "start_slurm.sh: Slurm is up on $host ($(sinfo -h -o '%P %T %N' | head -n 1))"
        exit 0
    fi
    sleep 1
done
echo "start_slurm.sh: Slurm did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
