"""
The C{acesim} twistd plugin: C{twistd -n acesim --help}.

Only the L{ServiceMaker} is built here: twistd's plugin scan imports every
plugin, and the simulated engine (Klein, the reactor) would otherwise be
imported by every C{twistd} command, C{twistd aceproxy} among them.
"""

from twisted.application.service import ServiceMaker

acesim = ServiceMaker(
    "A simulated AceStream engine",
    "acestream_proxy.testing.simulator_service",
    "A simulated AceStream engine (HTTP API and live MPEG-TS).",
    "acesim",
)
