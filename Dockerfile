# One image for every sms-bridge service, operator command and simulator:
#   docker run sms-bridge --config /etc/smsbridge/smsbridge.toml run sender
# (or set SMSBRIDGE_CONFIG and pass only `run sender`). Apache Kafka is external; the embedded
# broker of `smsbridge dev` is not installed here.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY tools ./tools
COPY simulators ./simulators
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/smsbridge --create-home smsbridge
USER smsbridge
WORKDIR /var/lib/smsbridge
# Services stop gracefully on SIGTERM within runner.shutdown_deadline_s (default 20 s): give the
# container runtime's grace period more than that (compose stop_grace_period, k8s
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["smsbridge"]
CMD ["--help"]
