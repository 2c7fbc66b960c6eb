# metalkube-controller image. Build from the repository root:
#   docker build -t ghcr.io/metalkube/metalkube-controller:0.1.0 .
#
# No container runtime exists where the project's tests run, so this file is never built in CI;
# the tests only lint it (hadolint). It is kept to two plain stages so it can be trusted by
# reading: a pinned Rust toolchain compiles the locked workspace, and a distroless runtime holds
# nothing but the binary and the C runtime it links against (glibc, libgcc).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace: cargo needs every member's manifest to resolve the lock file, and the
# proto crate compiles proto/ in its build script (protox, so no protoc is installed).
COPY . .
RUN cargo build --release --locked -p metalkube-controller \
    && install -m 0755 target/release/metalkube-controller /usr/local/bin/metalkube-controller

# "nonroot" runs as uid/gid 65532, matching the chart's securityContext (runAsNonRoot needs a
# numeric USER to verify).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/metalkube-controller /usr/local/bin/metalkube-controller
USER 65532:65532
# /metrics, /healthz, /readyz (--listen).
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/metalkube-controller"]
