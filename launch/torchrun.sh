#!/usr/bin/env bash
# Launch `fr-trainer train` with torchrun: one command per node.
#
#   launch/torchrun.sh [options] CONFIG [trainer args, e.g. --set optim.lr=0.2]
#
# Single node (default): torchrun --standalone, --nproc-per-node processes.
# Multi-node: the same command on every node, each with its --node-rank and the address of
#   node 0 (c10d rendezvous, hosted by the torchrun agent of the node that reaches it first).
# Elastic: --nnodes MIN:MAX and/or --max-restarts K; a failed worker makes the agents
#   restart the whole group (up to K times), and the trainer resumes from the latest
#   checkpoint of its run directory (resume = "auto"), so at most checkpoint.every_steps
#   steps are recomputed.
# Signals: SIGTERM/SIGINT (SIGHUP as SIGTERM) to this script go to torchrun, which sends them to every
#   worker; the workers save a checkpoint at the next step boundary and exit 75. Exit status
#   of this script: 0 done; 75 preempted, checkpoint saved (rerun the same command to resume);
#   76 a rank hung (train.collective_timeout_s; the message names it); 77 the launcher died;
#   2 bad arguments/config or the run directory is locked by another job; else torchrun's.
#
# Options:
#   --nnodes N | MIN:MAX     number of nodes (default 1)
#   --nproc-per-node G       processes (GPUs) per node (default: $FR_NPROC_PER_NODE, else
#                            the GPU count, else 1)
#   --node-rank R            this node's rank, 0..N-1 (multi-node, fixed N)
#   --master-addr HOST       address of node 0 (multi-node); also --rdzv-endpoint HOST:PORT
#   --master-port PORT       rendezvous port on node 0 (default 29500)
#   --rdzv-id ID             job id shared by all nodes (default: $SLURM_JOB_ID or fr_trainer)
#   --max-restarts K         elastic restarts of the worker group (default 0)
#   --monitor-interval S     seconds between worker health checks (torchrun default 0.1)
#   --rdzv-conf K=V[,K=V]    rendezvous settings, e.g. last_call_timeout=5 (how long an
#                            elastic round waits for more nodes once MIN have joined;
#                            torchrun's default is 30 s)
#   --grace S                seconds the workers get to save after a signal before torchrun
#                            kills them (torchrun --shutdown-timeout; torchrun default 30)
#   --ifname IFACE           network interface for NCCL and gloo (exports NCCL_SOCKET_IFNAME
#                            and GLOO_SOCKET_IFNAME), e.g. eth0, ib0, ^lo,docker
#   --dry-run                print the exact command and exit
#   --help
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }

nnodes=1 nproc="${FR_NPROC_PER_NODE:-}" node_rank="" addr="" port=29500
rdzv_id="${SLURM_JOB_ID:-fr_trainer}" max_restarts=0 monitor="" grace="" ifname="" dry_run=0 rdzv_conf=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes="${2:?--nnodes needs a value}"; shift 2 ;;
    --nproc-per-node) nproc="${2:?--nproc-per-node needs a value}"; shift 2 ;;
    --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
    --master-addr) addr="${2:?--master-addr needs a value}"; shift 2 ;;
    --master-port) port="${2:?--master-port needs a value}"; shift 2 ;;
    --rdzv-endpoint) addr="${2%:*}"; port="${2##*:}"; shift 2 ;;
    --rdzv-id) rdzv_id="${2:?--rdzv-id needs a value}"; shift 2 ;;
    --max-restarts) max_restarts="${2:?--max-restarts needs a value}"; shift 2 ;;
    --monitor-interval) monitor="${2:?--monitor-interval needs a value}"; shift 2 ;;
    --rdzv-conf) rdzv_conf="${2:?--rdzv-conf needs K=V[,K=V]}"; shift 2 ;;
    --grace) grace="${2:?--grace needs a value}"; shift 2 ;;
    --ifname) ifname="${2:?--ifname needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "missing CONFIG, e.g. launch/torchrun.sh configs/demo.toml (see --help)"
config="$1"; shift

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
if [[ "$nnodes" =~ ^([0-9]+):([0-9]+)$ ]]; then
  min_nodes="${BASH_REMATCH[1]}" max_nodes="${BASH_REMATCH[2]}"
  [ "$min_nodes" -ge 1 ] && [ "$min_nodes" -le "$max_nodes" ] \
    || die "--nnodes $nnodes: need 1 <= MIN <= MAX, e.g. --nnodes 2:4"
else
  is_int "$nnodes" && [ "$nnodes" -ge 1 ] || die "--nnodes $nnodes: write a count (2) or a range MIN:MAX (2:4)"
  min_nodes="$nnodes" max_nodes="$nnodes"
fi
if [ -z "$nproc" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nproc="$(nvidia-smi -L | wc -l)"
  else
    nproc=1
  fi
fi
is_int "$nproc" && [ "$nproc" -ge 1 ] || die "--nproc-per-node $nproc: write a positive count, e.g. 8"
is_int "$port" && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "--master-port $port is not a port (1-65535)"
is_int "$max_restarts" || die "--max-restarts $max_restarts: write a count, e.g. 3"
[ -z "$grace" ] || is_int "$grace" || die "--grace $grace: write seconds, e.g. 90"

envs=()
[ -n "$ifname" ] && envs+=("NCCL_SOCKET_IFNAME=$ifname" "GLOO_SOCKET_IFNAME=$ifname")
if [ "$max_restarts" -gt 0 ] || [ "$min_nodes" -ne "$max_nodes" ]; then
  # Restarts: give every round its own store. With the agent's shared TCPStore a restarted
  # group can read the previous round's addresses and fail to connect (pytorch#135712).
  envs+=("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
fi
cmd=("${TORCHRUN:-torchrun}")
if [ "$max_nodes" -eq 1 ] && [ -z "$addr" ]; then
  cmd+=(--standalone --nnodes=1 "--nproc-per-node=$nproc")
else
  [ -n "$addr" ] || die "--nnodes $nnodes needs --master-addr HOST (the address of node 0, reachable from every node)"
  cmd+=("--nnodes=$nnodes" "--nproc-per-node=$nproc")
  if [ "$min_nodes" -eq "$max_nodes" ]; then
    [ -n "$node_rank" ] || die "--nnodes $nnodes needs --node-rank R on every node (0 on $addr, then 1..$((max_nodes - 1)))"
    is_int "$node_rank" && [ "$node_rank" -lt "$max_nodes" ] \
      || die "--node-rank $node_rank must lie in [0, $max_nodes)"
    cmd+=("--node-rank=$node_rank")
  elif [ -n "$node_rank" ]; then
    die "--node-rank is assigned by the rendezvous when --nnodes is a range ($nnodes); drop it"
  fi
  cmd+=(--rdzv-backend=c10d "--rdzv-endpoint=$addr:$port" "--rdzv-id=$rdzv_id")
  [ -n "$rdzv_conf" ] && cmd+=("--rdzv-conf=$rdzv_conf")
fi
[ "$max_restarts" -gt 0 ] && cmd+=("--max-restarts=$max_restarts")
[ -n "$monitor" ] && cmd+=("--monitor-interval=$monitor")
[ -n "$grace" ] && cmd+=("--shutdown-timeout=$grace")
cmd+=(-m fr_trainer train "$config" "$@")

if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${envs[@]}" "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
for assignment in "${envs[@]}"; do
  export "${assignment?}"
done

# torchrun's exit status does not carry the workers' (it exits 1 for any failed worker), so
# the workers write why they stopped to FR_EXIT_STATUS_FILE (fr_trainer/train/signals.py).
status_file="$(mktemp "${TMPDIR:-/tmp}/fr_trainer_status.XXXXXX")"
trap 'rm -f "$status_file"' EXIT
export FR_EXIT_STATUS_FILE="$status_file"
# torchrun runs in a session of its own: a Ctrl-C in the terminal reaches only this script,
# which forwards it once (torchrun would take a second copy for a second signal and stop
# waiting for the workers' checkpoints). torchrun starts the workers in sessions of their own.
launcher=()
command -v setsid >/dev/null 2>&1 && launcher=(setsid)
"${launcher[@]}" "${cmd[@]}" &
child=$!
forward() { kill -s "$1" "$child" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward TERM' HUP  # a closed terminal: save and stop, as for SIGTERM
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do  # a trapped signal interrupted wait: wait again
  rc=0
  wait "$child" || rc=$?
done
[ "$rc" -eq 0 ] && exit 0
code="" message=""
if [ -s "$status_file" ]; then
  code="$(sed -n 's/.*"code": *\([0-9]*\).*/\1/p' "$status_file")"
  message="$(sed -n 's/.*"message": *"\(.*\)", "pid".*/\1/p' "$status_file")"
fi
case "$code" in
  75) echo "launch/torchrun.sh: preempted (status 75): $message. Run the same command again to resume." >&2; exit 75 ;;
  76) echo "launch/torchrun.sh: a rank hung (status 76): $message" >&2; exit 76 ;;
  77) echo "launch/torchrun.sh: the launcher died (status 77): $message" >&2; exit 77 ;;
  130) echo "launch/torchrun.sh: aborted by a second SIGINT (status 130), no checkpoint of the last step" >&2; exit 130 ;;
esac
exit "$rc"
