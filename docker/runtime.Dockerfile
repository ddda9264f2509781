# edge-sdk runtime: no torch, the shipped default model baked in, `edge-sdk` as entry point.
# Multi-arch (linux/arm64 for Raspberry Pi OS 64-bit and other ARM boards, linux/amd64):
#   docker buildx build --platform linux/arm64,linux/amd64 -f docker/runtime.Dockerfile -t edge-sdk .
# The wheels are those CI installs in its emulated aarch64 stage (docker/requirements-runtime.txt)
# and the image's check is the command CI runs there: `edge-sdk selftest`.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_sdk ./edge_sdk
COPY converters ./converters
COPY models/shapes/bundle ./models/shapes/bundle
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="edge-sdk runtime" \
      org.opencontainers.image.description="Torch-free text-to-image runtime with the shipped shapes model"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements-runtime.txt docker/requirements-tflite.txt /tmp/
COPY --from=build /wheels /wheels
# --only-binary: a dependency without a wheel for this platform fails the build instead of
# compiling for an hour on a board. LiteRT comes too (TFLite bundles, --backend tflite).
RUN pip install --no-cache-dir --only-binary=:all: -r /tmp/requirements-runtime.txt \
    -r /tmp/requirements-tflite.txt \
 && pip install --no-cache-dir --no-deps /wheels/*.whl \
 && rm -rf /wheels /tmp/requirements-runtime.txt /tmp/requirements-tflite.txt \
 && useradd --create-home --uid 1000 edge
USER 1000
WORKDIR /out
ENTRYPOINT ["edge-sdk"]
CMD ["generate", "a red circle on a blue background", "-o", "/out/out.png"]
