# A taskq image for the examples (docker-compose.yml builds it as the worker service).
FROM python:3.12-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY taskq ./taskq
RUN pip install --no-cache-dir .
COPY examples ./examples

# Never run tasks as root.
RUN useradd --create-home taskq
USER taskq

WORKDIR /app/examples/quickstart
CMD ["taskq", "worker", "-A", "tasks:app", "-c", "2"]
