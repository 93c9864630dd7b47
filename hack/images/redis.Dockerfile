# Redis and Sentinel from Debian 12's packages, for the chart's redis.image and
# redis.sentinel.image in the test cluster. The chart brings its own scripts (a ConfigMap run with
# /bin/sh) and runs them as uid 999 / gid 1000 with a read-only root, so the image needs only the
# binaries and the tools the scripts call (redis-cli, timeout, sed, hostname).
FROM localhost/debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      redis-server redis-sentinel redis-tools \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && mkdir -p /data && chown 999:1000 /data
WORKDIR /data
CMD ["redis-server"]
