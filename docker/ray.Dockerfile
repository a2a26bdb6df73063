# syntax=docker/dockerfile:1
#
# DePass Serve for Ray clusters: the service image (docker/Dockerfile) plus Ray (the `ray`
# extra: Ray Data and Ray Serve) and the packages that run on it, depass_ray (the Ray Serve
# deployment) and depass_batch (`depass-batch --ray`). The image of deploy/rayservice.yaml
# (KubeRay) and of every node of a cluster. Build from the repository root, after the
# service image:
#
#   docker build -f docker/Dockerfile -t depass-serve:latest .
#   docker build -f docker/ray.Dockerfile -t depass-serve:ray .
#
# KubeRay runs `ray start` in the container itself, so the image has no entrypoint of its own.

ARG BASE_IMAGE=depass-serve:latest
FROM ${BASE_IMAGE}

USER 0
# The ray extra's dependencies (pyproject.toml), in a layer that code changes do not
# invalidate: installed from empty package folders, the project itself then removed.
# (DL3013: the ranges are pyproject.toml's; set PIP_CONSTRAINT to lock them.)
WORKDIR /src
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir engine service depass_batch depass_ray \
    && pip install --no-cache-dir ".[ray]" \
    && pip uninstall --yes depass-serve \
    && rm -rf /src

COPY depass_batch/ /app/depass_batch/
COPY depass_ray/ /app/depass_ray/
RUN chmod -R a+rX,go-w /app/depass_batch /app/depass_ray

WORKDIR /app
USER 10001:10001
ENTRYPOINT []
