"""The message contract every service shares: event schemas, topics, statuses, ids, numbers and
text, opt-out keywords, campaign controls, and Optimove's bodies and signatures."""
