"""
The C{aceproxy} twistd plugin: C{twistd -n aceproxy --help}.

Only the L{ServiceMaker} is built here, so that twistd's plugin scan does not
import the proxy itself.
"""

from twisted.application.service import ServiceMaker

aceproxy = ServiceMaker(
    "AceStream multiplexing proxy",
    "acestream_proxy.tap",
    "Serve many players from one AceStream engine session per stream.",
    "aceproxy",
)
