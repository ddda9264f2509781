# edge-convert for workstations (x86-64 or arm64): torch CPU, diffusers, onnx.
#   docker build -f docker/convert.Dockerfile -t edge-convert .
#   docker run --rm -v "$PWD:/work" edge-convert /work/my-checkpoint -o /work/bundle --precision int8
#   (as yourself: add --user "$(id -u):$(id -g)", so the bundle is yours on the host)
# torch comes from its CPU index, pinned, before anything that depends on it, so pip never
# pulls a multi-GB CUDA build. Offline or behind a mirror: pip's settings as build arguments,
# as for runtime.Dockerfile. A PIP_INDEX_URL mirror serves everything but torch, which comes
# from the index its line names; with PIP_NO_INDEX=1, torch comes from PIP_FIND_LINKS too.
# tests/bench/docker_convert.sh builds this file offline and converts a tiny checkpoint in it.

FROM python:3.11-slim-bookworm
ARG PIP_INDEX_URL PIP_NO_INDEX PIP_FIND_LINKS
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 HOME=/tmp
WORKDIR /src
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY docker/requirements-runtime.txt docker/requirements-convert.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements-convert.txt
COPY pyproject.toml README.md ./
COPY edge_sdk ./edge_sdk
COPY converters ./converters
COPY models/shapes/bundle ./models/shapes/bundle
COPY models/shapes-lcm/bundle ./models/shapes-lcm/bundle
RUN pip install --no-cache-dir --no-deps . \
 && useradd --create-home --uid 1000 edge
USER 1000
WORKDIR /work
ENTRYPOINT ["edge-convert"]
CMD ["--help"]
