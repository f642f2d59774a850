#!/usr/bin/env bash
# Run HERE (a networked dev machine), once per session, before a GPU job: fills the git-ignored
# .whl/ (wheels the GPU image lacks, for its Python 3.12), .gl/ (EGL loader packages for MuJoCo's
# headless rendering in the study) and .gpu/ (the shared plain reference).
# Then carry [".whl", ".gpu", ".gl"] and start the GPU command with scripts/gpu_bench.sh's install line.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
grep -qx '/.gl/' .git/info/exclude || echo /.gl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl .gpu
cp ../shared/bench/reference_dit.py .gpu/ 2>/dev/null || echo "no ../shared/bench/reference_dit.py: the train stage runs without the reference"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
# hydra/omegaconf (configs), websockets (policy server); gymnasium, mujoco, metaworld (+ their
# needs missing there) for the study's demos and rollouts. torch, numpy, msgpack, safetensors,
# einops, imageio, tqdm, matplotlib, scipy are in the image; wandb is not needed (logger=none).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 websockets==15.0.1 gymnasium==1.2.0 farama-notifications==0.0.6 \
  mujoco==3.3.0 glfw==2.11.0 pyopengl==3.1.10 metaworld==3.1.1
# diffusers' AutoencoderKL (the SD-VAE) for the latents stage, with what it imports
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  diffusers==0.42.1 huggingface-hub==2.4.0 hf-xet==1.8.0 regex==2026.12.2 httpx2 click importlib-metadata zipp \
  || echo "could not fetch diffusers: the latents stage measures the cached-latent step only"
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI
du -sh .whl
# EGL loaders (x86-64 Debian packages): the GPU image has the NVIDIA driver but not libEGL.so.1.
mkdir -p .gl /tmp/amd64/partial
apt_o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
apt-get "${apt_o[@]}" update >/dev/null && (cd .gl && apt-get "${apt_o[@]}" download libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null) \
  || echo "could not fetch the EGL packages into .gl/: the study stage may not render"
du -sh .gl
