# The Python base Beam's Dockerfile builds FROM in the test cluster (--build-arg
# PYTHON_IMAGE=localhost/beam-python:3.11): Debian 12's Python 3.11 instead of the public
# python:3.11-slim, which lives in an image registry this machine cannot reach. It offers what
# the Dockerfile uses: `python`, `python -m pip`, `python -m venv`, groupadd/useradd.
FROM localhost/debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip python-is-python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
ENV LANG=C.UTF-8
