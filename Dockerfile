# One image for every sms-bridge service, operator command and simulator:
#   docker run sms-bridge --config /etc/smsbridge/smsbridge.toml run sender
# (or set SMSBRIDGE_CONFIG and pass only `run sender`). Apache Kafka is external; the embedded
# broker of `smsbridge dev` is not installed here.
FROM python:3.11-slim AS build
WORKDIR /src
# Every dependency at the version and hash requirements.lock pins (`make lock` rewrites it from
# pyproject.toml's ranges), then the project itself without resolving anything again.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --prefix=/install -r requirements.lock
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY tools ./tools
COPY simulators ./simulators
RUN pip install --no-cache-dir --no-deps --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
# A numeric USER, so that Kubernetes' runAsNonRoot can check it; the pods run as the same UID.
RUN groupadd --system --gid 10001 smsbridge && \
    useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/smsbridge --create-home smsbridge
USER 10001:10001
WORKDIR /var/lib/smsbridge
# Services stop gracefully on SIGTERM within runner.shutdown_deadline_s (default 20 s): give the
# container runtime's grace period more than that (compose stop_grace_period, k8s
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["smsbridge"]
CMD ["--help"]
