"""Kafka machinery: clients, the poll/process/commit runner, process lifecycle, changelog-backed
state, the outbox and unit of work, timers, lag, and the embedded broker."""
