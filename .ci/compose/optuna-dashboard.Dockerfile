# Stand-in for ghcr.io/optuna/optuna-dashboard:v0.19.0, built offline from the python stand-in and its wheelhouse;
# same packages (optuna-dashboard, psycopg2-binary, gunicorn) and the same entrypoint as the official image.
ARG PYTHON_IMAGE=mrigen-local/python:3.11-slim
FROM ${PYTHON_IMAGE}
RUN pip install --no-cache-dir optuna-dashboard==0.19.0 psycopg2-binary gunicorn && mkdir /app
WORKDIR /app
EXPOSE 8080
ENTRYPOINT ["optuna-dashboard", "--port", "8080", "--host", "0.0.0.0", "--server", "gunicorn"]
