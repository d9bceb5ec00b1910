#!/usr/bin/env bash
# A two-node cluster on one machine, with a real two-node Slurm on it, for tests/e2e/test_cluster_slurm.py.
#
# Each node is a network + UTS + mount namespace:
#   pt-node1  10.78.0.1   slurmctld + slurmd      pt-node2  10.78.0.2   slurmd
# joined by veth pairs on the bridge pt-br0 (this machine, the "login node", is 10.78.0.254 on it).
# In its mount namespace a node has its own hostname, its own /etc/hosts (both nodes' names), its own
# /etc/slurm/slurm.conf (this cluster's) and a private tmpfs on /tmp (its local scratch). The project
# checkout and its virtualenv are read-only there; the one writable folder both nodes see is
# $SHARED (/srv/pretrain-shared): a test that needs a shared run directory declares it under there.
# This machine talks to the cluster with SLURM_CONF=/var/lib/pretrain-cluster/slurm.conf.
#
# Idempotent: `start_cluster.sh` builds what is missing and waits until both nodes answer;
# `start_cluster.sh stop` takes it all down again. Root only; as another user it says so and exits 0
# (the cluster tests skip with that reason).
set -euo pipefail

BASE=/var/lib/pretrain-cluster
SHARED=/srv/pretrain-shared
CONF=$BASE/slurm.conf
NODES=(pt-node1 pt-node2)
ADDRS=(10.78.0.1 10.78.0.2)
BRIDGE=pt-br0
LOGIN_ADDR=10.78.0.254
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PRETRAIN_PYTHON:-$REPO/.venv/bin/python}

if [ "$(id -u)" -ne 0 ]; then
    echo "start_cluster.sh: not root; skipping the two-node cluster (its tests will be skipped)"
    exit 0
fi

holder_pid() { cat "$BASE/$1.pid" 2>/dev/null || true; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
# run a command on a node: inside its network, UTS and mount namespaces
on_node() { local pid; pid=$(holder_pid "$1"); shift; nsenter -t "$pid" -n -u -m -- "$@"; }

stop() {
    for pidfile in "$BASE"/slurmctld.pid "$BASE"/slurmd-*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile"); alive "$pid" && kill "$pid" 2>/dev/null || true
    done
    sleep 1
    for i in 0 1; do
        node=${NODES[$i]} pid=$(holder_pid "${NODES[$i]}")
        alive "$pid" && kill "$pid" 2>/dev/null || true
        rm -f "$BASE/$node.pid"
        ip netns delete "$node" 2>/dev/null || true
        ip link delete "pt-v$i" 2>/dev/null || true
    done
    ip link delete "$BRIDGE" 2>/dev/null || true
    echo "start_cluster.sh: stopped"
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: one daemon and key for the machine; its socket is a file, so the nodes reach it too
mkdir -p /etc/munge /var/run/munge /var/log/munge /var/lib/munge
chown -R munge:munge /etc/munge /var/run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge
chmod 0755 /var/run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged

mkdir -p "$BASE/log" "$BASE/ctld" "$SHARED" "$BASE/spool-${NODES[0]}" "$BASE/spool-${NODES[1]}"
chmod 1777 "$SHARED"

cat >"$BASE/hosts" <<EOF
127.0.0.1 localhost
${ADDRS[0]} ${NODES[0]}
${ADDRS[1]} ${NODES[1]}
$LOGIN_ADDR pt-login
EOF

cat >"$CONF.new" <<EOF
# pretrain-2node: the two-node test cluster of tests/services/start_cluster.sh
ClusterName=pretrain-2node
SlurmctldHost=${NODES[0]}(${ADDRS[0]})
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
JobRequeue=1
# a requeued job may start again after the job credential's lifetime (Slurm's default: 120 s)
AuthInfo=cred_expire=10
MinJobAge=600
StateSaveLocation=$BASE/ctld
SlurmdSpoolDir=$BASE/spool-%n
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
JobCompType=jobcomp/none
KillWait=30
NodeName=${NODES[0]} NodeAddr=${ADDRS[0]} CPUs=$(nproc) RealMemory=4000 State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=${ADDRS[1]} CPUs=$(nproc) RealMemory=4000 State=UNKNOWN
PartitionName=nodes Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.new" "$CONF"

# the network: a bridge here, one veth pair per node
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$LOGIN_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
fi
ro_paths=("$REPO")
venv=$(cd "$(dirname "$PY")/.." 2>/dev/null && pwd || true)
[ -n "$venv" ] && [ "${venv#"$REPO"/}" = "$venv" ] && ro_paths+=("$venv")
for i in 0 1; do
    node=${NODES[$i]} addr=${ADDRS[$i]}
    if ! ip netns list | grep -qw "$node"; then
        ip netns add "$node"
        ip link add "pt-v$i" type veth peer name "pt-e$i"
        ip link set "pt-v$i" master "$BRIDGE" up
        ip link set "pt-e$i" netns "$node"
        ip -n "$node" link set "pt-e$i" name eth0
        ip -n "$node" addr add "$addr/24" dev eth0
        ip -n "$node" link set eth0 up
        ip -n "$node" link set lo up
    fi
    if ! alive "$(holder_pid "$node")"; then
        # the holder keeps the node's UTS and mount namespaces alive; daemons join them with nsenter
        # (nsenter, not `ip netns exec`, which remounts /sys and so hides the cgroup tree slurmd reads)
        setsid nsenter --net="/run/netns/$node" -- unshare --uts --mount --propagation private -- /bin/sh -c '
            node=$1 base=$2; shift 2
            hostname "$node"
            # the shared read-only paths are held aside first: a checkout under /tmp (a CI clone)
            # would be hidden by the private /tmp of the node otherwise
            i=0; for p in "$@"; do
                mkdir -p "$base/keep-$node/$i" && mount --bind "$p" "$base/keep-$node/$i"; i=$((i+1))
            done
            mount -t tmpfs -o size=2g,mode=1777 "scratch-$node" /tmp
            mount --bind "$base/hosts" /etc/hosts
            mount --bind "$base/slurm.conf" /etc/slurm/slurm.conf
            i=0; for p in "$@"; do
                mkdir -p "$p" && mount --bind "$base/keep-$node/$i" "$p" && mount -o remount,bind,ro "$p"
                i=$((i+1))
            done
            echo $$ > "$base/$node.pid"
            exec sleep infinity' holder "$node" "$BASE" "${ro_paths[@]}" </dev/null >"$BASE/log/$node-holder.log" 2>&1 &
        for _ in $(seq 1 50); do alive "$(holder_pid "$node")" && break; sleep 0.1; done
    fi
done

alive "$(cat "$BASE/slurmctld.pid" 2>/dev/null)" || on_node "${NODES[0]}" /usr/sbin/slurmctld -f "$CONF"
for node in "${NODES[@]}"; do
    alive "$(cat "$BASE/slurmd-$node.pid" 2>/dev/null)" || on_node "$node" /usr/sbin/slurmd -f "$CONF" -N "$node"
done

export SLURM_CONF=$CONF
for _ in $(seq 1 30); do
    if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE 'idle|mixed|allocated')" -eq 2 ]; then
        echo "start_cluster.sh: two-node Slurm is up: $(sinfo -h -N -o '%N(%T)' | tr '\n' ' ')(SLURM_CONF=$CONF, shared folder $SHARED)"
        exit 0
    fi
    sleep 1
done
echo "start_cluster.sh: the two-node Slurm did not come up; see $BASE/log/" >&2
sinfo -N >&2 || true
exit 1
