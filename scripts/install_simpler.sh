#!/usr/bin/env bash
# Install the real SIMPLER (SimplerEnv + ManiSkill2_real2sim) into a venv of its own, with the
# adapter/evaluation side of this project (no torch), and, on a machine without an NVIDIA GPU, a
# software Vulkan (Mesa 25 lavapipe + a small layer) that SAPIEN 2.2.2 can render with.
#
#   scripts/install_simpler.sh                         # sources from upstream git (pinned commits)
#   scripts/install_simpler.sh --from ../shared/third_party/simpler   # local tarballs or folders
#   scripts/install_simpler.sh --from /src/SimplerEnv --from /src/ManiSkill2_real2sim
#
# Options: --dir DIR (default <repo>/.venv-simpler), --python PY (3.10/3.11; default: the first
# found), --vulkan auto|cpu|system (auto: cpu when `nvidia-smi -L` finds no GPU).
# Everything lands in DIR: the venv, src/ (unpacked sources), vulkan/ (lavapipe, layer, ICD) and
# DIR/simpler-env.sh, which sets the Vulkan variables: `. DIR/simpler-env.sh` before using it.
# Re-runs skip every step whose inputs did not change (stamps in DIR/.stamps). Prints timings.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$REPO/.venv-simpler"
PY=""
VULKAN=auto
FROM=()
SIMPLER_REPO=https://github.com/simpler-env/SimplerEnv
SIMPLER_COMMIT=4ab7178e83e84ee06894034ec6dbf9e7aad1e882     # its submodule ManiSkill2_real2sim: ef7a4d4
MESA_PKGS=(mesa-vulkan-drivers=25.0.7-2~bpo12+1 libdrm2=2.4.123-1~bpo12+1 libdrm-amdgpu1=2.4.123-1~bpo12+1)
PIP_PINS=(numpy==1.24.4 sapien==2.2.2 "gymnasium>=0.28.1,<1.0")
# The project's SIMPLER-side imports (adapter, evaluation harness, websocket client): no torch.
LIGHT_DEPS=(hydra-core omegaconf tqdm "matplotlib<3.10" "contourpy<1.3.3" imageio imageio-ffmpeg msgpack
            websockets pillow safetensors)
LAYER_NAME=VK_LAYER_SELFFLOW_drop_missing_device_extensions

while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --from) FROM+=("$2"); shift 2 ;;
    --vulkan) VULKAN="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install_simpler.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR/.stamps"
DIR="$(cd "$DIR" && pwd)"
T_ALL=$(date +%s.%N)
step_t() { T0=$(date +%s.%N); }
step_done() { printf '[install_simpler] %-34s %6.1f s\n' "$1" "$(echo "$(date +%s.%N) - $T0" | bc)"; }
die() { echo "install_simpler.sh: $*" >&2; exit 1; }
# stamp NAME CONTENT: true when DIR/.stamps/NAME already holds CONTENT (the step can be skipped)
stamp_ok() { [ -f "$DIR/.stamps/$1" ] && [ "$(cat "$DIR/.stamps/$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" > "$DIR/.stamps/$1"; }
command -v bc >/dev/null || bc() { python3 -c "import sys; print(eval(sys.stdin.read()))"; }

# -- 1. Python 3.10/3.11 -------------------------------------------------------------------------
step_t
if [ -z "$PY" ]; then
  for c in python3.11 python3.10 "$HOME"/.pyenv/versions/3.11*/bin/python3.11 "$HOME"/.pyenv/versions/3.10*/bin/python3.10; do
    if command -v "$c" >/dev/null 2>&1; then PY="$(command -v "$c")"; break; fi
  done
fi
[ -n "$PY" ] || die "no Python 3.10/3.11 found (sapien 2.2.2 has no wheel for 3.12+); pass --python PATH"
PYV="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$PYV" in 3.10|3.11) ;; *) die "$PY is Python $PYV; SIMPLER needs 3.10 or 3.11 (sapien 2.2.2 wheels)";; esac

# -- 2. sources: SimplerEnv and ManiSkill2_real2sim ----------------------------------------------
SRC_SIMPLER="" SRC_MS2=""
mkdir -p "$DIR/src"
unpack() {  # unpack a tarball into DIR/src once per (name, size); echo the folder it made
  local tgz="$1" key top
  key="$(basename "$tgz"):$(stat -c %s "$tgz")"
  top="$(tar tzf "$tgz" | head -1 | cut -d/ -f1)"
  if ! stamp_ok "src-$top" "$key" || [ ! -d "$DIR/src/$top" ]; then
    rm -rf "${DIR:?}/src/$top"
    tar xzf "$tgz" -C "$DIR/src"
    stamp_set "src-$top" "$key"
  fi
  echo "$DIR/src/$top"
}
pick() {  # classify a source folder
  if [ -f "$1/mani_skill2_real2sim/__init__.py" ]; then SRC_MS2="$1"
  elif [ -f "$1/simpler_env/__init__.py" ]; then SRC_SIMPLER="$1"
    if [ -f "$1/ManiSkill2_real2sim/mani_skill2_real2sim/__init__.py" ] && [ -z "$SRC_MS2" ]; then
      SRC_MS2="$1/ManiSkill2_real2sim"; fi
  else die "$1 is neither a SimplerEnv nor a ManiSkill2_real2sim source folder"; fi
}
for f in "${FROM[@]}"; do
  [ -e "$f" ] || die "--from $f: no such file or folder"
  f="$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"
  tarballs=()
  if [ -d "$f" ]; then for t in "$f"/*.tgz "$f"/*.tar.gz; do if [ -e "$t" ]; then tarballs+=("$t"); fi; done; fi
  if [ ${#tarballs[@]} -gt 0 ]; then   # a folder of tarballs
    for t in "${tarballs[@]}"; do pick "$(unpack "$t")"; done
  elif [ -d "$f" ]; then pick "$f"
  else pick "$(unpack "$f")"; fi
done
if [ ${#FROM[@]} -eq 0 ]; then
  if ! stamp_ok src-git "$SIMPLER_COMMIT" || [ ! -d "$DIR/src/SimplerEnv/.git" ]; then
    command -v git >/dev/null || die "git is needed to fetch SimplerEnv (or pass --from with local sources)"
    rm -rf "$DIR/src/SimplerEnv"
    git clone -q "$SIMPLER_REPO" "$DIR/src/SimplerEnv"
    git -C "$DIR/src/SimplerEnv" checkout -q "$SIMPLER_COMMIT"
    git -C "$DIR/src/SimplerEnv" submodule update -q --init --recursive
    stamp_set src-git "$SIMPLER_COMMIT"
  fi
  pick "$DIR/src/SimplerEnv"
fi
[ -n "$SRC_SIMPLER" ] || die "no SimplerEnv source found (pass --from with SimplerEnv-*.tgz or its folder)"
[ -n "$SRC_MS2" ] || die "no ManiSkill2_real2sim source found (SimplerEnv's submodule; pass it with --from)"
step_done "sources"

# -- 3. the venv -----------------------------------------------------------------------------------
step_t
[ -x "$DIR/bin/python" ] || "$PY" -m venv "$DIR"
VPY="$DIR/bin/python"
PIP_KEY="$PYV|${PIP_PINS[*]}|${LIGHT_DEPS[*]}|$SRC_MS2|$SRC_SIMPLER|$REPO|$(sha1sum "$REPO/pyproject.toml" | cut -c1-12)"
if ! stamp_ok pip "$PIP_KEY"; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
  "$VPY" -m pip install -q --no-compile "${PIP_PINS[@]}" -e "$SRC_MS2" -e "$SRC_SIMPLER" "${LIGHT_DEPS[@]}" pytest
  "$VPY" -m pip install -q --no-deps -e "$REPO"
  # A later package may have pulled numpy 2 in: put the pin back (SAPIEN and the envs need < 2).
  "$VPY" -m pip install -q "${PIP_PINS[@]}"
  stamp_set pip "$PIP_KEY"
fi
step_done "venv + pip ($("$VPY" -c 'import numpy, gymnasium; print("numpy", numpy.__version__, "gymnasium", gymnasium.__version__)'))"

# Stage meshes absent upstream may have been replaced by symlinks to another stage: say so.
for s in "$SRC_MS2"/data/hab2_bench_assets/stages/*.glb; do
  [ -L "$s" ] && echo "[install_simpler] note: $(basename "$s") is a stand-in (symlink to $(readlink "$s")), not the upstream stage mesh"
done

# -- 4. Vulkan ------------------------------------------------------------------------------------
ENV_SH="$DIR/simpler-env.sh"
if [ "$VULKAN" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then VULKAN=system; else VULKAN=cpu; fi
fi
if [ "$VULKAN" = system ]; then
  echo "# NVIDIA (or system) Vulkan: nothing to set" > "$ENV_SH"
elif [ "$VULKAN" = cpu ]; then
  step_t
  VK="$DIR/vulkan"
  mkdir -p "$VK"
  # Loader and headers (libvulkan1, libvulkan-dev) from the system's own suite.
  if ! dpkg -s libvulkan1 libvulkan-dev >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libvulkan1 libvulkan-dev >/dev/null
    else
      die "needs the Vulkan loader and headers: sudo apt-get install libvulkan1 libvulkan-dev (other distros: vulkan-loader + vulkan-headers)"
    fi
  fi
  # Mesa 25 lavapipe from bookworm-backports, through a private apt state: the system is not changed.
  MESA_KEY="${MESA_PKGS[*]}"
  if ! stamp_ok mesa "$MESA_KEY" || [ ! -f "$VK/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so" ]; then
    A="$VK/apt"
    mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$VK/debs"
    echo "deb http://deb.debian.org/debian bookworm-backports main" > "$A/sources.list"
    APT=(-o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts=/nonexistent
         -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
    apt-get -qq "${APT[@]}" update
    (cd "$VK/debs" && apt-get -qq "${APT[@]}" download "${MESA_PKGS[@]}")
    rm -rf "$VK/root"
    for d in "$VK"/debs/*.deb; do dpkg-deb -x "$d" "$VK/root"; done
    stamp_set mesa "$MESA_KEY"
  fi
  LIB="$VK/root/usr/lib/x86_64-linux-gnu"
  cat > "$VK/lvp_icd.json" <<EOF
{"file_format_version": "1.0.0", "ICD": {"library_path": "$LIB/libvulkan_lvp.so", "api_version": "1.4.305"}}
EOF
  # The layer that drops VK_KHR_external_semaphore_fd (see its source for why).
  SRC_C="$REPO/scripts/simpler_cpu/vk_drop_missing_ext_layer.c"
  LAYER_KEY="$(sha1sum "$SRC_C" | cut -c1-16)"
  if ! stamp_ok layer "$LAYER_KEY" || [ ! -f "$VK/layer/libvk_drop_missing_ext_layer.so" ]; then
    mkdir -p "$VK/layer"
    gcc -shared -fPIC -O2 -Wall -o "$VK/layer/libvk_drop_missing_ext_layer.so" "$SRC_C" -lpthread
    stamp_set layer "$LAYER_KEY"
  fi
  cat > "$VK/layer/$LAYER_NAME.json" <<EOF
{"file_format_version": "1.1.0",
 "layer": {"name": "$LAYER_NAME", "type": "GLOBAL", "library_path": "./libvk_drop_missing_ext_layer.so",
           "api_version": "1.3.239", "implementation_version": "1",
           "description": "drops device extensions the physical device lacks (selfflow-robot, for SAPIEN on lavapipe)",
           "device_extensions": [{"name": "VK_KHR_external_semaphore_fd", "spec_version": "1",
                                  "entrypoints": ["vkImportSemaphoreFdKHR", "vkGetSemaphoreFdKHR"]}]}}
EOF
  missing="$(LD_LIBRARY_PATH="$LIB" ldd "$LIB/libvulkan_lvp.so" | grep 'not found' || true)"
  [ -z "$missing" ] || die "lavapipe needs libraries this system lacks (install them: on Debian 12 apt-get install libllvm15 libx11-xcb1 libxcb-dri3-0 libxcb-present0 libxcb-shm0 libxshmfence1 libwayland-client0 libzstd1 libsensors5):
$missing"
  cat > "$ENV_SH" <<EOF
# Software Vulkan for SAPIEN: Mesa 25 lavapipe + the layer that drops VK_KHR_external_semaphore_fd.
export VK_ICD_FILENAMES="$VK/lvp_icd.json"
export LD_LIBRARY_PATH="$LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export VK_LAYER_PATH="$VK/layer"
export VK_INSTANCE_LAYERS="$LAYER_NAME"
EOF
  step_done "software Vulkan (lavapipe + layer)"
else
  die "--vulkan must be auto, cpu or system, got '$VULKAN'"
fi

# -- 5. smoke: SAPIEN's renderer comes up ---------------------------------------------------------
step_t
SMOKE_KEY="$PIP_KEY|$VULKAN|$(cat "$ENV_SH" | sha1sum | cut -c1-12)"
if ! stamp_ok smoke "$SMOKE_KEY"; then
  (. "$ENV_SH"; "$VPY" -c "import mani_skill2_real2sim.envs, simpler_env, selfflow_robot.envs.simpler
import sapien.core as s; s.SapienRenderer(offscreen_only=True); print('[install_simpler] SAPIEN renderer: ok')") \
    || die "the SIMPLER venv does not import, or SAPIEN cannot create its Vulkan renderer (see above)"
  stamp_set smoke "$SMOKE_KEY"
fi
step_done "renderer smoke test"
printf '[install_simpler] done in %.1f s: %s (Python %s); before use: . %s\n' \
  "$(echo "$(date +%s.%N) - $T_ALL" | bc)" "$DIR" "$PYV" "$ENV_SH"
