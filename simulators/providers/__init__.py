"""Provider simulator: a real HTTP server that speaks the SMS providers' documented protocols.

One module per provider API (``otpiq``, ``opensms``, ``octopush``: validation as the real API
does, the documented answers, the callbacks the real provider would make); ``server`` owns what
they share (latency, injected faults, the outcome mix, callback delivery with retries, the record
of every accepted send); ``control`` serves ``/_simulator/*``; ``command`` is ``smsbridge simulate
providers``. Callback URLs, control endpoints and deviations: docs/simulators.md.
"""

from simulators.providers.command import (
    DEFAULT_LISTEN,
    add_arguments,
    callback_urls_from_args,
    callback_urls_from_settings,
    cli,
    options_from_args,
)
from simulators.providers.control import CONTROL_PREFIX, ReplyError
from simulators.providers.octopush import OctopushProtocol
from simulators.providers.opensms import OpenSmsProtocol
from simulators.providers.options import OptionsError, SimulatorOptions
from simulators.providers.otpiq import OtpiqProtocol
from simulators.providers.protocol import AcceptedSend, CallbackDelivery, PlannedCallback
from simulators.providers.server import ProviderSimulator

__all__ = [
    "CONTROL_PREFIX",
    "DEFAULT_LISTEN",
    "AcceptedSend",
    "CallbackDelivery",
    "OctopushProtocol",
    "OpenSmsProtocol",
    "OptionsError",
    "OtpiqProtocol",
    "PlannedCallback",
    "ProviderSimulator",
    "ReplyError",
    "SimulatorOptions",
    "add_arguments",
    "callback_urls_from_args",
    "callback_urls_from_settings",
    "cli",
    "options_from_args",
]
