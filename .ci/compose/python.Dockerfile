# Stand-in for python:3.11-slim, built offline: Debian bookworm's CPython 3.11 (debootstrap + docker import) with a
# wheelhouse, so `pip install` in mlflow_server/Dockerfile works unchanged with no index (PIP_NO_INDEX).
ARG DEBIAN_IMAGE=mrigen-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
COPY wheels/ /opt/wheels/
ENV LANG=C.UTF-8 PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels PIP_DISABLE_PIP_VERSION_CHECK=1
CMD ["python3"]
