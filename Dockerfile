# syntax=docker/dockerfile:1
#
# One image for all of Beam: `beam serve` (the enforcement service, the default command),
# `beam operator` (the Kopf operator) and `beam migrate` (SQL migrations, then exit).
#
# The builder stage turns the repository into a wheel (hatchling compiles proto/ with
# grpcio-tools; lua/ and migrations/ ship inside the wheel) and installs it into a venv.
# The final stage gets only that venv: no compilers, no pip, no sources, a non-root user, and
# no `beam dev` (the beam_dev package: a laptop tool that runs Redis and PostgreSQL itself).
# Runtime dependencies are installed from wheels only (--only-binary), so a dependency that
# would need a compiler fails the build instead of sneaking one in.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Build inputs only, least-changing first, so edits to code keep the earlier layers cached.
COPY pyproject.toml hatch_build.py README.md ./
COPY proto/ proto/
COPY lua/ lua/
COPY migrations/ migrations/
COPY service/ service/
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --only-binary=:all: /dist/beam-*.whl \
 && /opt/venv/bin/python -c "import beam_dev, pathlib, shutil; shutil.rmtree(pathlib.Path(beam_dev.__file__).parent)" \
 && /opt/venv/bin/beam --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="beam" \
      org.opencontainers.image.description="Real-time enforcement of AI spending limits: service, operator and migrations" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# uid/gid 10001: above every system range, and the chart's runAsUser.
RUN groupadd --system --gid 10001 beam \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin beam
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
# 8080: REST, /health, /ready, /metrics. 9090: gRPC. (The operator's metrics port, 9100,
# is set by BEAM_METRICS_PORT.) No HEALTHCHECK: Kubernetes probes do that job.
EXPOSE 8080 9090
ENTRYPOINT ["beam"]
CMD ["serve"]
