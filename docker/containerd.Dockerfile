# A containerd that serves only its Unix socket, for the compose file's integration tests.
# The config is generated at build time by the same code EmbeddedContainerd uses, for the
# containerd version the image actually installed.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        containerd \
        python3 \
    && rm -rf /var/lib/apt/lists/*

COPY pyctrd_cache/daemon_config.py /usr/local/lib/pyctrd-cache/daemon_config.py

RUN mkdir -p /etc/containerd \
    && python3 /usr/local/lib/pyctrd-cache/daemon_config.py \
        --version-output "$(containerd --version)" \
        --root /var/lib/containerd \
        --state /run/containerd \
        --address /run/containerd/containerd.sock \
        > /etc/containerd/config.toml \
    && cat /etc/containerd/config.toml

# Snapshots must not live on the container's own overlay root (overlay on overlay fails):
# without a mounted volume, at least an anonymous one.
VOLUME ["/var/lib/containerd"]

HEALTHCHECK --interval=2s --timeout=5s --start-period=5s --retries=30 \
    CMD ["ctr", "--address", "/run/containerd/containerd.sock", "version"]

CMD ["containerd", "--config", "/etc/containerd/config.toml"]
