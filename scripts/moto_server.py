"""Starts moto's server with one fix for the fleet's local stack.

moto 5.2.5 takes an event bus's name as the part of a name or ARN after its last '/', so a
partner event bus (named after its partner event source, `aws.partner/shopify.com/<id>/<name>`)
can be created but no rule can be put on it nor event sent to it. EventBridge itself accepts
the full name or the bus's ARN. This keeps everything after `event-bus/` in an ARN, and a plain
name whole; nothing else of moto changes.
"""

import sys

from moto.events import models
from moto.server import main


def _normalize_event_bus_arn(self, event_bus_arn):
    if event_bus_arn is None:
        return "default"
    if event_bus_arn.startswith("arn:"):
        return event_bus_arn.split(":event-bus/", 1)[-1]
    return event_bus_arn


models.EventsBackend._normalize_event_bus_arn = _normalize_event_bus_arn

if __name__ == "__main__":
    sys.exit(main())
