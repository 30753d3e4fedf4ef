"""The ``smsbridge`` command line (``cli.py``) and the operator tools it runs, one per command."""
