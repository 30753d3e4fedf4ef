"""The pipeline's services, each a package with ``app.py`` (``smsbridge run <name>``)."""

# In start order: ``smsbridge run`` accepts these, ``smsbridge dev`` and the benchmarks start them.
SERVICES = ("ingress", "sender", "callbacks", "normalizer", "reporter", "campaigns")
