# Stand-in for postgres:17.6, built offline from Debian bookworm's PostgreSQL 15 with .ci/compose/postgres-entrypoint.sh
# (the parts of the official image's contract that docker-compose.yml uses).
ARG DEBIAN_IMAGE=mrigen-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV PG_MAJOR=15 PGDATA=/var/lib/postgresql/data LANG=C.UTF-8 \
    PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /docker-entrypoint-initdb.d "$PGDATA" && chown postgres:postgres "$PGDATA"
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /var/lib/postgresql/data
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
