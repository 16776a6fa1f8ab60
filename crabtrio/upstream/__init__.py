"""Upstream calls: httpx clients per provider, a lean HTTP/1.1 transport, secret scrubbing."""

from .client import (
    UpstreamClient as UpstreamClient,
    UpstreamResponse as UpstreamResponse,
)
from .scrub import Scrubber as Scrubber
