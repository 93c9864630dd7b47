# PostgreSQL 15 from Debian 12's packages, standing in for the chart's TimescaleDB image in the
# test cluster (TimescaleDB is in no registry this machine reaches; Beam's migrations work with
# and without the extension). It behaves like the docker-library postgres image the TimescaleDB
# image is built on, as far as the chart uses it: the entrypoint takes `postgres -c ...` as its
# arguments, initialises PGDATA on first start from POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB,
# runs /docker-entrypoint-initdb.d/*.sh once, and the server runs as uid/gid 70 (the image's
# postgres user there).
FROM localhost/debian:bookworm
RUN mkdir -p /etc/postgresql-common \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupmod -g 70 postgres && usermod -u 70 -g 70 postgres \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql /docker-entrypoint-initdb.d \
 && chown -R 70:70 /var/lib/postgresql /var/run/postgresql
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PGDATA=/var/lib/postgresql/data
USER 70:70
ENTRYPOINT ["/bin/sh", "/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
