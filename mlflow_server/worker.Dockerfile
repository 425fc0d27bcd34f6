# GPU worker for Optuna trials: `python -m mrigen.tune` joining the study in the shared PostgreSQL and
# logging to the MLflow server. Build context is the repository root (docker-compose.yml, profile "gpu").
ARG PYTORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

WORKDIR /opt/mrigen
COPY pyproject.toml README.md* ./
COPY mrigen ./mrigen
COPY experiments ./experiments
# torch comes with the CUDA base image; install the package and its other dependencies.
RUN pip install --no-cache-dir . \
 && useradd --system --create-home --home-dir /home/worker worker
USER worker
WORKDIR /home/worker
ENTRYPOINT ["python", "-m", "mrigen.tune"]
