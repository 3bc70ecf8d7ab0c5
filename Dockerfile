# The meshauth image for users with Docker (without Docker: scripts/images writes the same
# image as a tarball). Same paths as scripts/images: /usr/local/bin/{meshauth-agent,
# meshauth-cni,meshauth-operator,meshauth-webhook,meshauthctl}.
#
#   docker build -t docker.io/meshauth/meshauth:0.1.0 .
#
# The tag is the chart's default image (appVersion of config/helm/meshauth/Chart.yaml).

# --- build: the workspace's binaries; the datapath's TC programs are compiled with clang
FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        clang llvm libbpf-dev linux-libc-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && for b in meshauth-agent meshauth-cni meshauth-operator meshauth-webhook meshauthctl; do \
        install -m 0755 "target/release/$b" "/out/$b" || exit 1; \
    done

# --- runtime: glibc from the same Debian release the binaries were linked against
FROM docker.io/library/debian:bookworm-slim
COPY --from=build /out/ /usr/local/bin/
RUN mkdir -p /var/lib/meshauth
CMD ["/usr/local/bin/meshauthctl", "--help"]
