# edge-sdk runtime: no torch, the shipped default model baked in, `edge-sdk` as entry point.
# Multi-arch (linux/arm64 for Raspberry Pi OS 64-bit and other ARM boards, linux/amd64):
#   docker buildx build --platform linux/arm64,linux/amd64 -f docker/runtime.Dockerfile -t edge-sdk .
# The wheels are those CI installs in its emulated aarch64 stage (docker/requirements-runtime.txt)
# and the image's check is the command CI runs there: `edge-sdk selftest`. CI builds this file
# unchanged for both platforms and runs selftest inside each image (tests/docker/stage.sh).
#
# Offline, or behind a mirror: pip's own settings go in as build arguments, e.g.
#   --build-arg PIP_INDEX_URL=https://mirror.example/simple
#   --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels   (a folder of wheels mounted
#   into the build: `podman build -v DIR:/wheels:ro`, as CI does). Unset, pip uses PyPI.

FROM python:3.11-slim-bookworm AS build
ARG PIP_INDEX_URL PIP_NO_INDEX PIP_FIND_LINKS
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_sdk ./edge_sdk
COPY converters ./converters
COPY models/shapes/bundle ./models/shapes/bundle
COPY models/shapes-lcm/bundle ./models/shapes-lcm/bundle
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ARG PIP_INDEX_URL PIP_NO_INDEX PIP_FIND_LINKS
LABEL org.opencontainers.image.title="edge-sdk runtime" \
      org.opencontainers.image.description="Torch-free text-to-image runtime with the shipped shapes model"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The dependencies first, in a layer of their own that a change to edge-sdk's code keeps.
# --only-binary: a dependency without a wheel for this platform fails the build instead of
# compiling for an hour on a board. LiteRT comes too (TFLite bundles, --backend tflite).
# `edge-sdk serve` comes too (pure Python: Starlette, uvicorn on h11).
COPY docker/requirements-runtime.txt docker/requirements-tflite.txt docker/requirements-serve.txt /tmp/
RUN pip install --no-cache-dir --only-binary=:all: -r /tmp/requirements-runtime.txt \
    -r /tmp/requirements-tflite.txt -r /tmp/requirements-serve.txt \
 && rm /tmp/requirements-runtime.txt /tmp/requirements-tflite.txt /tmp/requirements-serve.txt
COPY docker/entrypoint.sh /usr/local/bin/edge-sdk-entrypoint
# The image starts as root only so that its entry point can hand an empty, root-owned /out
# (what `docker run -v "$PWD/out:/out"` makes of a missing folder) to the user `edge`
# (uid 1000) and run edge-sdk as `edge`; with --user, edge-sdk runs as that user
# (docker/entrypoint.sh). The wheel is mounted, not copied: no layer keeps a second copy.
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && useradd --create-home --uid 1000 edge \
 && mkdir -p /out && chown edge:edge /out
WORKDIR /out
# `docker run -p 7860:7860 IMAGE serve --host 0.0.0.0 --api-key-file /run/secrets/key`
EXPOSE 7860
ENTRYPOINT ["edge-sdk-entrypoint"]
CMD ["generate", "a red circle on a blue background", "-o", "/out/out.png"]
