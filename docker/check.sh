#!/usr/bin/env bash
# Builds both images and exercises them, on a machine without Docker Hub or a GPU:
#   1. podman, buildah and mmdebstrap (apt-get install when missing);
#   2. a stand-in base image, Debian bookworm with python3 (mmdebstrap; cached as an image)
#      in place of the CUDA and python:3.12 bases;
#   3. the torch CPU wheel (torch==$FR_TORCH_VERSION+cpu, Python 3.11 = bookworm's python3),
#      mounted into the builds as a find-links folder;
#   4. docker/Dockerfile.train and docker/Dockerfile.eval built over the stand-in base;
#   5. in the train image: `fr-trainer synth` (a small set), the demo training for a few steps
#      on 2 CPU ranks through the image's entrypoint (launch/torchrun.sh), `fr-trainer export`;
#   6. in the eval image: `fr-trainer verify` of the exported ONNX model on a synthetic .bin.
# Every step's time is printed, then the image sizes; any failure stops it with status 1.
# Containers are run with `buildah run --isolation chroot` (rootless `podman run` needs
# setrlimit, which some sandboxes refuse). The images, the builder stages and the layer
# cache are removed at the end (the stand-in base and the wheel stay cached) unless --keep,
# which keeps them and stores the layer cache for warm rebuilds.
#
#   bash docker/check.sh [--keep] [--no-cache] [--steps N]
#
# Environment: FR_DOCKER_WORK (work folder: wheel, base tarball, outputs; default
# /var/tmp/fr_docker), FR_DOCKER_BASE (a base image to use instead of the stand-in),
# FR_DOCKER_STORAGE_DRIVER (default vfs: works everywhere, copies every layer),
# FR_DOCKER_CA (CA bundle the builds' pip trusts; default the host's), FR_DOCKER_TORCH_INDEX
# (where pip finds the CPU wheel if no local copy; default the PyTorch CPU index).
set -eEuo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -eE/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "docker/check.sh: $*" >&2; exit 2; }

# Without --keep no layer cache is stored (--layers=false: only the two images are written,
# and removed at the end); --keep stores it, for warm rebuilds.
keep=0 no_cache=() steps=20 layers=(--layers=false)
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1; layers=(--layers=true); shift ;;
    --no-cache) no_cache=(--no-cache); shift ;;
    --steps) steps="${2:?--steps needs a count}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || die "--steps $steps: write a positive count, e.g. 20"

work="${FR_DOCKER_WORK:-/var/tmp/fr_docker}"
base="${FR_DOCKER_BASE:-localhost/fr-standin-base:bookworm}"
driver="${FR_DOCKER_STORAGE_DRIVER:-vfs}"
ca="${FR_DOCKER_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
torch_index="${FR_DOCKER_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
torch_version="$(sed -n 's/.*FR_TORCH_VERSION:-\([0-9.]*\).*/\1/p' scripts/setup.sh)+cpu"
train_image=localhost/fr-trainer:check-train
eval_image=localhost/fr-trainer:check-eval
out="$work/out"
mkdir -p "$work/wheels"

podman_() { podman --storage-driver "$driver" "$@"; }
buildah_() { buildah --storage-driver "$driver" "$@"; }

images_before="" current="start" started=$SECONDS timings=() containers=()
trap 'echo "docker/check.sh: FAILED in step \"$current\" (line $LINENO, status $?)" >&2' ERR
cleanup() {
  local c
  for c in "${containers[@]}"; do buildah_ rm "$c" >/dev/null 2>&1 || true; done
  if [ "$keep" -eq 0 ] && [ -n "$images_before" ]; then
    # Both images and anything else this run stored (a builder stage).
    local new
    podman_ rmi -f "$train_image" "$eval_image" >/dev/null 2>&1 || true
    new="$(comm -13 <(echo "$images_before") <(podman_ images -a -q --no-trunc | sort -u))"
    # shellcheck disable=SC2086
    [ -z "$new" ] || podman_ rmi -f $new >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
step() {  # step NAME FUNCTION: runs it, prints and records its time
  current="$1"
  local t0=$SECONDS
  echo "== check.sh: $1"
  "$2"
  timings+=("$(printf '%-28s %5d s' "$1" $((SECONDS - t0)))")
  echo "== check.sh: $1: $((SECONDS - t0)) s"
}

install_tools() {
  local missing=()
  for tool in podman buildah mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  python3 -m pip --version >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip
  podman --version && buildah --version
}

stand_in_base() {
  if podman_ image exists "$base"; then
    echo "$base: cached"
    return
  fi
  [ "$base" = localhost/fr-standin-base:bookworm ] || die "FR_DOCKER_BASE=$base is not in the local storage; pull or import it first"
  # python3-venv: python:3.12-slim's python has venv; Ubuntu's gets it in the builder stage.
  mmdebstrap --variant=apt --include=python3,python3-venv,ca-certificates,libgomp1 \
    bookworm "$work/base.tar" http://deb.debian.org/debian
  podman_ import "$work/base.tar" "$base"
  rm -f "$work/base.tar"
}

torch_wheel() {
  if compgen -G "$work/wheels/torch-${torch_version}-cp311-*.whl" >/dev/null; then
    echo "torch $torch_version: cached in $work/wheels"
    return
  fi
  # The host's pip configuration applies (a local wheel folder, a mirror) before the index.
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 ${torch_index:+--extra-index-url "$torch_index"} \
    "torch==$torch_version" -d "$work/wheels"
}

build() {  # build NAME IMAGE [extra build args]; docker format: SHELL applies, as with docker build
  local name="$1" image="$2"; shift 2
  podman_ build --isolation chroot --format docker "${layers[@]}" "${no_cache[@]}" \
    --build-arg "BASE_IMAGE=$base" \
    --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_CERT=/run/host-ca.crt \
    --build-arg "FR_TORCH_VERSION=$torch_version" "$@" \
    -v "$work/wheels:/wheels:ro" -v "$ca:/run/host-ca.crt:ro" \
    --ignorefile "docker/Dockerfile.$name.dockerignore" -f "docker/Dockerfile.$name" -t "$image" .
}
build_train() { build train "$train_image"; }
# The PyTorch index is not needed (the wheel is mounted) and may not be reachable.
build_eval() { build eval "$eval_image" --build-arg PIP_EXTRA_INDEX_URL=; }

entrypoint_of() {
  podman_ image inspect --format '{{range .Config.Entrypoint}}{{.}} {{end}}' "$1"
}

# --hostname localhost: torchrun's rendezvous store advertises the hostname, and a chroot
# container's default one (its id) resolves nowhere.
run_in() {  # run_in CONTAINER ARGS...: buildah run with $out mounted at /workspace/out
  local c="$1"; shift
  buildah_ run --isolation chroot --hostname localhost --workingdir /workspace \
    -v "$out:/workspace/out" "$c" -- "$@"
}

train() {
  rm -rf "$out" && mkdir -p "$out"
  local c entry
  c="$(buildah_ from "$train_image")"; containers+=("$c")
  read -r -a entry <<<"$(entrypoint_of "$train_image")"
  [ "${entry[*]}" = /opt/fr_trainer/launch/torchrun.sh ] \
    || { echo "train image entrypoint is '${entry[*]}', expected /opt/fr_trainer/launch/torchrun.sh" >&2; return 1; }
  run_in "$c" fr-trainer synth out/synth --identities 24 --images-per-identity 8 \
    --holdout-identities 12 --pairs 100 --ijbc-subjects 0 --megaface-identities 0 \
    --workers 2 --no-progress
  run_in "$c" "${entry[@]}" --nproc-per-node 2 /opt/fr_trainer/configs/demo.toml \
    --set data.root=out/synth --set run.output_dir=out/runs --set "train.max_steps=$steps" \
    --set log.every_steps=5 --set 'eval.bins=["synth_val"]' 2>&1 | tee "$out/train.log"
  grep -q "world size 2" "$out/train.log" || { echo "the training log does not show 2 ranks" >&2; return 1; }
  grep -q "step $steps/$steps " "$out/train.log" || { echo "the training log does not reach step $steps" >&2; return 1; }
}

export_onnx() {
  run_in "${containers[0]}" fr-trainer export out/runs/demo out/model.onnx 2>&1 | tee "$out/export.log"
  [ -s "$out/model.onnx" ] || { echo "export wrote no $out/model.onnx" >&2; return 1; }
  chmod -R a+rX "$out"   # the eval image runs as uid 10001
}

verify() {
  local c entry
  c="$(buildah_ from "$eval_image")"; containers+=("$c")
  read -r -a entry <<<"$(entrypoint_of "$eval_image")"
  [ "${entry[*]}" = fr-trainer ] || { echo "eval image entrypoint is '${entry[*]}', expected fr-trainer" >&2; return 1; }
  buildah_ run --isolation chroot --hostname localhost --workingdir /workspace -v "$out:/data:ro" "$c" -- \
    "${entry[@]}" verify /data/model.onnx --bin /data/synth/synth_val.bin --quiet 2>&1 | tee "$out/verify.log"
  grep -Eq "synth_val: accuracy [0-9.]+" "$out/verify.log" || { echo "verify printed no accuracy" >&2; return 1; }
}

sizes() {
  local image
  for image in "$base" "$train_image" "$eval_image"; do
    printf '%-40s %8s MB\n' "$image" "$(( $(podman_ image inspect --format '{{.Size}}' "$image") / 1000000 ))"
  done | tee "$out/sizes.txt"
}

step "tools" install_tools
step "stand-in base" stand_in_base
step "torch wheel" torch_wheel
images_before="$(podman_ images -a -q --no-trunc | sort -u)"
step "build train image" build_train
step "build eval image" build_eval
step "train (2 ranks, $steps steps)" train
step "export onnx" export_onnx
step "verify (eval image)" verify
current="sizes"
echo "== check.sh: done in $((SECONDS - started)) s"
printf '%s\n' "${timings[@]}" | tee "$out/timings.txt"
sizes
echo "docker/check.sh: OK (outputs in $out)"
