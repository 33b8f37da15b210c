# The h3d daemon. GPU access is opt-in in docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY h3d ./h3d
COPY h3client ./h3client
COPY h3optim ./h3optim
COPY migrations ./migrations
RUN pip install --no-cache-dir ".[nvidia,postgres]"
ENV H3D_DATA_DIR=/data
VOLUME /data
EXPOSE 8421
# Inside a container the daemon must bind all interfaces; docker-compose publishes the port on
# the host's loopback only, and every /v1 request still needs the token in /data/token.
CMD ["h3d", "serve", "--host", "0.0.0.0", "--port", "8421"]
